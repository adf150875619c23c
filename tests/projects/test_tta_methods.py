"""TTA methods on a tiny random ResNet: reset, no mutation, what gets updated, filters, errors."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.models.resnet import ResNet
from core.registry import RegistryError
from projects.tta.methods import (
    METHODS,
    build,
    deyo_weights,
    eata_select,
    norm_layers,
    patch_shuffle,
    plpd,
    prototype_contrastive_loss,
    reliable,
    symmetric_cross_entropy,
)

K = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(norm="bn", seed=0):
    torch.manual_seed(seed)
    return ResNet(num_classes=K, width=4, norm=norm)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g)


def hparams(name):
    """Settings that make every method adapt on random data (filters wide open)."""
    x = batch(40, seed=9)
    y = torch.arange(40) % K
    return {
        "tent": {},
        "eata": {"fisher_data": x[:20], "e_margin": 2.0, "d_margin": 2.0},
        "sar": {"e_margin": 2.0, "exclude": ["layer3"], "lr": 0.01},
        "deyo": {"deyo_margin": 2.0, "plpd_threshold": -1.0, "lr": 0.01},
        "rmt": {"source_data": (x, y), "warmup_steps": 2},
    }.get(name, {})


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_logits_no_mutation_and_bit_exact_reset(name, norm):
    model = tiny(norm)
    before = state(model)
    method = build(name, model, **hparams(name))
    built = state(method)
    for seed in range(3):
        out = method(batch(seed=seed))
        assert out.shape == (16, K) and torch.isfinite(out).all()
    assert_same_state(state(model), before)  # the caller's model is untouched
    method.reset()
    assert_same_state(state(method), built)
    if name != "rmt":  # rmt's built state is after its warm-up on source data
        assert_same_state(state(method.model), before)
    # after reset the method replays exactly (optimizer state and RNG restored too)
    method.reset()
    a = method(batch(seed=5))
    method.reset()
    torch.testing.assert_close(method(batch(seed=5)), a, rtol=0, atol=0)


def test_adapting_methods_change_the_model():
    for name in ["tent", "eata", "sar", "deyo", "rmt"]:
        model = tiny("bn")
        method = build(name, model, **hparams(name))
        built = state(method.model)
        method(batch())
        changed = [k for k, v in state(method.model).items() if not torch.equal(v, built[k])]
        assert changed, name


def test_tent_updates_only_norm_affine_params():
    model = tiny("bn")
    method = build("tent", model)
    for s in range(3):
        method(batch(seed=s))
    norm_params = {f"{n}.{p}" for n, _ in norm_layers(model) for p in ("weight", "bias")}
    after = method.model.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, after[k])}
    assert changed and changed <= norm_params  # running stats (buffers) untouched as well


def test_tent_lowers_entropy_and_uses_batch_statistics():
    model = tiny("bn")
    x = batch(32)
    method = build("tent", model, lr=0.01)
    ents = []
    for _ in range(8):
        p = method(x).double().softmax(1)
        ents.append(-(p * p.log()).sum(1).mean().item())  # float64 reference entropy
    assert ents[-1] < ents[0]
    # the bn method equals the source network evaluated with batch statistics
    ref = copy.deepcopy(model).train()
    torch.testing.assert_close(build("bn", model)(x), ref(x))
    torch.testing.assert_close(build("source", model)(x), model.eval()(x))


def test_inplace_adapts_the_callers_model():
    model = tiny("gn")
    before = state(model)
    method = build("tent", model, inplace=True)
    method(batch())
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_reliable_and_eata_filters_on_crafted_logits():
    confident0 = torch.tensor([10.0] + [0.0] * (K - 1))
    confident1 = torch.tensor([0.0, 10.0] + [0.0] * (K - 2))
    uniform = torch.zeros(K)
    logits = torch.stack([confident0, confident1, uniform])
    e0 = 0.4 * math.log(K)
    assert reliable(logits, e0).tolist() == [True, True, False]
    keep, m = eata_select(logits, e0, 0.4, None)
    assert keep.tolist() == [True, True, False]
    p = logits.softmax(1)
    torch.testing.assert_close(m, p[:2].mean(0))
    # redundancy: a class-0-heavy running mean filters the confident class-0 sample
    mean = torch.zeros(K)
    mean[0] = 1.0
    keep, m2 = eata_select(logits, e0, 0.4, mean)
    assert keep.tolist() == [False, True, False]
    torch.testing.assert_close(m2, 0.9 * mean + 0.1 * p[1])
    keep, m3 = eata_select(uniform[None], e0, 0.4, mean)  # nothing kept: EMA unchanged
    assert not keep.any() and torch.equal(m3, mean)


def test_sar_recovery_and_frozen_last_block():
    model = tiny("gn")
    method = build("sar", model, e_margin=2.0, exclude=["layer3"], reset_constant=100.0, lr=0.1)
    built = state(method)
    method(batch())
    assert method.recoveries == 1 and method.ema is None
    assert_same_state(state(method), built)
    method = build("sar", model, e_margin=2.0, exclude=["layer3"], lr=0.1)
    for s in range(2):
        method(batch(seed=s))
    after = method.model.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, after[k])}
    assert changed and not any(k.startswith("layer3") for k in changed)


def test_sar_skips_when_nothing_is_reliable():
    model = tiny("bn")
    method = build("sar", model, e_margin=0.0)  # entropy is never < 0
    method(batch())
    assert_same_state(state(method.model), state(model))


def test_patch_shuffle_permutes_patches():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    assert not torch.equal(x, y)
    # each 4x4 patch of y is some 4x4 patch of x (same image)
    patches = lambda t: t.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)  # noqa: E731
    px, py = patches(x), patches(y)
    for i in range(2):
        assert sorted(map(tuple, px[i].tolist())) == sorted(map(tuple, py[i].tolist()))
    torch.testing.assert_close(patch_shuffle(x, 1), x)
    assert patch_shuffle(torch.rand(3, 1, 18, 18), 4).shape == (3, 1, 18, 18)


def test_plpd_and_deyo_weights_closed_form():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    pa, pb = a.softmax(1), b.softmax(1)
    expected = torch.stack([pa[0, 0] - pb[0, 0], pa[1, 2] - pb[1, 2]])
    torch.testing.assert_close(plpd(a, b), expected)
    ent, score = torch.tensor([0.1, 0.9]), torch.tensor([0.5, -0.2])
    np.testing.assert_allclose(
        deyo_weights(ent, score, 0.4).numpy(), np.exp(0.4 - ent.numpy()) + np.exp(score.numpy())
    )


def test_deyo_filters_samples_below_plpd_threshold():
    model = tiny("bn")
    method = build("deyo", model, deyo_margin=2.0, plpd_threshold=2.0)  # PLPD <= 1 always
    method(batch())
    assert_same_state(state(method.model), state(model))


def test_symmetric_cross_entropy_reference():
    s, t = torch.randn(5, K, dtype=torch.float64), torch.randn(5, K, dtype=torch.float64)

    def ce(p_logits, q_logits):  # CE(p, q) = -sum p log q, in float64
        return -(F.softmax(p_logits, 1) * F.log_softmax(q_logits, 1)).sum(1)

    torch.testing.assert_close(symmetric_cross_entropy(s, t), 0.5 * ce(t, s) + 0.5 * ce(s, t))
    torch.testing.assert_close(
        symmetric_cross_entropy(s, s), -(s.softmax(1) * s.log_softmax(1)).sum(1)
    )


def test_prototype_contrastive_loss_matches_a_loop_reference():
    views = torch.randn(4, 3, 8, dtype=torch.float64)
    tau = 0.1
    z = F.normalize(views, dim=2)
    total, count = 0.0, 0
    for i in range(4):
        for a in range(3):
            anchor = z[i, a]
            denom = sum(
                math.exp(float(anchor @ z[j, b]) / tau)
                for j in range(4)
                for b in range(3)
                if (j, b) != (i, a)
            )
            pos = [float(anchor @ z[i, b]) / tau - math.log(denom) for b in range(3) if b != a]
            total += -sum(pos) / len(pos)
            count += 1
    torch.testing.assert_close(prototype_contrastive_loss(views, tau).item(), total / count)


@pytest.mark.parametrize("name", METHODS.names())
def test_bad_batches_raise(name):
    method = build(name, tiny("bn"), **hparams(name))
    bad = batch()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        method(bad)
    with pytest.raises(ValueError, match="non-empty"):
        method(batch()[:0])
    with pytest.raises(ValueError, match="floating"):
        method(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["bn", "tent", "eata", "sar", "deyo"])
def test_methods_that_need_norm_layers_reject_a_model_without_them(name):
    with pytest.raises(ValueError, match="no BatchNorm/GroupNorm/LayerNorm"):
        build(name, tiny("none"), **hparams(name))


def test_source_and_rmt_work_without_norm_layers_and_other_errors():
    model = tiny("none")
    assert build("source", model)(batch()).shape == (16, K)
    with pytest.raises(ValueError, match="source_data"):
        build("rmt", model)
    with pytest.raises(RegistryError, match="Known"):
        build("tnet", model)
    with pytest.raises(ValueError, match="optimizer"):
        build("tent", tiny(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="nn.Module"):
        build("tent", lambda x: x)

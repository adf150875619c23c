"""Every TTA method: reset, no mutation, what gets updated, errors by name, dtype and device.

The update rules are pinned per method in test_tta_<method>.py; source and bn here.
"""

import math
import re
from pathlib import Path

import pytest
import torch

from core.models.resnet import ResNet
from core.registry import RegistryError
from projects.tta.methods import METHODS, build, norm_layers
from tests.projects.tta_helpers import forward, images, params, tiny_model

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


def test_one_module_per_method_with_its_paper():
    for name in METHODS.names():
        assert Path(METHODS.location(name).split(":")[0]).stem == name
        assert name == "source" or re.search(r"20\d\d, arXiv:\d{4}\.\d{5}", METHODS.paper(name))


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
        adapted = state(method.model)
        dropped = set(before) - set(adapted)  # BN running buffers, removed for batch statistics
        assert all(k.endswith(("running_mean", "running_var")) for k in dropped)
        assert_same_state(adapted, {k: before[k] for k in adapted})
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
    changed = {k for k, v in after.items() if not torch.equal(v, model.state_dict()[k])}
    assert changed and changed <= norm_params


def test_source_uses_the_running_statistics_and_bn_the_batch_statistics():
    model, x = tiny_model().train(), images(12)
    bn = model[2]
    p = params(model)
    running = forward(p, x, running=(bn.running_mean.clone(), bn.running_var.clone()))[1]
    batch_stats = forward(p, x)[1]
    assert (running - batch_stats).abs().max() > 0.5
    torch.testing.assert_close(build("source", model)(x), running, rtol=1e-12, atol=1e-12)
    method = build("bn", model)
    torch.testing.assert_close(method(x), batch_stats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(method.eval()(x), batch_stats, rtol=1e-12, atol=1e-12)
    assert torch.equal(bn.running_mean, model[2].running_mean)  # caller's buffers untouched


def test_inplace_adapts_the_callers_model():
    model = tiny("gn")
    before = state(model)
    method = build("tent", model, inplace=True)
    method(batch())
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_reliable_and_eata_filters_on_crafted_logits():
    from projects.tta.methods import eata_select, reliable

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
    mean = torch.zeros(K)
    mean[0] = 1.0  # a class-0-heavy running mean filters the confident class-0 sample
    keep, m2 = eata_select(logits, e0, 0.4, mean)
    assert keep.tolist() == [False, True, False]
    torch.testing.assert_close(m2, 0.9 * mean + 0.1 * p[1])
    keep, m3 = eata_select(uniform[None], e0, 0.4, mean)  # nothing kept: EMA unchanged
    assert not keep.any() and torch.equal(m3, mean)


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


NAN, INF = float("nan"), float("inf")
BAD_HPARAMS = [  # (method, hparams, exception, message: the name and the allowed range)
    ("tent", {"lr": NAN}, ValueError, r"lr must be a number in \[0, inf\), got nan"),
    ("tent", {"lr": INF}, ValueError, r"lr must be a number in \[0, inf\)"),
    ("tent", {"lr": -1e-3}, ValueError, r"lr must be a number in \[0, inf\)"),
    ("tent", {"lr": "1e-3"}, TypeError, r"lr must be a number"),
    ("tent", {"momentum": 1.0}, ValueError, r"momentum must be a number in \[0, 1\)"),
    ("tent", {"weight_decay": -1.0}, ValueError, r"weight_decay must be a number in \[0, inf\)"),
    ("tent", {"steps": 0}, ValueError, r"steps must be an integer in \[1, inf\]"),
    ("tent", {"nesterov": True}, ValueError, r"nesterov=True needs optimizer='sgd'"),
    ("tent", {"optimizer": "sgd", "momentum": 0.0, "nesterov": True}, ValueError, "momentum > 0"),
    ("tent", {"nesterov": "yes"}, TypeError, "nesterov must be True or False"),
    ("sar", {"lr": NAN}, ValueError, r"SAR: lr must be a number in \[0, inf\)"),
    ("deyo", {"lr": NAN}, ValueError, r"DeYO: lr must be a number in \[0, inf\)"),
    ("eata", {"e_margin": -0.1}, ValueError, r"e_margin must be a number in \(0, inf\)"),
    ("eata", {"e_margin": NAN}, ValueError, r"e_margin must be a number in \(0, inf\)"),
    ("eata", {"e_margin": 0.0}, ValueError, r"e_margin must be a number in \(0, inf\)"),
    ("eata", {"d_margin": -1.0}, ValueError, r"d_margin must be a number in \(0, inf\]"),
    ("eata", {"d_margin": NAN}, ValueError, r"d_margin must be a number in \(0, inf\]"),
    ("eata", {"fisher_alpha": -1.0}, ValueError, r"fisher_alpha must be a number in \[0, inf\)"),
    ("eata", {"fisher_batch_size": 0}, ValueError, r"fisher_batch_size must be an integer in \[1"),
    ("eata", {"fisher_batch_size": 2.5}, TypeError, r"fisher_batch_size must be an integer"),
    ("sar", {"rho": -0.05}, ValueError, r"rho must be a number in \[0, inf\)"),
    ("sar", {"rho": NAN}, ValueError, r"rho must be a number in \[0, inf\)"),
    ("sar", {"e_margin": -1.0}, ValueError, r"e_margin must be a number in \(0, inf\)"),
    ("sar", {"reset_constant": -1.0}, ValueError, r"reset_constant must be a number in \[0, inf\)"),
    ("sar", {"exclude": "layer3"}, TypeError, "exclude must be a list of name prefixes"),
    ("deyo", {"patch_grid": 0}, ValueError, r"patch_grid must be an integer in \[1, inf\]"),
    ("deyo", {"deyo_margin": 0.0}, ValueError, r"deyo_margin must be a number in \(0, inf\)"),
    ("deyo", {"e_margin": -0.4}, ValueError, r"e_margin must be a number in \[0, inf\)"),
    (
        "deyo",
        {"plpd_threshold": 1.0},
        ValueError,
        r"plpd_threshold must be a number in \(-inf, 1\)",
    ),
    ("rmt", {"ema": 1.5}, ValueError, r"ema must be a number in \[0, 1\]"),
    ("rmt", {"ema": NAN}, ValueError, r"ema must be a number in \[0, 1\]"),
    ("rmt", {"temperature": 0.0}, ValueError, r"temperature must be a number in \(0, inf\)"),
    ("rmt", {"temperature": -0.1}, ValueError, r"temperature must be a number in \(0, inf\)"),
    ("rmt", {"projection_dim": 0}, ValueError, r"projection_dim must be an integer in \[1, inf\]"),
    ("rmt", {"lambda_cont": -1.0}, ValueError, r"lambda_cont must be a number in \[0, inf\)"),
    ("rmt", {"warmup_steps": -1}, ValueError, r"warmup_steps must be an integer in \[0, inf\]"),
    ("rmt", {"source_batch_size": 0}, ValueError, r"source_batch_size must be an integer in \[1"),
    ("rmt", {"lr": NAN}, ValueError, r"RMT: lr must be a number in \[0, inf\)"),
]


@pytest.mark.parametrize(("name", "hp", "exc", "match"), BAD_HPARAMS)
def test_bad_hyperparameters_are_refused_by_name_and_range(name, hp, exc, match):
    with pytest.raises(exc, match=match):
        build(name, tiny("bn"), **{**hparams(name), **hp})


def test_bad_data_is_refused_by_name():
    x, y = batch(20), torch.arange(20) % K
    with pytest.raises(ValueError, match="source_data labels must be integer"):
        build("rmt", tiny(), source_data=(x, y.float()))
    with pytest.raises(ValueError, match="source_data labels must be integer"):
        build("rmt", tiny(), source_data=(x, y[:5]))
    with pytest.raises(ValueError, match="every class"):
        build("rmt", tiny(), source_data=(x, y % 3), warmup_steps=0)
    with pytest.raises(ValueError, match="fisher_data"):
        build("eata", tiny(), fisher_data=x[:0])
    method = build("deyo", tiny(), deyo_margin=2.0, patch_grid=32)
    with pytest.raises(ValueError, match=r"grid must be an integer in \[1, 16\], got 32"):
        method(batch())


@pytest.mark.parametrize("name", METHODS.names())
def test_methods_follow_the_model_to_another_dtype(name):
    """Built in float32, moved with ``.double()``: every tensor a method makes or holds
    follows (the same mechanism as ``.to("cuda")``)."""
    method = build(name, tiny("bn"), **hparams(name)).double()
    out = method(batch().double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    method.reset()
    assert next(method.model.parameters()).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS.names())
def test_methods_follow_the_model_to_cuda(name):
    cpu = build(name, tiny("gn"), **hparams(name)).double()
    gpu = build(name, tiny("gn"), **hparams(name)).double().cuda()
    for seed in range(2):
        x = batch(seed=seed).double()
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-6, atol=1e-8)

"""Training-time calibration losses against torch, float64 closed forms and per-sample loops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.losses import LOSSES, get_loss
from core.losses.calibration_losses import (
    focal,
    focal_flsd53,
    label_smoothing,
    mixup_batch,
    mixup_cross_entropy,
    mndcg,
    mrl,
)

N, C = 37, 6


def _batch(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(N, C, generator=g, dtype=torch.float64), torch.randint(
        0, C, (N,), generator=g
    )


@pytest.mark.parametrize("s", [0.0, 0.1, 0.4])
def test_label_smoothing_equals_torch(s):
    logits, y = _batch()
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            label_smoothing(logits, y, smoothing=s, reduction=reduction),
            F.cross_entropy(logits, y, label_smoothing=s, reduction=reduction),
        )


def _p_true(logits, y):
    z = logits.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True))[np.arange(len(y)), y.numpy()]


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0])
def test_focal_closed_form(gamma):
    logits, y = _batch(1)
    p = _p_true(logits, y)
    ref = -((1 - p) ** gamma) * np.log(p)
    np.testing.assert_allclose(
        focal(logits, y, gamma=gamma, reduction="none").numpy(), ref, rtol=1e-12
    )
    if gamma == 0:
        torch.testing.assert_close(focal(logits, y, gamma=0), F.cross_entropy(logits, y))


def test_flsd53_switches_gamma_at_p_0_2_and_has_focal_gradient():
    logits, y = _batch(2, scale=3.0)
    p = _p_true(logits, y)
    assert (p < 0.2).any() and (p >= 0.2).any()
    gamma = np.where(p < 0.2, 5.0, 3.0)
    ref = -((1 - p) ** gamma) * np.log(p)
    np.testing.assert_allclose(focal_flsd53(logits, y, reduction="none").numpy(), ref, rtol=1e-12)
    # gamma is chosen from detached p: the gradient is the focal gradient at that fixed gamma
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(focal_flsd53(x, y, reduction="sum"), x)
    low = torch.as_tensor(p < 0.2)
    fixed = focal(x, y, gamma=5.0, reduction="none")[low].sum()
    fixed = fixed + focal(x, y, gamma=3.0, reduction="none")[~low].sum()
    torch.testing.assert_close(grad, torch.autograd.grad(fixed, x)[0])


def test_mixup_batch_and_loss_equal_two_term_ce():
    logits, y = _batch(3)
    inputs = torch.randn(N, 4, 5, dtype=torch.float64)
    mixed, soft, lam = mixup_batch(
        inputs, y, C, lam=0.7, generator=torch.Generator().manual_seed(9)
    )
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(mixed, 0.7 * inputs + 0.3 * inputs[perm])
    torch.testing.assert_close(soft.sum(1), torch.ones(N, dtype=torch.float64))
    two_term = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(mixup_cross_entropy(logits, soft), two_term)
    assert LOSSES.get("mixup_cross_entropy") is mixup_cross_entropy
    # sampled lam lies in (0, 1)
    _, _, sampled = mixup_batch(inputs, y, C, alpha=0.4)
    assert 0 < sampled < 1


def test_mrl_matches_per_sample_loop():
    logits, y = _batch(4)
    mixed_logits, _ = _batch(5)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    soft = 0.6 * F.one_hot(y, C).double() + 0.4 * F.one_hot(y[perm], C).double()
    ranking = 0.0
    for i in range(N):
        if y[i] != y[perm[i]]:  # same-class pairs have a one-hot mixed target: skipped
            ranking += max(0.0, float(mixed_logits[i].max() - logits[i].max()) + 2.0)
    ref = F.cross_entropy(logits, y) + 0.1 * ranking / N
    torch.testing.assert_close(mrl(logits, y, mixed_logits, soft), ref)
    # raw max logit above the mixed one by more than the margin: CE only
    torch.testing.assert_close(mrl(logits + 100, y, mixed_logits, soft), F.cross_entropy(logits, y))


def test_mndcg_matches_loop_and_is_ce_when_confidences_equal_coefficients():
    logits, y = _batch(6)
    lams = [0.9, 0.55, 0.7]
    mixed_logits = torch.stack([_batch(10 + m)[0] for m in range(3)])
    soft = torch.stack(
        [
            lam * F.one_hot(y, C).double() + (1 - lam) * F.one_hot((y + 1) % C, C).double()
            for lam in lams
        ]
    )
    total = 0.0
    for i in range(N):
        coeffs = [max(lam, 1 - lam) for lam in lams]
        confs = [float(mixed_logits[m, i].softmax(0).max()) for m in range(3)]
        ranked = sorted(range(3), key=lambda m: -coeffs[m])
        gains = [float(logits[i].softmax(0).max())] + [confs[m] for m in ranked]
        ideal = [1.0] + [coeffs[m] for m in ranked]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        total += 1 - min(dcg / idcg, idcg / dcg)
    ref = F.cross_entropy(logits, y) + 0.1 * total / N
    torch.testing.assert_close(mndcg(logits, y, mixed_logits, soft), ref)

    # two classes: confidence = sigmoid(margin); set it to each lam and the raw one near 1
    y2 = torch.zeros(N, dtype=torch.long)
    raw = torch.tensor([[40.0, 0.0]], dtype=torch.float64).expand(N, 2)
    mixed2 = torch.stack(
        [torch.tensor([[math.log(lam / (1 - lam)), 0.0]]).double().expand(N, 2) for lam in lams]
    )
    soft2 = torch.stack([torch.tensor([[lam, 1 - lam]]).double().expand(N, 2) for lam in lams])
    torch.testing.assert_close(mndcg(raw, y2, mixed2, soft2), F.cross_entropy(raw, y2))


@pytest.mark.parametrize("name", ["label_smoothing", "focal", "focal_flsd53"])
def test_hard_target_losses_reject_bad_input(name):
    logits, y = _batch()
    with pytest.raises(ValueError, match="targets must be integer"):
        get_loss(name)(logits, y[:-1])
    with pytest.raises(ValueError, match="targets must lie"):
        get_loss(name)(logits, y + C)
    with pytest.raises(ValueError, match="reduction"):
        get_loss(name)(logits, y, reduction="avg")


def test_soft_and_mixed_target_shapes_are_checked():
    logits, y = _batch()
    with pytest.raises(ValueError, match="soft targets"):
        mixup_cross_entropy(logits, y)
    with pytest.raises(ValueError, match="soft targets"):
        mrl(logits, y, logits, F.one_hot(y, C)[:-1].double())
    with pytest.raises(ValueError, match=r"\(M, N, C\)"):
        mndcg(logits, y, logits, F.one_hot(y, C).double())


@pytest.mark.parametrize(
    "name", ["label_smoothing", "focal", "focal_flsd53", "mixup_cross_entropy", "mrl", "mndcg"]
)
def test_registered_losses_are_differentiable(name):
    logits, y = _batch(7)
    x = logits.clone().requires_grad_()
    soft = 0.5 * F.one_hot(y, C).double() + 0.5 * F.one_hot((y + 2) % C, C).double()
    args = {
        "mixup_cross_entropy": (x, soft),
        "mrl": (x, y, x.flip(0), soft),
        "mndcg": (x, y, torch.stack([x.flip(0), x.roll(1, 0)]), torch.stack([soft, soft.flip(1)])),
    }.get(name, (x, y))
    loss = get_loss(name)(*args)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0

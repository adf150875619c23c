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
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
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


# ---- issue 15: focal with gamma < 1 at p_y == 1, label dtypes, hyperparameters ----


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_gradient_is_finite_when_p_y_rounds_to_one(gamma, dtype):
    x = torch.tensor([[60.0, 0.0], [0.3, -0.2]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1])
    for loss in (
        focal(x, y, gamma=gamma),
        focal_flsd53(x, y, gammas=(gamma, gamma)),
    ):
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all()  # NaN for the whole batch before, gamma < 1
        # float64 reference: the saturated row's true gradient is ~e^-60 (0 to fp32), the other
        # row's is the closed-form focal gradient
        x64 = x.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(focal(x64[1:], y[1:], gamma=gamma, reduction="sum") / 2, x64)
        torch.testing.assert_close(grad.double(), ref, atol=1e-6, rtol=1e-5)


def test_focal_one_step_by_hand():
    # z = [1, 0], y = 0, gamma = 2: p = e / (e + 1); loss = -(1-p)^2 log p;
    # d loss / d z0 = (1-p) p [2 (1-p) log p ... ] computed from the chain rule on u = z0 - z1
    p = math.e / (math.e + 1)
    loss = -((1 - p) ** 2) * math.log(p)
    # dL/du with dp/du = p (1 - p): 2 (1-p) p (1-p) log p - (1-p)^2 (1-p)
    dl_du = 2 * (1 - p) ** 2 * p * math.log(p) - (1 - p) ** 3
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = focal(x, torch.tensor([0]), gamma=2.0)
    (grad,) = torch.autograd.grad(out, x)
    assert out.detach().item() == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[dl_du, -dl_du]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["label_smoothing", "focal", "focal_flsd53", "mrl", "mndcg"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_any_integer_target_dtype_gives_the_int64_loss(name, dtype):
    logits, y = _batch(3)
    soft = 0.5 * F.one_hot(y, C).double() + 0.5 * F.one_hot((y + 2) % C, C).double()
    extra = {
        "mrl": (logits.flip(0), soft),
        "mndcg": (logits[None].flip(1), soft[None]),
    }.get(name, ())
    ours = get_loss(name)(logits, y.to(dtype), *extra)
    torch.testing.assert_close(ours, get_loss(name)(logits, y, *extra))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("label_smoothing", {"smoothing": 1.5}, "smoothing must be a finite number in"),
        ("label_smoothing", {"smoothing": float("nan")}, "smoothing"),
        ("focal", {"gamma": -0.5}, "focal: gamma must be a finite number >= 0"),
        ("focal", {"gamma": float("inf")}, "focal: gamma"),
        ("focal_flsd53", {"threshold": 2.0}, "threshold must be a finite number in"),
        ("focal_flsd53", {"gammas": (5.0, -1.0)}, r"gammas\[i\] must be"),
        ("focal_flsd53", {"gammas": (5.0,)}, "gammas must be a pair"),
    ],
)
def test_hard_target_hyperparameters_are_refused_by_name(name, kwargs, match):
    logits, y = _batch()
    with pytest.raises(ValueError, match=match):
        get_loss(name)(logits, y, **kwargs)


def test_ranking_hyperparameters_are_refused_by_name():
    logits, y = _batch()
    soft = F.one_hot(y, C).double()
    with pytest.raises(ValueError, match="mrl: margin must be"):
        mrl(logits, y, logits, soft, margin=-1.0)
    with pytest.raises(ValueError, match="mrl: alpha must be"):
        mrl(logits, y, logits, soft, alpha=float("nan"))
    with pytest.raises(ValueError, match="mndcg: alpha must be"):
        mndcg(logits, y, logits[None], soft[None], alpha=-0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 0.0}, ValueError, "mixup_batch: alpha must be a finite number > 0"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"lam": 1.5}, ValueError, r"mixup_batch: lam must be a finite number in \[0, 1\]"),
        ({"n_classes": 0}, ValueError, "n_classes must be an integer >= 1"),
        ({"n_classes": 3}, ValueError, r"targets must lie in \[0, n_classes=3\)"),
        ({"targets": torch.arange(N) % C * 1.0}, TypeError, "targets must be an integer"),
    ],
)
def test_mixup_batch_refuses_bad_arguments_by_name(kwargs, error, match):
    args = {"inputs": torch.randn(N, 4), "targets": torch.arange(N) % C, "n_classes": C} | kwargs
    with pytest.raises(error, match=match):
        mixup_batch(**args)


def test_mixup_batch_with_given_lam_and_uint8_targets():
    inputs, y = torch.randn(N, 4, dtype=torch.float64), torch.arange(N) % C
    g = torch.Generator().manual_seed(3)
    mixed, soft, lam = mixup_batch(inputs, y.to(torch.uint8), C, lam=1.0, generator=g)
    assert lam == 1.0
    torch.testing.assert_close(mixed, inputs)
    torch.testing.assert_close(soft, F.one_hot(y, C).double())

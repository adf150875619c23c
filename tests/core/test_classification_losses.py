import math

import pytest
import torch
import torch.nn.functional as F

from core.losses import get_loss

NAMES = [
    "ce",
    "comp_sum",
    "adv_comp_sum",
    "gce",
    "mae",
    "sce",
    "ldr_kl",
    "aldr_kl",
    "topk_svm",
    "spherical_zloss",
    "logz_penalty",
]


def _data(n=16, c=7, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=dtype) * scale, torch.randint(
        0, c, (n,), generator=g
    )


def _call(name, logits, targets, **kw):
    if name == "adv_comp_sum" and "adv_logits" not in kw:
        kw["adv_logits"] = logits.detach() + 0.1
    return get_loss(name)(logits, targets, **kw)


def _p_y(logits, targets):  # float64 reference
    return torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)


# --- comp-sum family: members equal their closed forms ------------------------------------


def test_comp_sum_tau1_is_cross_entropy():
    x, y = _data()
    torch.testing.assert_close(get_loss("comp_sum")(x, y, tau=1.0), F.cross_entropy(x, y))
    torch.testing.assert_close(get_loss("ce")(x, y), F.cross_entropy(x, y))


def test_comp_sum_tau0_is_sum_exponential():
    x, y = _data()
    z_y = x.gather(1, y[:, None])
    off = torch.ones_like(x).scatter_(1, y[:, None], 0.0)
    ref = ((x - z_y).exp() * off).sum(1)  # sum_{k != y} exp(z_k - z_y)
    torch.testing.assert_close(get_loss("comp_sum")(x, y, tau=0.0, reduction="none"), ref)


@pytest.mark.parametrize("tau", [1.3, 1.7])
def test_comp_sum_matches_phi_tau_of_u(tau):
    x, y = _data()
    p = _p_y(x, y)
    u = 1 / p - 1  # sum_{k != y} exp(z_k - z_y)
    ref = ((1 + u) ** (1 - tau) - 1) / (1 - tau)
    torch.testing.assert_close(get_loss("comp_sum")(x, y, tau=tau, reduction="none"), ref)
    # GCE with q = tau - 1 is the same member: (1 - p^q) / q
    torch.testing.assert_close(get_loss("gce")(x, y, q=tau - 1, reduction="none"), ref)
    torch.testing.assert_close(ref, (1 - p ** (tau - 1)) / (tau - 1))


def test_tau2_and_mae_are_one_minus_py():
    x, y = _data()
    ref = 1 - _p_y(x, y)
    torch.testing.assert_close(get_loss("comp_sum")(x, y, tau=2.0, reduction="none"), ref)
    torch.testing.assert_close(get_loss("mae")(x, y, reduction="none"), ref)
    l1 = (F.one_hot(y, x.shape[1]) - torch.softmax(x, 1)).abs().sum(1)  # Ghosh et al.
    torch.testing.assert_close(2 * get_loss("mae")(x, y, reduction="none"), l1)


def test_gce_small_q_tends_to_ce():
    x, y = _data()
    torch.testing.assert_close(
        get_loss("gce")(x, y, q=1e-6), F.cross_entropy(x, y), rtol=1e-4, atol=1e-4
    )


def test_adv_comp_sum_closed_form():
    x, y = _data()
    xa = x + torch.randn_like(x)
    rho, nu = 2.0, 0.5
    d = lambda z: z.gather(1, y[:, None]) - z  # noqa: E731  (N, C), zero at y
    ref = F.cross_entropy(x / rho, y, reduction="none") + nu * (d(xa) - d(x)).norm(dim=1)
    out = get_loss("adv_comp_sum")(x, y, adv_logits=xa, rho=rho, nu=nu, reduction="none")
    torch.testing.assert_close(out, ref)
    # with z' = z the smooth term vanishes
    torch.testing.assert_close(
        get_loss("adv_comp_sum")(x, y, adv_logits=x.clone()),
        F.cross_entropy(x, y),
        atol=1e-5,
        rtol=0,
    )


# --- LDR family ---------------------------------------------------------------------------


def test_ldr_kl_at_lam1_margin0_is_ce_minus_logC():
    x, y = _data()
    out = get_loss("ldr_kl")(x, y, lam=1.0, margin=0.0)
    torch.testing.assert_close(out, F.cross_entropy(x, y) - math.log(x.shape[1]))


def test_ldr_kl_temperature_limits():
    x, y = _data()
    a = 0.3 * (1 - F.one_hot(y, x.shape[1])) + x - x.gather(1, y[:, None])
    small = get_loss("ldr_kl")(x, y, lam=1e-4, margin=0.3, reduction="none")
    torch.testing.assert_close(small, a.max(1).values, atol=1e-3, rtol=0)  # max-margin
    torch.testing.assert_close(
        small, get_loss("topk_svm")(x, y, k=1, margin=0.3, reduction="none"), atol=1e-3, rtol=0
    )
    big = get_loss("ldr_kl")(x, y, lam=1e5, margin=0.3, reduction="none")
    torch.testing.assert_close(big, a.mean(1), atol=1e-3, rtol=0)


def test_topk_svm_closed_forms():
    x, y = _data()
    c = x.shape[1]
    off = 1 - F.one_hot(y, c)
    a = off + x - x.gather(1, y[:, None])
    cs = torch.clamp((a - 1e9 * (1 - off)).max(1).values, min=0)  # Crammer-Singer hinge
    torch.testing.assert_close(get_loss("topk_svm")(x, y, k=1, reduction="none"), cs)
    torch.testing.assert_close(get_loss("topk_svm")(x, y, k=c, reduction="none"), a.mean(1))
    ref3 = a.sort(1, descending=True).values[:, :3].mean(1)
    torch.testing.assert_close(get_loss("topk_svm")(x, y, k=3, reduction="none"), ref3)


def test_aldr_kl_matches_brute_force_max_over_lambda():
    x, y = _data(n=8, c=5)
    lam0, alpha, margin, c = 1.0, 2.0, 0.1, 5
    a = margin * (1 - F.one_hot(y, c)) + x - x.gather(1, y[:, None])
    lams = torch.linspace(1e-3, 3.0, 30001, dtype=torch.float64)
    obj = lams * (torch.logsumexp(a[:, None] / lams[None, :, None], 2) - math.log(c))
    penalty = alpha * math.log(c) / (2 * lam0) * (lams - lam0) ** 2  # authors' scaling
    ref = (obj - penalty).max(1).values
    out = get_loss("aldr_kl")(
        x, y, lam0=lam0, alpha=alpha, margin=margin, grid=512, reduction="none"
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # adapting lambda can only raise the loss above LDR-KL at lam0 (lam = lam0 is feasible)
    fixed = get_loss("ldr_kl")(x, y, lam=lam0, margin=margin, reduction="none")
    assert (out >= fixed - 1e-9).all()


@pytest.mark.parametrize(("lam0", "alpha"), [(1.0, 2.0), (0.1, 2.0), (10.0, 1.5)])
def test_aldr_kl_matches_authors_fixed_point(lam0, alpha):
    """ALDRLoss_V1 (github.com/DixianZhu/LDR): lam <- lam0 - lam0 KL(p_lam || 1/C) / (alpha
    log C), run here to convergence, then lam LSE-mean(a / lam) - alpha log C / (2 lam0)
    (lam - lam0)^2 on the logits as given (their z / mean|z| rescaling left out)."""
    x, y = _data(n=8, c=6, scale=1.0)
    c, margin = 6, 0.1
    a = margin * (1 - F.one_hot(y, c)) + x - x.gather(1, y[:, None])  # (N, C)
    log_c = math.log(c)
    lam = torch.full((8, 1), lam0, dtype=torch.float64)
    for _ in range(500):
        p = torch.softmax(a / lam, 1)
        kl = (p * torch.log(c * p)).sum(1, keepdim=True)
        lam = lam0 - lam0 * kl / (alpha * log_c)
    ref = (
        lam * (torch.logsumexp(a / lam, 1, keepdim=True) - log_c)
        - alpha * log_c / (2 * lam0) * (lam - lam0) ** 2
    )
    out = get_loss("aldr_kl")(
        x, y, lam0=lam0, alpha=alpha, margin=margin, grid=4096, reduction="none"
    )
    torch.testing.assert_close(out, ref.squeeze(1), atol=1e-6, rtol=0)
    assert (lam >= lam0 * (1 - 1 / alpha)).all() and (lam <= lam0).all()


# --- others -------------------------------------------------------------------------------


def test_sce_closed_form():
    x, y = _data()
    p = torch.softmax(x, 1)
    q = F.one_hot(y, x.shape[1]).double().clamp(min=math.exp(-4.0))  # log q = -4 off-target
    rce = -(p * q.log()).sum(1)
    ref = 0.1 * F.cross_entropy(x, y, reduction="none") + 1.0 * rce
    torch.testing.assert_close(get_loss("sce")(x, y, reduction="none"), ref)


def test_spherical_zloss_closed_form_and_invariance():
    x, y = _data()
    z = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
    a, b = 0.5, 3.0
    ref = torch.log1p(torch.exp(a * (b - z.gather(1, y[:, None]).squeeze(1)))) / a
    f = get_loss("spherical_zloss")
    torch.testing.assert_close(f(x, y, a=a, b=b, reduction="none"), ref)
    torch.testing.assert_close(f(3.7 * x - 11.0, y, a=a, b=b), f(x, y, a=a, b=b))


def test_logz_penalty_closed_form():
    x, y = _data()
    ref = 1e-4 * (x.exp().sum(1).log() ** 2).mean()
    torch.testing.assert_close(get_loss("logz_penalty")(x, y), ref)


# --- every registered loss: reductions, ignore_index, finite gradients, bad input --------


@pytest.mark.parametrize("name", NAMES)
def test_reductions_and_ignore_index(name):
    x, y = _data()
    per = _call(name, x, y, reduction="none")
    assert per.shape == y.shape
    torch.testing.assert_close(_call(name, x, y, reduction="sum"), per.sum())
    torch.testing.assert_close(_call(name, x, y), per.mean())
    y_ign = y.clone()
    y_ign[::3] = -100
    per_ign = _call(name, x, y_ign, reduction="none")
    keep = y_ign != -100
    assert (per_ign[~keep] == 0).all()
    torch.testing.assert_close(per_ign[keep], per[keep])
    torch.testing.assert_close(_call(name, x, y_ign), per[keep].mean())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "comp_sum"])
def test_gradients_finite_at_extreme_logits(name):
    x = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 5.0], [0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 2])
    loss = _call(name, x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5, 2.0])
def test_comp_sum_gradients_finite_at_extreme_logits(tau):
    # tau < 1 grows like p_y^(tau - 1): finite only while that fits the dtype (gap 60 here)
    gap = 1e4 if tau >= 1 else 60.0
    x = torch.tensor([[gap, -gap, 0.0], [-gap, gap, 1.0]], requires_grad=True)
    loss = get_loss("comp_sum")(x, torch.tensor([0, 0]), tau=tau)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises(name):
    x, y = _data()
    with pytest.raises(ValueError, match="targets"):
        _call(name, x, y[:-1])
    with pytest.raises(ValueError, match="targets"):
        _call(name, x, torch.full_like(y, 99))
    with pytest.raises(ValueError, match="logits"):
        _call(name, x[0], y[:1])
    with pytest.raises(ValueError, match="reduction"):
        _call(name, x, y, reduction="avg")


def test_bad_hyperparameters_raise():
    x, y = _data()
    for name, kw in [
        ("comp_sum", {"tau": -1}),
        ("gce", {"q": 0}),
        ("ldr_kl", {"lam": 0}),
        ("aldr_kl", {"alpha": 0}),
        ("topk_svm", {"k": 99}),
        ("spherical_zloss", {"a": 0}),
    ]:
        with pytest.raises(ValueError, match=name):
            get_loss(name)(x, y, **kw)


# --- issue 15: label dtypes, ignore_index, every hyperparameter refused by name -------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype_gives_the_int64_loss(name, dtype):
    x, y = _data()
    torch.testing.assert_close(_call(name, x, y.to(dtype)), _call(name, x, y))


@pytest.mark.parametrize("name", NAMES)
def test_uint8_class_156_is_a_class_not_a_wrapped_ignore_index(name):
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.full((4,), 156, dtype=torch.uint8)  # -100 as uint8 would be 156
    loss = _call(name, x, y, reduction="none")
    torch.testing.assert_close(loss, _call(name, x, y.long(), reduction="none"))
    assert (loss != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_wrong_types_are_refused_by_name(name):
    x, y = _data()
    with pytest.raises(TypeError, match="targets must be"):
        _call(name, x, y.double())
    with pytest.raises(TypeError, match="logits must be a floating"):
        _call(name, x.numpy(), y, **({"adv_logits": x} if name == "adv_comp_sum" else {}))
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        _call(name, x, y, ignore_index=None)


HP_CASES = [  # (loss, hyperparameter, bad values); NaN and inf are refused for every float
    ("comp_sum", "tau", [-1, -1e-9]),
    ("gce", "q", [0, 1.5, -0.1]),
    ("adv_comp_sum", "rho", [0, -1]),
    ("adv_comp_sum", "nu", [-1]),
    ("ldr_kl", "lam", [0, -1]),
    ("ldr_kl", "margin", [-0.1]),
    ("aldr_kl", "lam0", [0]),
    ("aldr_kl", "alpha", [0, -2]),
    ("aldr_kl", "margin", [-1]),
    ("aldr_kl", "lam_min", [0, -1e-3]),
    ("sce", "alpha", [-0.1]),
    ("sce", "beta", [-1]),
    ("sce", "log_zero", [0, 1]),
    ("spherical_zloss", "a", [0, -0.1]),
    ("logz_penalty", "coef", [-1e-4]),
]


@pytest.mark.parametrize(("name", "hp", "bad"), HP_CASES)
def test_every_float_hyperparameter_is_range_checked(name, hp, bad):
    x, y = _data()
    for value in [*bad, float("nan"), float("inf"), "1", True]:
        with pytest.raises(ValueError, match=rf"{name}: {hp} must be a finite number"):
            _call(name, x, y, **{hp: value})


@pytest.mark.parametrize(
    ("name", "hp", "bad"),
    [("aldr_kl", "grid", [0, -1, 2.5, True]), ("topk_svm", "k", [0, 8, 1.0])],
)
def test_integer_hyperparameters_are_range_checked(name, hp, bad):
    x, y = _data()
    for value in bad:
        with pytest.raises(ValueError, match=rf"{name}: {hp} must be an integer"):
            _call(name, x, y, **{hp: value})


def test_aldr_kl_grid_of_one_is_ldr_kl_at_the_lower_end():
    x, y = _data()
    # one grid point: lam = max(lam_min, lam0 (1 - 1/alpha)) = 0.5 at lam0 1, alpha 2
    one = get_loss("aldr_kl")(x, y, grid=1, reduction="none")
    ldr = get_loss("ldr_kl")(x, y, lam=0.5, reduction="none")
    penalty = 2 * math.log(7) / 2 * (0.5 - 1.0) ** 2
    torch.testing.assert_close(one, ldr - penalty)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_computed_in_float32_and_returned_in_their_dtype(name, dtype):
    x, y = _data(scale=2.0)
    half = x.to(dtype).requires_grad_()
    out = _call(name, half, y)
    assert out.dtype == dtype
    torch.testing.assert_close(out, _call(name, half.detach().float(), y).to(dtype))
    (grad,) = torch.autograd.grad(out, half)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


def test_spherical_zloss_with_one_class_in_fp16_is_not_nan():
    # found by tests/core/test_properties.py: sigma's 1e-12 floor underflowed to 0 in fp16
    x = torch.tensor([[1.541]], dtype=torch.float16)
    out = get_loss("spherical_zloss")(x, torch.tensor([0]))
    ref = get_loss("spherical_zloss")(x.double(), torch.tensor([0]))
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-3)

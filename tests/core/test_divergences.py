"""KD divergences against float64 closed forms, scipy and POT; identities; masks; gradients."""

import inspect
import math

import mpmath
import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.special import expit, log_softmax, softmax
from scipy.stats import entropy

from core.losses import DIVERGENCES, get_divergence
from core.losses.divergences import dkd_parts

N, C = 6, 9
NAMES = DIVERGENCES.names()


def _logits(
    seed: int, n: int = N, c: int = C, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(n, c, generator=g, dtype=torch.float64),
        scale * torch.randn(n, c, generator=g, dtype=torch.float64),
    )


def _kwargs(name: str, n: int = N, c: int = C) -> dict:
    return {"targets": torch.arange(n) % c} if name == "dkd" else {}


def _per_row(name, s, t, **kw) -> np.ndarray:
    return get_divergence(name)(s, t, reduction="none", **kw).numpy()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_family_matches_scipy(temperature):
    s, t = _logits(0)
    p_s = softmax(s.numpy() / temperature, -1)
    p_t = softmax(t.numpy() / temperature, -1)
    t2 = temperature**2
    fkl = [entropy(a, b) for a, b in zip(p_t, p_s)]
    rkl = [entropy(b, a) for a, b in zip(p_t, p_s)]
    kw = {"temperature": temperature}
    np.testing.assert_allclose(_per_row("forward_kl", s, t, **kw), t2 * np.array(fkl), rtol=1e-10)
    np.testing.assert_allclose(_per_row("reverse_kl", s, t, **kw), t2 * np.array(rkl), rtol=1e-10)
    np.testing.assert_allclose(
        _per_row("symmetric_kl", s, t, **kw), t2 * (np.array(fkl) + np.array(rkl)), rtol=1e-10
    )
    js = [jensenshannon(a, b) ** 2 for a, b in zip(p_t, p_s)]
    np.testing.assert_allclose(_per_row("js", s, t, **kw), t2 * np.array(js), rtol=1e-8)
    tv = 0.5 * np.abs(p_t - p_s).sum(-1)
    np.testing.assert_allclose(_per_row("total_variation", s, t, **kw), t2 * tv, rtol=1e-10)


@pytest.mark.parametrize("lam", [0.1, 0.7])
def test_skew_and_generalised_js_match_scipy(lam):
    s, t = _logits(1)
    p_s, p_t = softmax(s.numpy(), -1), softmax(t.numpy(), -1)
    skl = [entropy(a, lam * a + (1 - lam) * b) for a, b in zip(p_t, p_s)]
    srkl = [entropy(b, lam * b + (1 - lam) * a) for a, b in zip(p_t, p_s)]
    np.testing.assert_allclose(_per_row("skew_kl", s, t, lam=lam), skl, rtol=1e-10)
    np.testing.assert_allclose(_per_row("skew_reverse_kl", s, t, lam=lam), srkl, rtol=1e-10)
    m = lam * p_t + (1 - lam) * p_s
    gjs = [lam * entropy(a, mm) + (1 - lam) * entropy(b, mm) for a, b, mm in zip(p_t, p_s, m)]
    np.testing.assert_allclose(_per_row("js", s, t, beta=lam), gjs, rtol=1e-10)


def test_akl_matches_loop_reference():
    s, t = _logits(2)
    mu = 0.5
    got = _per_row("akl", s, t, mu=mu)
    for i in range(N):
        p_t, p_s = softmax(t[i].numpy()), softmax(s[i].numpy())
        order = np.argsort(-p_t)
        head, mass = [], 0.0
        for j in order:  # top class always head; stop once cumulative mass exceeds mu
            head.append(j)
            mass += p_t[j]
            if mass > mu:
                head.pop() if len(head) > 1 else None
                break
        tail = [j for j in range(C) if j not in head]
        g_head = np.abs(p_t[head] - p_s[head]).sum()
        g_tail = np.abs(p_t[tail] - p_s[tail]).sum()
        want = (g_head * entropy(p_t, p_s) + g_tail * entropy(p_s, p_t)) / (g_head + g_tail)
        np.testing.assert_allclose(got[i], want, rtol=1e-10)


def test_akl_and_skew_match_authors_code():
    """AKL.py of wutaiqiang/LLM_KD_AKL and losses.py of jongwooko/distillm, float64, (B, L, V)."""
    s, t = _logits(15, n=2 * 3, c=C)
    s3, t3 = s.view(2, 3, C), t.view(2, 3, C)
    p_t, p_s = F.softmax(t3, -1), F.softmax(s3, -1)
    # get_ratio: sort the teacher, gather the student with the same indices, split at mu = 0.5
    re_t, idx = p_t.sort(-1, descending=True)
    errors = (re_t - p_s.gather(-1, idx)).abs()
    mask = re_t.cumsum(-1) > 0.5
    mask[:, :, 0] = False
    s1, s2 = errors.masked_fill(mask, 0).sum(-1), errors.masked_fill(~mask, 0).sum(-1)
    h, l_ = s1 / (s1 + s2), s2 / (s1 + s2)
    fkl = (p_t * (F.log_softmax(t3, -1) - F.log_softmax(s3, -1))).sum(-1)  # get_kl(t, s)
    rkl = (p_s * (F.log_softmax(s3, -1) - F.log_softmax(t3, -1))).sum(-1)  # get_kl(s, t)
    torch.testing.assert_close(
        get_divergence("akl")(s3, t3, reduction="none"), h * fkl + l_ * rkl, rtol=1e-12, atol=0
    )
    # skewed_forward_kl is the cross-entropy -sum p_t log(lam p_t + (1 - lam) p_s): KL + H(p_t)
    lam = 0.1
    h_t = -(p_t * F.log_softmax(t3, -1)).sum(-1)
    sfkl = -(p_t * (lam * p_t + (1 - lam) * p_s).log()).sum(-1)
    torch.testing.assert_close(
        get_divergence("skew_kl")(s3, t3, reduction="none", lam=lam) + h_t, sfkl, rtol=1e-12, atol=0
    )
    srkl = (p_s * (F.log_softmax(s3, -1) - ((1 - lam) * p_t + lam * p_s).log())).sum(-1)
    torch.testing.assert_close(
        get_divergence("skew_reverse_kl")(s3, t3, reduction="none", lam=lam),
        srkl,
        rtol=1e-12,
        atol=0,
    )


def test_akl_sorts_student_with_teacher_permutation():
    # teacher classes in shuffled order; the student only moves mass between two tail classes,
    # so with the teacher's permutation applied to the student the head gap is zero -> pure RKL
    p_t = torch.tensor([[0.05, 0.6, 0.2, 0.05, 0.1]], dtype=torch.float64)
    p_s = torch.tensor([[0.1, 0.6, 0.2, 0.05, 0.05]], dtype=torch.float64)
    s, t = p_s.log(), p_t.log()
    got = _per_row("akl", s, t)
    np.testing.assert_allclose(got, _per_row("reverse_kl", s, t), rtol=1e-12)
    perm = torch.tensor([3, 0, 4, 1, 2])  # relabelling classes leaves AKL unchanged
    np.testing.assert_allclose(_per_row("akl", s[:, perm], t[:, perm]), got, rtol=1e-12)


def test_akl_gradient_treats_weights_as_constants():
    s, t = _logits(14)
    s.requires_grad_()
    get_divergence("akl")(s, t, reduction="sum").backward()
    p_s, p_t = softmax(s.detach().numpy(), -1), softmax(t.numpy(), -1)
    ratio = _per_row("akl", s.detach(), t)
    fkl, rkl = _per_row("forward_kl", s.detach(), t), _per_row("reverse_kl", s.detach(), t)
    w_head = ((ratio - rkl) / (fkl - rkl))[:, None]  # recover the weight from the values
    g_fkl = p_s - p_t
    lr = log_softmax(s.detach().numpy(), -1) - log_softmax(t.numpy(), -1)
    g_rkl = p_s * (lr - rkl[:, None])
    np.testing.assert_allclose(s.grad.numpy(), w_head * g_fkl + (1 - w_head) * g_rkl, atol=1e-10)


def test_bdkd_weights_follow_entropy_gap():
    s, t = _logits(3)
    s[:3] *= 0.1  # flat students (high entropy) in the first half
    s[3:] *= 10.0  # sharp students in the second half
    lam = 3.0
    got = _per_row("bdkd", s, t, lam=lam)
    p_s, p_t = softmax(s.numpy(), -1), softmax(t.numpy(), -1)
    for i in range(N):
        fkl, rkl = entropy(p_t[i], p_s[i]), entropy(p_s[i], p_t[i])
        under = entropy(p_s[i]) > entropy(p_t[i])
        want = fkl + lam * rkl if under else lam * fkl + rkl
        np.testing.assert_allclose(got[i], want, rtol=1e-10)


def test_binary_kl_and_norm_match_closed_form():
    s, t = _logits(4)

    def bkl(pa, pb):  # sum_c KL(Bern(pa) || Bern(pb))
        return (pa * np.log(pa / pb) + (1 - pa) * np.log((1 - pa) / (1 - pb))).sum(-1)

    sn, tn = s.numpy(), t.numpy()
    np.testing.assert_allclose(
        _per_row("binary_kl", s, t, temperature=2.0),
        4.0 * bkl(expit(tn / 2), expit(sn / 2)),
        rtol=1e-10,
    )
    # BinaryKL-Norm as the DHKD authors' code computes it (distiller_zoo/BinaryKLNorm.py):
    # KL(Bern(1/2) || Bern(sigmoid((s - t) / T))) summed over classes, times T^2
    want = 4.0 * bkl(np.full_like(sn, 0.5), expit((sn - tn) / 2))
    np.testing.assert_allclose(
        _per_row("dual_head_binary_kl", s, t, temperature=2.0), want, rtol=1e-10
    )
    # zero only when the logits match exactly: a common shift is penalised (unlike softmax KL)
    assert np.abs(_per_row("dual_head_binary_kl", s, s.clone())).max() == 0.0
    assert (_per_row("dual_head_binary_kl", s, s + 1.0) > 0.1).all()


def test_dual_head_log_cosh_is_accurate_for_small_and_large_gaps():
    gaps = [1e-6, 1e-3, 0.5, 1.999, 2.0, 3.0, 40.0, 1e4]
    d = torch.tensor(gaps, dtype=torch.float64)
    s = torch.stack([d, torch.zeros_like(d)], -1)  # (8, 2): one class with gap d, one with 0
    with mpmath.workdps(50):  # log cosh(0) = 0 for the second class
        want = [float(mpmath.log(mpmath.cosh(mpmath.mpf(x) / 2))) for x in gaps]
    np.testing.assert_allclose(
        _per_row("dual_head_binary_kl", s, torch.zeros_like(s)), want, rtol=1e-12
    )
    np.testing.assert_allclose(
        _per_row("dual_head_binary_kl", -s, torch.zeros_like(s)), want, rtol=1e-12
    )


def test_dkd_decomposition_and_value():
    s, t = _logits(5)
    y = torch.arange(N) % C
    tckd, nckd = dkd_parts(s, t, y)
    p_t = softmax(t.numpy(), -1)
    p_s = softmax(s.numpy(), -1)
    gt = p_t[np.arange(N), y.numpy()]
    kd = [entropy(a, b) for a, b in zip(p_t, p_s)]
    # KD = TCKD + (1 - p_t,gt) NCKD (Zhao et al. 2022, eq. 1-3)
    np.testing.assert_allclose(tckd + (1 - torch.from_numpy(gt)) * nckd, kd, rtol=1e-10)
    # TCKD and NCKD from their definitions
    sg = p_s[np.arange(N), y.numpy()]
    want_t = [entropy([a, 1 - a], [b, 1 - b]) for a, b in zip(gt, sg)]
    np.testing.assert_allclose(tckd, want_t, rtol=1e-10)
    keep = ~np.eye(C, dtype=bool)[y.numpy()]
    want_n = [entropy(a[k] / a[k].sum(), b[k] / b[k].sum()) for a, b, k in zip(p_t, p_s, keep)]
    np.testing.assert_allclose(nckd, want_n, rtol=1e-10)
    got = get_divergence("dkd")(s, t, targets=y, alpha=2.0, beta=3.0, warmup=0.5, temperature=2.0)
    tckd2, nckd2 = dkd_parts(s / 2, t / 2, y)
    torch.testing.assert_close(got, (4 * 0.5 * (2 * tckd2 + 3 * nckd2)).mean())


def _mdistiller_dkd(s, t, y, alpha, beta, temperature):
    """dkd_loss of megvii-research/mdistiller (mdistiller/distillers/DKD.py), float64."""
    gt = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    b_s = torch.stack([p_s[gt], p_s[~gt].view(len(y), -1).sum(1)], 1)  # cat_mask
    b_t = torch.stack([p_t[gt], p_t[~gt].view(len(y), -1).sum(1)], 1)
    tckd = F.kl_div(b_s.log(), b_t, reduction="sum") * temperature**2 / len(y)
    p_t2 = F.softmax(t / temperature - 1000.0 * gt, 1)
    lp_s2 = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(lp_s2, p_t2, reduction="sum") * temperature**2 / len(y)
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller():
    s, t = _logits(5, scale=1.5)
    y = torch.arange(N) % C
    got = get_divergence("dkd")(s, t, targets=y, temperature=4.0)  # alpha 1, beta 8 defaults
    torch.testing.assert_close(got, _mdistiller_dkd(s, t, y, 1.0, 8.0, 4.0), rtol=1e-9, atol=0)


def _sinkd_reference(p_s: np.ndarray, p_t: np.ndarray, eps: float, n_iters: int) -> float:
    """The SinKD authors' sinkhorn_loss (2018cx/SinKD loss.py) in float64 numpy."""
    cost = np.abs(p_s[:, None, :] - p_t[None, :, :]).sum(-1)  # torch.cdist(p_s, p_t, p=1)
    plan = np.exp(-cost / eps)
    for _ in range(n_iters):
        plan = plan / plan.sum(1, keepdims=True)  # rows sum to 1
        plan = plan / plan.sum(0, keepdims=True)  # then columns sum to 1
    return float((plan * cost).sum())


@pytest.mark.parametrize("n_iters", [1, 20])
def test_sinkhorn_matches_authors_code_and_pot(n_iters):
    s, t = _logits(6, scale=1.0)
    eps = 0.1
    f = get_divergence("sinkhorn")
    p_s, p_t = softmax(s.numpy() / 2, -1), softmax(t.numpy() / 2, -1)
    want = 4.0 * _sinkd_reference(p_s, p_t, eps, n_iters)
    got_sum = f(s, t, eps=eps, n_iters=n_iters, temperature=2.0, reduction="sum")
    got_mean = f(s, t, eps=eps, n_iters=n_iters, temperature=2.0)
    np.testing.assert_allclose(got_sum.item(), want, rtol=1e-10)
    np.testing.assert_allclose(got_mean.item(), want / N, rtol=1e-10)
    # POT with the same number of sweeps: it scales columns first, so give it W^T
    cost = np.abs(p_s[:, None, :] - p_t[None, :, :]).sum(-1)
    a = np.full(N, 1.0 / N)
    plan = ot.sinkhorn(a, a, cost.T, eps, numItermax=n_iters, stopThr=0.0, warn=False).T
    np.testing.assert_allclose(got_mean.item(), 4.0 * (plan * cost).sum(), rtol=1e-10)


def test_sinkhorn_converged_matches_pot_sinkhorn2():
    s, t = _logits(6, n=11, scale=1.0)
    eps = 0.1
    got = get_divergence("sinkhorn")(s, t, eps=eps, n_iters=3000, temperature=2.0)
    p_s, p_t = softmax(s.numpy() / 2, -1), softmax(t.numpy() / 2, -1)
    cost = np.abs(p_s[:, None, :] - p_t[None, :, :]).sum(-1)
    a = np.full(11, 1.0 / 11)
    value = ot.sinkhorn2(a, a, cost, eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-14)
    np.testing.assert_allclose(got.item(), 4.0 * float(value), rtol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_zero_at_identical_distributions(name):
    s, _ = _logits(7)
    kw = _kwargs(name)
    value = get_divergence(name)(s, s.clone(), **kw)
    if name == "sinkhorn":  # entropic OT between a batch and itself: plan is not the identity
        assert value.item() >= 0.0
    else:
        assert abs(value.item()) < 1e-12


def test_js_symmetric_and_bounded():
    s, t = _logits(8, scale=30.0)  # near-disjoint supports push JS towards ln 2
    a = _per_row("js", s, t)
    b = _per_row("js", t, s)
    np.testing.assert_allclose(a, b, rtol=1e-10)
    assert (a <= math.log(2) + 1e-12).all() and (a >= 0).all()
    assert a.max() > 0.6


def test_skew_tends_to_kl():
    s, t = _logits(9)
    fkl, rkl = _per_row("forward_kl", s, t), _per_row("reverse_kl", s, t)
    np.testing.assert_allclose(_per_row("skew_kl", s, t, lam=0.0), fkl, rtol=1e-12)
    gaps = [np.abs(_per_row("skew_kl", s, t, lam=lam) - fkl).max() for lam in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3
    np.testing.assert_allclose(_per_row("skew_reverse_kl", s, t, lam=1e-9), rkl, rtol=1e-6)


def test_reduction_mask_ignore_index_and_leading_dims():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, 5, C, generator=g, dtype=torch.float64)  # (B, L, C) token logits
    t = torch.randn(2, 5, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (2, 5), generator=g)
    y[0, 1] = y[1, 4] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 0] = False
    f = get_divergence("forward_kl")
    rows = f(s, t, reduction="none")
    assert rows.shape == (2, 5)
    keep = (y != -100) & mask
    got = f(s, t, reduction="none", targets=y, mask=mask)
    torch.testing.assert_close(got, torch.where(keep, rows, 0.0))
    torch.testing.assert_close(f(s, t, targets=y, mask=mask), rows[keep].mean())
    torch.testing.assert_close(f(s, t, reduction="sum", targets=y), rows[y != -100].sum())
    dkd_rows = get_divergence("dkd")(s, t, targets=y, reduction="none")
    assert (dkd_rows[~(y != -100)] == 0).all() and (dkd_rows[y != -100] > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_at_extreme_logits(name):
    g = torch.Generator().manual_seed(11)
    s = (1e4 * torch.sign(torch.randn(N, C, generator=g))).requires_grad_()
    t = (1e4 * torch.sign(torch.randn(N, C, generator=g))).requires_grad_()
    value = get_divergence(name)(s, t, **_kwargs(name))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "akl"])
def test_gradcheck_student_and_teacher(name):
    s, t = _logits(12, n=4, c=5)
    s.requires_grad_()
    t.requires_grad_()  # online KD: the teacher gets gradients too, nothing is detached

    def fn(a, b):
        return get_divergence(name)(a, b, temperature=1.5, **_kwargs(name, 4, 5))

    assert torch.autograd.gradcheck(fn, (s, t))


def test_bad_inputs_raise_value_error():
    s, t = _logits(13)
    f = get_divergence("forward_kl")
    with pytest.raises(ValueError, match="same shape"):
        f(s, t[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        f(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        f(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="mask shape"):
        f(s, t, mask=torch.ones(N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets"):
        get_divergence("dkd")(s, t)
    with pytest.raises(ValueError, match="beta"):
        get_divergence("js")(s, t, beta=1.0)
    with pytest.raises(ValueError, match="lam"):
        get_divergence("skew_kl")(s, t, lam=1.0)
    with pytest.raises(ValueError, match="batch-wise"):
        get_divergence("sinkhorn")(s, t, reduction="none")


PER_ROW = [n for n in NAMES if getattr(get_divergence(n), "rows", None) is not None]


@pytest.mark.parametrize("name", PER_ROW)
def test_name_leads_to_its_def_and_paper(name):
    """Registry key == function name; the entry's location is its ``def``; the public signature
    is the module convention plus the definition's own hyperparameters."""
    fn = get_divergence(name)
    path, line = DIVERGENCES.location(name).rsplit(":", 1)
    assert path.endswith("core/losses/divergences.py") and fn.__name__ == name
    with open(path) as f:  # the location is the first decorator line above the def
        block = f.readlines()[int(line) - 1 : int(line) + 3]
    assert block[0].startswith("@DIVERGENCES.register(paper=")
    assert any(x.startswith(f"def {name}(") for x in block)
    assert DIVERGENCES.paper(name)
    params = list(inspect.signature(fn).parameters)
    common = ["student_logits", "teacher_logits", "temperature", "reduction", "mask"]
    assert params[:5] == common and params[5:7] == ["targets", "ignore_index"]
    own = [p for p in inspect.signature(fn.rows).parameters if p not in ("s", "t", "targets")]
    assert params[7:] == own


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("js", {"beta": 1.5}), ("js", {"beta": 0.0}), ("js", {"beta": float("nan")}),
        ("js", {"beta": True}), ("skew_kl", {"lam": 1.0}), ("skew_reverse_kl", {"lam": -0.1}),
        ("akl", {"mu": 0.0}), ("akl", {"mu": 1.01}), ("bdkd", {"lam": 0.0}),
        ("bdkd", {"lam": -1.0}), ("bdkd", {"lam": float("inf")}), ("dkd", {"alpha": -1.0}),
        ("dkd", {"beta": float("nan")}), ("dkd", {"warmup": 1.5}), ("sinkhorn", {"eps": 0.0}),
        ("sinkhorn", {"n_iters": 0}), ("forward_kl", {"temperature": "2"}),
    ],
)  # fmt: skip
def test_bad_hyperparameters_are_refused_by_name(name, hp):
    s, t = _logits(16)
    key = next(iter(hp))
    with pytest.raises((ValueError, TypeError), match=key):
        get_divergence(name)(s, t, **_kwargs(name), **hp)


def test_masked_class_in_one_model_only():
    """Teacher-only masked class: p = 0 adds nothing to forward KL (finite gradient); the
    reverse KL is infinite (the student puts mass where the teacher has none)."""
    s, t = _logits(17)
    t_m = t.clone()
    t_m[:, 0] = -math.inf
    s.requires_grad_()
    fkl = get_divergence("forward_kl")(s, t_m, reduction="none")
    p_t, p_s = softmax(t_m.numpy(), -1), softmax(s.detach().numpy(), -1)
    want = [entropy(a[1:], b[1:]) - np.log(b[1:].sum()) for a, b in zip(p_t, p_s)]
    np.testing.assert_allclose(fkl.detach().numpy(), want, rtol=1e-10)
    fkl.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert torch.isinf(get_divergence("reverse_kl")(s.detach(), t_m, reduction="none")).all()

"""Property tests over the public core API (hypothesis): losses, calibration metrics and
calibrators, entropy estimators under random shapes, dtypes, strides, masks and extreme
magnitudes. Every call either raises ValueError / TypeError whose message names the argument, or
matches a float64 reference computed independently (numpy, or torch in float64) on exactly the
values the input holds.

Runs under the derandomized "ci" profile of tests/conftest.py; sized for well under 90 s on 2 cores.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import digamma, gammaln, logsumexp

from core.calibration import CALIBRATORS
from core.calibration import metrics as M
from core.entropy import knn_entropy, matrix_renyi_entropy, shannon_entropy
from core.losses import get_loss

pytestmark = pytest.mark.usefixtures("one_thread")

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_EXP = {torch.float16: 4, torch.bfloat16: 30, torch.float32: 30, torch.float64: 30}


def _named(err: Exception, *names: str) -> bool:
    """The message names one of the arguments."""
    return re.search(r"\b(" + "|".join(map(re.escape, names)) + r")\b", str(err)) is not None


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in a contiguous, column-major or every-other-element layout."""
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float) -> bool:
    """out (computed in ``dtype``) vs the float64 reference rounded to ``dtype``: equal up to a
    dtype- and magnitude-scaled tolerance; NaN matches NaN, and a reference beyond the dtype's
    range matches an overflowed output."""
    out, ref = out.double(), ref.to(dtype).double()
    eps, big = torch.finfo(dtype).eps, torch.finfo(dtype).max
    tol = 64 * eps * (1 + scale) * (1 + ref.abs().nan_to_num(posinf=0.0))
    same = (out - ref).abs() <= tol
    nan = out.isnan() & ref.isnan()
    over = (ref.abs() > big / 8) & (out.abs() > big / 8)
    return bool((same | nan | over).all())


# ---------------------------------------------------------------------------------- losses

HARD_LOSSES = {  # name -> hyperparameter names (for the "names the argument" check)
    "ce": (),
    "comp_sum": ("tau",),
    "gce": ("q",),
    "mae": (),
    "adv_comp_sum": ("adv_logits", "rho", "nu", "tau"),
    "ldr_kl": ("lam", "margin"),
    "aldr_kl": ("lam0", "alpha", "margin", "grid", "lam_min"),
    "topk_svm": ("k", "margin"),
    "sce": ("alpha", "beta", "log_zero"),
    "spherical_zloss": ("a", "b"),
    "logz_penalty": ("coef",),
    "label_smoothing": ("smoothing",),
    "focal": ("gamma",),
    "focal_flsd53": ("threshold", "gammas"),
}
IGNORES = {n for n in HARD_LOSSES if n not in ("label_smoothing", "focal", "focal_flsd53")}
ARGS = ("logits", "targets", "reduction", "ignore_index")


@st.composite
def loss_inputs(draw):
    n, c = draw(st.integers(0, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(FLOATS))
    scale = 10.0 ** draw(st.integers(-3, MAX_EXP[dtype] if dtype != torch.float16 else 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    z = _layout(z, draw(st.sampled_from(["contiguous", "transposed", "strided"])))
    tdtype = draw(st.sampled_from(INTS))
    t = torch.randint(0, c, (n,), generator=g)
    if n and draw(st.booleans()) and tdtype not in (torch.uint8,):
        t[torch.rand(n, generator=g) < 0.4] = -100  # masked rows (ignore_index)
    if n and draw(st.integers(0, 9)) == 0:
        t[0] = c  # out of range
    return z, t.to(tdtype), float(z.double().abs().max()) if n else 0.0


@settings(max_examples=300)
@given(
    name=st.sampled_from(sorted(HARD_LOSSES)),
    data=loss_inputs(),
    red=st.sampled_from(["mean", "sum", "none"]),
)
def test_losses_answer_like_float64_or_refuse_by_name(name, data, red):
    z, t, scale = data
    fn = get_loss(name)
    extra = {"adv_logits": z + 0.25} if name == "adv_comp_sum" else {}
    extra64 = {"adv_logits": z.double() + 0.25} if extra else {}
    try:
        out = fn(z, t, reduction=red, **extra)
    except (ValueError, TypeError) as err:
        assert _named(err, *ARGS, *HARD_LOSSES[name]), err
        with pytest.raises(type(err)):  # the float64 call refuses the same input
            fn(z.double().contiguous(), t.long(), reduction=red, **extra64)
        return
    ref = fn(z.double().contiguous(), t.long(), reduction=red, **extra64)
    assert out.dtype == z.dtype and out.shape == ref.shape
    assert _close(out, ref, z.dtype, scale), (out, ref)
    if name == "ce":  # an independent peer: torch's cross-entropy in float64
        peer = F.cross_entropy(z.double(), t.long(), reduction=red, ignore_index=-100)
        assert _close(ref, peer, torch.float64, scale)


@settings(max_examples=150)
@given(name=st.sampled_from(sorted(HARD_LOSSES)), data=loss_inputs())
def test_loss_gradients_are_finite_wherever_the_loss_is(name, data):
    z, t, scale = data
    if z.dtype not in (torch.float32, torch.float64) or scale > 1e3:
        z = z.double().clamp(-1e3, 1e3)
    z = z.detach().requires_grad_()
    extra = {"adv_logits": z.detach() + 0.25} if name == "adv_comp_sum" else {}
    try:
        loss = get_loss(name)(z, t, reduction="sum", **extra)
    except (ValueError, TypeError):
        return
    if torch.isfinite(loss) and z.numel():
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grad).all(), (name, z, t, grad)


# Magnitudes within 1e-6..1e6: beyond that a valid value can overflow the float64 maths itself
# (rho = 1e-309 makes logits / rho infinite), which is float range, not argument checking.
HP_VALUES = st.one_of(
    st.floats(-1e6, 1e6, allow_subnormal=False).filter(lambda v: v == 0 or abs(v) >= 1e-6),
    st.integers(-5, 100),
    st.booleans(),
    st.sampled_from([math.nan, math.inf, -math.inf, 0, 1, -1, 0.5, "1", None]),
)


@settings(max_examples=300)
@given(
    case=st.sampled_from(
        [
            (n, hp)
            for n, hps in HARD_LOSSES.items()
            for hp in hps
            if hp not in ("adv_logits", "gammas")
        ]
    ),
    value=HP_VALUES,
)
def test_every_hyperparameter_is_accepted_with_a_finite_loss_or_refused_by_name(case, value):
    name, hp = case
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    t = torch.tensor([0, 1, 2, 3, 0])
    extra = {"adv_logits": z + 0.25} if name == "adv_comp_sum" else {}
    try:
        loss = get_loss(name)(z, t, **{hp: value}, **extra)
    except (ValueError, TypeError) as err:
        assert _named(err, hp), err
        return
    assert torch.isfinite(loss), (name, hp, value, loss)


# ------------------------------------------------------------------------ calibration metrics


def _np_bins(conf, hits, n_bins, binning):
    """(acc, conf, count) per non-empty bin, numpy float64. Equal width: the torchmetrics edges
    (linspace(0, 1, B + 1), right-closed search) with conf == 1 in an extra bin; equal mass:
    stable argsort split into B nearly equal chunks."""
    if binning == "equal_width":
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).numpy()
        idx = np.searchsorted(edges, conf, side="right") - 1
    else:
        idx = np.empty(len(conf), int)
        for b, chunk in enumerate(np.array_split(np.argsort(conf, kind="stable"), n_bins)):
            idx[chunk] = b
    out = []
    for b in np.unique(idx):
        m = idx == b
        out.append((hits[m].mean(), conf[m].mean(), m.sum()))
    return [np.array(v, dtype=np.float64) for v in zip(*out)]


def _np_metric(name, p, y, n_bins):
    n = len(y)
    conf, hits = p.max(1), (p.argmax(1) == y).astype(float)
    if name in ("expected_calibration_error", "maximum_calibration_error", "rms_calibration_error"):
        acc, cf, cnt = _np_bins(conf, hits, n_bins, "equal_width")
        gap = np.abs(acc - cf)
        return {
            "expected_calibration_error": (cnt / n * gap).sum(),
            "maximum_calibration_error": gap.max(),
            "rms_calibration_error": np.sqrt((cnt / n * gap**2).sum()),
        }[name]
    if name == "adaptive_calibration_error":
        acc, cf, cnt = _np_bins(conf, hits, n_bins, "equal_mass")
        return (cnt / n * np.abs(acc - cf)).sum()
    if name == "classwise_calibration_error":
        errs = []
        for c in range(p.shape[1]):
            acc, cf, cnt = _np_bins(p[:, c], (y == c).astype(float), n_bins, "equal_width")
            errs.append((cnt / n * np.abs(acc - cf)).sum())
        return np.mean(errs)
    if name == "debiased_l2_calibration_error":
        acc, cf, cnt = _np_bins(conf, hits, n_bins, "equal_width")
        keep = cnt >= 2
        total = (cnt / n * ((acc - cf) ** 2 - acc * (1 - acc) / np.maximum(cnt - 1, 1)))[keep]
        return math.sqrt(max(total.sum(), 0.0))
    if name == "brier_score":
        return ((p - np.eye(p.shape[1])[y]) ** 2).sum(1).mean()
    return -np.log(np.maximum(p[np.arange(n), y], 1e-12)).mean()  # negative_log_likelihood


METRICS = [
    "expected_calibration_error",
    "maximum_calibration_error",
    "rms_calibration_error",
    "adaptive_calibration_error",
    "classwise_calibration_error",
    "debiased_l2_calibration_error",
    "brier_score",
    "negative_log_likelihood",
]
BINNED = {m for m in METRICS if m.endswith("calibration_error")}


@st.composite
def metric_inputs(draw):
    n, c = draw(st.integers(0, 40)), draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    temp = 10.0 ** draw(st.integers(-2, 2))
    p = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * temp, 1)
    if n and c and draw(st.booleans()):
        p[: n // 3] = F.one_hot(torch.randint(0, c, (n // 3,), generator=g), c).double()
    if n and c and draw(st.integers(0, 14)) == 0:
        p[0, 0] = draw(st.sampled_from([float("nan"), -0.1, 1.5, float("inf")]))
    p = _layout(p.to(dtype), draw(st.sampled_from(["contiguous", "transposed", "strided"])))
    y = torch.randint(0, max(c, 1), (n,), generator=g)
    if n and draw(st.integers(0, 14)) == 0:
        y[-1] = c  # out of range
    n_bins = draw(st.one_of(st.integers(1, 20), st.sampled_from([0, -1, 2.5, True])))
    return p, y.to(draw(st.sampled_from(INTS))), n_bins


@settings(max_examples=400)
@given(name=st.sampled_from(METRICS), data=metric_inputs())
def test_calibration_metrics_match_numpy_float64_or_refuse_by_name(name, data):
    p, y, n_bins = data
    fn = getattr(M, name)
    kwargs = {"n_bins": n_bins} if name in BINNED else {}
    try:
        out = fn(p, y, **kwargs)
    except (ValueError, TypeError) as err:
        assert _named(err, "probs", "labels", "n_bins"), err
        return
    assert out.dtype == torch.promote_types(p.dtype, torch.float32)
    ref = _np_metric(name, p.double().numpy(), y.long().numpy(), n_bins)
    assert float(out) == pytest.approx(ref, abs=1e-6 if out.dtype == torch.float32 else 1e-10)


# ---------------------------------------------------------------------------- calibrators


@st.composite
def fit_inputs(draw):
    n, c = draw(st.integers(0, 30)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOATS))
    scale = 10.0 ** draw(st.integers(-3, MAX_EXP[dtype] if dtype != torch.float16 else 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g).to(draw(st.sampled_from(INTS)))
    return _layout(z, draw(st.sampled_from(["contiguous", "transposed"]))), y


def _nll64(logits: torch.Tensor, y: torch.Tensor) -> float:
    z = logits.double().numpy()
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), y.long().numpy()]))


@settings(max_examples=60)
@given(
    name=st.sampled_from(["temperature", "vector", "matrix", "histogram_binning", "isotonic"]),
    data=fit_inputs(),
)
def test_calibrators_fit_finite_maps_or_refuse_by_name(name, data):
    z, y = data
    cal = CALIBRATORS.build(name)
    try:
        cal.fit(z, y)
    except (ValueError, TypeError) as err:
        assert _named(err, "logits", "labels"), err
        return
    out = cal(z).detach()
    assert out.shape == z.shape and out.dtype == z.dtype and torch.isfinite(out).all()
    if name in ("temperature", "vector", "matrix"):
        # each fit minimises NLL (+ a penalty that is 0 at the identity map) from the identity
        slack = 1e-3 * (1 + _nll64(z, y)) + (
            0.05 if z.dtype in (torch.float16, torch.bfloat16) else 0
        )
        assert _nll64(out, y) <= _nll64(z, y) + slack
    else:  # log-probabilities of renormalised one-vs-rest scores
        sums = out.double().exp().sum(1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-2)


# ------------------------------------------------------------------------------- entropy


@st.composite
def entropy_logits(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    shape = (*shape[:-1], max(shape[-1], 1))
    dtype = draw(st.sampled_from(FLOATS))
    scale = 10.0 ** draw(st.integers(-3, MAX_EXP[dtype] if dtype != torch.float16 else 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()):
        z[torch.rand(shape, generator=g) < 0.3] = -math.inf  # masked classes
    return _layout(z.to(dtype), draw(st.sampled_from(["contiguous", "strided"]))), scale


@settings(max_examples=200)
@given(data=entropy_logits())
def test_shannon_entropy_matches_numpy(data):
    z, scale = data
    out = shannon_entropy(z)
    zz = z.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = logsumexp(zz, axis=-1, keepdims=True)
        logp = zz - lse
        p = np.exp(logp)
        ref = -np.where(p > 0, p * logp, 0.0).sum(-1)
        ref = np.where(np.isneginf(lse[..., 0]), np.nan, ref)  # a fully masked row has no p
    assert out.dtype == z.dtype and out.shape == z.shape[:-1]
    assert _close(out, torch.from_numpy(np.asarray(ref)), z.dtype, math.log(z.shape[-1]) + 1)


def _np_renyi(x: np.ndarray, alpha: float, sigma: float = 1.0) -> float:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * sigma**2))
    lam = np.clip(np.linalg.eigvalsh(k / np.trace(k)), 0, None)
    if alpha == 1:
        lam = lam[lam > 0]
        return float(-(lam * np.log(lam)).sum())
    return float(np.log((lam**alpha).sum()) / (1 - alpha))


@settings(max_examples=120)
@given(
    n=st.integers(0, 10),
    d=st.integers(0, 3),
    offset=st.sampled_from([0.0, 1.0, 1e3, 1e4]),
    alpha=st.sampled_from([0.5, 1.0, 1.01, 2.0, 0.0, -1.0, math.inf, math.nan]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_matrix_renyi_entropy_is_in_range_and_matches_numpy(n, d, offset, alpha, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    try:
        h = matrix_renyi_entropy(x, alpha=alpha).item()
    except (ValueError, TypeError) as err:
        assert _named(err, "x", "alpha"), err
        return
    ref = _np_renyi(x.double().numpy(), alpha)
    assert -1e-4 <= h <= math.log(n) + 1e-4
    assert h == pytest.approx(ref, abs=1e-3 if dtype == torch.float32 else 1e-8)


@settings(max_examples=150)
@given(
    n=st.integers(0, 25),
    d=st.integers(0, 3),
    exponent=st.integers(-200, 200),
    k=st.sampled_from([1, 2, 3, 0, True, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_knn_entropy_matches_a_brute_force_reference_at_any_scale(n, d, exponent, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 10.0**exponent
    try:
        h = knn_entropy(x, k=k)
    except (ValueError, TypeError) as err:
        assert _named(err, "x", "k"), err
        return
    # brute force on x / 10^exponent (pairwise differences; H(a x) = H(x) + d log a)
    u = x / 10.0**exponent
    dist = np.sqrt(((u[:, None] - u[None]) ** 2).sum(-1))
    eps = np.sort(dist, axis=1)[:, k]
    log_vd = d / 2 * np.log(np.pi) - gammaln(d / 2 + 1)
    ref = digamma(n) - digamma(k) + log_vd + d * np.log(eps).mean() + d * exponent * np.log(10)
    assert h == pytest.approx(ref, rel=1e-9, abs=1e-9)

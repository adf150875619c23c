"""Knowledge-distillation divergences between student and teacher logits.

Every function has the signature registered in ``DIVERGENCES``::

    f(student_logits, teacher_logits, *, temperature=1.0, reduction="mean",
      mask=None, targets=None, ignore_index=-100, **hparams)

Conventions shared by all of them:

- Logits are ``(..., C)``; leading dimensions are flattened to rows (tokens or samples).
- Distributions are ``softmax(logits / temperature)``, computed from ``log_softmax`` (never
  ``log(softmax)``), in float32 at least.
- **T^2 convention** (Hinton et al. 2015, arXiv:1503.02531): every divergence is multiplied by
  ``temperature**2`` so that its gradient magnitude does not shrink as ``1/T^2``.
- Rows are dropped by ``mask`` (bool, leading shape, True = keep) and/or by
  ``targets == ignore_index`` (token-level use). ``reduction="mean"`` averages over kept rows,
  ``"sum"`` sums them, ``"none"`` returns the per-row values (zero at dropped rows).
- Gradients flow to **both** arguments: the teacher is not detached here. For offline KD pass
  ``teacher_logits.detach()`` (or compute it under ``torch.no_grad``); online KD (e.g. BD-KD,
  where the teacher is trained too) relies on the teacher receiving gradients. Data-dependent
  weights (AKL head/tail weights, BD-KD entropy-gap weights) are treated as constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from core.losses._registry import DIVERGENCES

__all__ = [
    "akl",
    "akl_weights",
    "bdkd",
    "bdkd_weights",
    "binary_kl",
    "dkd",
    "dkd_parts",
    "dual_head_binary_kl",
    "forward_kl",
    "js",
    "reverse_kl",
    "sinkhorn",
    "skew_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "total_variation",
]

_REDUCTIONS = ("mean", "sum", "none")


# --- shared plumbing -----------------------------------------------------------------------


def _rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str,
    mask: torch.Tensor | None,
    targets: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate, flatten to (N, C), scale by 1/T, upcast; return (s, t, keep, targets_kept)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.ndim < 1 or student_logits.shape[-1] < 2:
        raise ValueError(f"logits must be (..., C) with C >= 2, got {tuple(student_logits.shape)}")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lead = student_logits.shape[:-1]
    c = student_logits.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.reshape(-1, c).to(dtype) / temperature  # (N, C)
    t = teacher_logits.reshape(-1, c).to(dtype) / temperature  # (N, C)
    keep = None
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the leading shape {tuple(lead)}"
            )
        keep = mask.reshape(-1).to(torch.bool)
    if targets is not None:
        if targets.shape != lead:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal the leading shape {tuple(lead)}"
            )
        targets = targets.reshape(-1)
        valid = targets != ignore_index
        keep = valid if keep is None else keep & valid
    if keep is not None:
        s, t = s[keep], t[keep]
        targets = targets[keep] if targets is not None else None
    return s, t, keep, targets


def _reduce(
    per_row: torch.Tensor, keep: torch.Tensor | None, lead: torch.Size, reduction: str
) -> torch.Tensor:
    """Reduce per kept-row values (n,) to a scalar, or scatter them back to ``lead`` for "none"."""
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    if keep is None:
        return per_row.reshape(lead)
    full = per_row.new_zeros(keep.shape[0])
    return full.masked_scatter(keep, per_row).reshape(lead)


def _make(
    name: str, per_row: Callable[..., torch.Tensor], doc: str, needs_targets: bool = False
) -> Callable[..., torch.Tensor]:
    """Build and register the public function ``name`` from a per-row kernel on log-probs."""

    def divergence(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        **hparams: float,
    ) -> torch.Tensor:
        if needs_targets and targets is None:
            raise ValueError(f"{name} needs class targets: pass targets=(...) int64 labels")
        s, t, keep, tg = _rows(
            student_logits, teacher_logits, temperature, reduction, mask, targets, ignore_index
        )
        extra = {"targets": tg} if needs_targets else {}
        values = per_row(s, t, **extra, **hparams) * temperature**2  # (n,)
        return _reduce(values, keep, student_logits.shape[:-1], reduction)

    divergence.__name__ = divergence.__qualname__ = name
    divergence.__doc__ = doc
    return DIVERGENCES.register(name, divergence)


def _check_open_unit(name: str, value: float, low_closed: bool = False) -> None:
    ok = (0.0 <= value < 1.0) if low_closed else (0.0 < value < 1.0)
    if not ok:
        interval = "[0, 1)" if low_closed else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (N, C) -> (N,)."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q) from log-probabilities, stably; w in [0, 1)."""
    if w == 0.0:
        return lq
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


# --- per-row kernels on scaled logits s, t (N, C) -> (N,) -----------------------------------


def _forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _kl_rows(F.log_softmax(t, -1), F.log_softmax(s, -1))


def _reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _kl_rows(F.log_softmax(s, -1), F.log_softmax(t, -1))


def _symmetric_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _kl_rows(lt, ls) + _kl_rows(ls, lt)


def _js(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    _check_open_unit("beta", beta)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = _log_mix(lt, ls, beta)  # log(beta p_t + (1 - beta) p_s)
    return beta * _kl_rows(lt, lm) + (1.0 - beta) * _kl_rows(ls, lm)


def _total_variation(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1)


def _skew_kl(s: torch.Tensor, t: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    _check_open_unit("lam", lam, low_closed=True)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _kl_rows(lt, _log_mix(lt, ls, lam))  # KL(p_t || lam p_t + (1-lam) p_s)


def _skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    _check_open_unit("lam", lam, low_closed=True)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _kl_rows(ls, _log_mix(ls, lt, lam))  # KL(p_s || lam p_s + (1-lam) p_t)


def akl_weights(ls: torch.Tensor, lt: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL (head, tail) weights (N,) from log-probs ls, lt (N, C), as constants (no gradient).

    L1 gaps on the teacher's head (cumulative mass up to mu) and tail. Wu et al. 2024, arXiv:2404.02657.
    """
    with torch.no_grad():
        p_t, idx = lt.exp().sort(-1, descending=True)  # (N, C) teacher sorted
        p_s = ls.exp().gather(-1, idx)  # the SAME permutation for the student
        tail = p_t.cumsum(-1) > mu
        tail[:, 0] = False  # the top class is always head
        gap = (p_t - p_s).abs()
        g_head = gap.masked_fill(tail, 0.0).sum(-1)
        g_tail = gap.masked_fill(~tail, 0.0).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), 0.5)
    return w_head, 1.0 - w_head


def _akl(s: torch.Tensor, t: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must lie in (0, 1], got {mu!r}")
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    w_head, w_tail = akl_weights(ls, lt, mu)
    return w_head * _kl_rows(lt, ls) + w_tail * _kl_rows(ls, lt)


def bdkd_weights(
    ls: torch.Tensor, lt: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-KD (forward, reverse) weights (N,) from the entropy gap H(p_s) - H(p_t), as constants.

    ls, lt (N, C) log-probs. Amara et al. 2022, arXiv:2212.12965 (rule unverified: see ``bdkd``).
    """
    with torch.no_grad():
        gap = -(ls.exp() * ls).sum(-1) + (lt.exp() * lt).sum(-1)  # H_s - H_t, (N,)
        under = gap > 0  # student less confident than the teacher -> stress mode-seeking RKL
        w_fwd = torch.where(under, 1.0, lam).to(ls.dtype)
        w_rev = torch.where(under, lam, 1.0).to(ls.dtype)
    return w_fwd, w_rev


def _bdkd(s: torch.Tensor, t: torch.Tensor, lam: float = 2.0) -> torch.Tensor:
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    w_fwd, w_rev = bdkd_weights(ls, lt, lam)
    return w_fwd * _kl_rows(lt, ls) + w_rev * _kl_rows(ls, lt)


def _binary_kl_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_c KL(Bern(sigmoid t_c) || Bern(sigmoid s_c)) from logits, via logsigmoid (N,)."""
    lt1, lt0 = F.logsigmoid(t), F.logsigmoid(-t)
    ls1, ls0 = F.logsigmoid(s), F.logsigmoid(-s)
    return (lt1.exp() * (lt1 - ls1) + lt0.exp() * (lt0 - ls0)).sum(-1)


def _binary_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _binary_kl_rows(s, t)


def _log_cosh_half(x: torch.Tensor) -> torch.Tensor:
    """log cosh(x / 2) elementwise, accurate near 0 and finite at +-1e4 (with its gradient)."""
    a = x.abs()
    small = torch.log1p(2.0 * torch.sinh(a.clamp(max=2.0) / 4) ** 2)  # cosh y = 1 + 2 sinh^2(y/2)
    large = a / 2 + torch.log1p(torch.exp(-a)) - math.log(2.0)
    return torch.where(a < 2.0, small, large)


def _dual_head_binary_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # BinaryKL-Norm: sum_c KL(Bern(1/2) || Bern(sigmoid(s_c - t_c))) = sum_c log cosh((s_c - t_c)/2)
    return _log_cosh_half(s - t).sum(-1)


def dkd_parts(
    s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD) per row from *scaled* logits s, t (N, C) and targets (N,), no T^2.

    TCKD = KL([p_t,gt, 1 - p_t,gt] || [p_s,gt, 1 - p_s,gt]); NCKD = KL over the non-target
    classes renormalised. Identity: KL(p_t || p_s) = TCKD + (1 - p_t,gt) NCKD.
    Zhao et al. 2022, "Decoupled Knowledge Distillation", arXiv:2203.08679.
    """
    n, c = s.shape
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != (n,):
        raise ValueError(
            f"targets must be int labels of shape ({n},), got {targets.dtype} {tuple(targets.shape)}"
        )
    if n and (targets.min() < 0 or targets.max() >= c):
        raise ValueError(f"targets must lie in [0, {c}) apart from ignore_index")
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    gt = F.one_hot(targets.long(), c).bool()  # (N, C)
    ls_nt, lt_nt = ls[~gt].view(n, c - 1), lt[~gt].view(n, c - 1)  # non-target log-probs
    ls_b = torch.stack([ls[gt], ls_nt.logsumexp(-1)], -1)  # (N, 2): log p_gt, log(1 - p_gt)
    lt_b = torch.stack([lt[gt], lt_nt.logsumexp(-1)], -1)
    nckd = _kl_rows(F.log_softmax(lt_nt, -1), F.log_softmax(ls_nt, -1))
    return _kl_rows(lt_b, ls_b), nckd


def _dkd(
    s: torch.Tensor,
    t: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    warmup: float = 1.0,
) -> torch.Tensor:
    tckd, nckd = dkd_parts(s, t, targets)
    return warmup * (alpha * tckd + beta * nckd)


# --- registered per-row divergences --------------------------------------------------------

forward_kl = _make(
    "forward_kl",
    _forward_kl,
    """Forward KL(p_t || p_s) * T^2 per row (N, C) -> reduced. Hinton et al. 2015, arXiv:1503.02531.""",
)
reverse_kl = _make(
    "reverse_kl",
    _reverse_kl,
    """Reverse KL(p_s || p_t) * T^2 (mode-seeking). Gu et al. 2024 (MiniLLM), arXiv:2306.08543.""",
)
symmetric_kl = _make(
    "symmetric_kl",
    _symmetric_kl,
    """Jeffreys divergence KL(p_t || p_s) + KL(p_s || p_t), times T^2; (N, C) -> reduced.
    Jeffreys 1946, "An invariant form for the prior probability in estimation problems".""",
)
js = _make(
    "js",
    _js,
    """Generalised Jensen-Shannon, ``beta`` in (0, 1) (default 0.5), times T^2.

    JS_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s;
    at beta = 0.5 it is symmetric and bounded by ln 2. Agarwal et al. 2024 (GKD), arXiv:2306.13649.
    """,
)
total_variation = _make(
    "total_variation",
    _total_variation,
    """Total variation 0.5 * sum |p_t - p_s| * T^2; (N, C) -> reduced. Wen et al. 2023 (f-DISTILL).""",
)
skew_kl = _make(
    "skew_kl",
    _skew_kl,
    """Skew KL(p_t || lam p_t + (1 - lam) p_s) * T^2, ``lam`` in [0, 1) (default 0.1; 0 -> KL).

    The teacher is mixed into the student side, as in ``skewed_forward_kl`` of the authors'
    code (github.com/jongwooko/distillm distillm/losses.py, lam 0.1), which drops the constant
    teacher entropy (same gradients). Ko et al. 2024, "DistiLLM: Towards Streamlined
    Distillation for Large Language Models" (ICML 2024, arXiv:2402.03898), its skew KL (SKL).
    """,
)
skew_reverse_kl = _make(
    "skew_reverse_kl",
    _skew_reverse_kl,
    """Skew reverse KL(p_s || lam p_s + (1 - lam) p_t) * T^2, ``lam`` in [0, 1) (default 0.1).

    The student is mixed into the teacher side, as in ``skewed_reverse_kl`` of
    github.com/jongwooko/distillm distillm/losses.py (lam 0.1). Ko et al. 2024 (DistiLLM,
    ICML 2024, arXiv:2402.03898), its skew reverse KL (SRKL).
    """,
)
akl = _make(
    "akl",
    _akl,
    """Adaptive KL: w_head FKL + w_tail RKL per row, times T^2; ``mu`` = head mass (default 0.5).

    Teacher probabilities are sorted descending and the student's are gathered with the SAME
    permutation; the head is the top classes until the teacher's cumulative mass exceeds mu
    (the top class always counts as head); w_head = g_head / (g_head + g_tail) with g the L1
    gaps |p_t - p_s| of each part (constants, no gradient). Checked against the authors'
    ``get_ratio`` / ``AKL`` in github.com/wutaiqiang/LLM_KD_AKL AKL.py (mu 0.5, head weight on
    FKL, tail weight on RKL). Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in
    Knowledge Distillation for Large Language Models", arXiv:2404.02657.
    """,
)
bdkd = _make(
    "bdkd",
    _bdkd,
    """BD-KD student divergence: per-sample weighting of forward and reverse KL, times T^2.

    With gap = H(p_s) - H(p_t): gap > 0 (student under-confident) -> KL(p_t||p_s) +
    lam KL(p_s||p_t) (stress mode-seeking RKL); otherwise lam KL(p_t||p_s) + KL(p_s||p_t).
    Weights are constants. Online KD: pass a teacher that requires grad to train it too.
    UNVERIFIED rule. Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge
    Distillation", arXiv:2212.12965: only the abstracts could be read here, not the equations
    nor any code. v2 (2024): "sample-wise weighting of forward and reverse Kullback-Leibler
    divergence", adjusting "both the student and teacher losses"; v1 (2022): the balancing is
    done "at the level of the student distillation loss". That the weights follow the
    teacher/student entropy gap, and that the teacher keeps reverse KL, come from a third-party
    summary of the paper. The hard switch, which KL gets lam, and lam = 2 are this module's
    reading (RKL sharpens an under-confident student, FKL softens an over-confident one).
    """,
)
binary_kl = _make(
    "binary_kl",
    _binary_kl,
    """Logit-level binary KL: sum_c KL(Bern(sigmoid(z_t,c/T)) || Bern(sigmoid(z_s,c/T))) * T^2.

    Matches github.com/penghui-yang/DHKD distiller_zoo/BinaryKL.py (sum over classes, mean over
    rows, T^2; they use T = 2). Yang et al. 2024, "Dual-Head Knowledge Distillation",
    arXiv:2411.08937 (its BinaryKL loss).
    """,
)
dual_head_binary_kl = _make(
    "dual_head_binary_kl",
    _dual_head_binary_kl,
    """Dual-Head KD's BinaryKL-Norm: sum_c KL(Bern(1/2) || Bern(sigmoid((z_s,c - z_t,c)/T))) * T^2.

    Per class this is log cosh((z_s,c - z_t,c) / 2T): zero iff the logits match exactly (not
    up to a shift), gradient (sigmoid(d) - 1/2) / T, bounded. Checked against the authors' code,
    github.com/penghui-yang/DHKD distiller_zoo/BinaryKLNorm.py (sum over classes, mean over
    rows, T^2; they use T = 2). Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing
    Logits Utilization with an Auxiliary Head", arXiv:2411.08937 (the loss of the auxiliary head).
    """,
)
dkd = _make(
    "dkd",
    _dkd,
    """Decoupled KD: warmup * (alpha TCKD + beta NCKD) * T^2; ``targets`` (N,) are REQUIRED.

    Defaults alpha 1, beta 8 (CIFAR); ``warmup`` is the caller's min(epoch / warmup_epochs, 1)
    (20 epochs on CIFAR, with T = 4). The CE term of the paper's loss is not included. Same
    value as ``dkd_loss`` in github.com/megvii-research/mdistiller mdistiller/distillers/DKD.py
    (NCKD not scaled by 1 - p_t,gt, T^2 on both parts, mean over rows). Zhao et al. 2022,
    "Decoupled Knowledge Distillation" (CVPR 2022, arXiv:2203.08679): its decomposition
    KD = TCKD + (1 - p_t,gt) NCKD and the loss alpha TCKD + beta NCKD.
    """,
    needs_targets=True,
)


# --- batch-wise Sinkhorn (not per row) -----------------------------------------------------


@DIVERGENCES.register("sinkhorn")
def sinkhorn(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    eps: float = 0.1,
    n_iters: int = 20,
) -> torch.Tensor:
    """SinKD's batch-wise Sinkhorn distance <P, W> * T^2 between the student and teacher batches.

    W (B, B) holds the L1 distances ||p_s,i - p_t,j||_1 between student row i and teacher
    row j (p = softmax(z / T)); K = exp(-W / eps); P is K after ``n_iters`` Sinkhorn sweeps,
    each scaling the rows then the columns (log domain here). As in the authors' code
    (github.com/2018cx/SinKD loss.py, ``sinkhorn_loss``: eps 0.1, 20 sweeps, rows then
    columns, each normalised to sum 1), ``reduction="sum"`` returns sum(P * W) for that
    doubly stochastic P (each sample carries mass 1); ``"mean"`` divides by B, i.e. the
    entropic OT cost between the two batches as uniform measures (marginals 1/B, what POT's
    ``ot.sinkhorn(a, b, W, eps)`` computes). "none" is refused: the value is a batch scalar.
    The authors' code takes T = 2 and a constant weight 0.002 with no T^2; T^2 here is this
    module's convention, the weight is the caller's. Gradients flow through the iterations.
    Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"
    (COLING 2024, arXiv:2402.17110), its batch-wise reformulation; equations not checked.
    """
    if reduction == "none":
        raise ValueError("sinkhorn is batch-wise: reduction='none' has no per-row value")
    if not eps > 0 or int(n_iters) < 1:
        raise ValueError(f"need eps > 0 and n_iters >= 1, got eps={eps!r}, n_iters={n_iters!r}")
    s, t, _, _ = _rows(
        student_logits, teacher_logits, temperature, reduction, mask, targets, ignore_index
    )
    b = s.shape[0]
    if b == 0:
        return s.sum() * 0.0
    cost = torch.cdist(F.softmax(s, -1), F.softmax(t, -1), p=1)  # (B, B) L1 distances
    log_k = -cost / eps
    log_marginal = -math.log(b)
    u = cost.new_zeros(b)
    v = cost.new_zeros(b)
    for _ in range(int(n_iters)):
        u = log_marginal - (log_k + v[None, :]).logsumexp(1)
        v = log_marginal - (log_k + u[:, None]).logsumexp(0)
    plan = (log_k + u[:, None] + v[None, :]).exp()  # (B, B), rows and columns sum to 1/B
    total = (plan * cost).sum() * temperature**2
    return total * b if reduction == "sum" else total

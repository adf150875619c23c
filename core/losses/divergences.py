"""Knowledge-distillation divergences between student and teacher logits.

Each per-row divergence is one ``def`` holding its maths on scaled logits s, t (N, C) -> (N,),
its hyperparameters checked at its top; ``@per_row`` makes it the public function

    f(student_logits, teacher_logits, *, temperature=1.0, reduction="mean",
      mask=None, targets=None, ignore_index=-100, **hyperparameters)

Conventions shared by all of them:

- Logits are ``(..., C)``; leading dimensions are flattened to rows (tokens or samples).
- Distributions are ``softmax(logits / temperature)``, computed from ``log_softmax`` (never
  ``log(softmax)``), in float32 at least.
- **T^2 convention** (Hinton et al. 2015, arXiv:1503.02531): every divergence is multiplied by
  ``temperature**2`` so that its gradient magnitude does not shrink as ``1/T^2``.
- Rows are dropped by ``mask`` (bool, leading shape, True = keep) and/or by
  ``targets == ignore_index`` (token-level use). ``reduction="mean"`` averages over kept rows,
  ``"sum"`` sums them, ``"none"`` returns the per-row values (zero at dropped rows).
- **Masked classes**: a logit of -inf (a padded or masked vocabulary entry) is a probability of
  0 and adds 0 to every divergence (0 log 0 = 0); masked in both models, its gradient is 0 too.
- Gradients flow to **both** arguments: the teacher is not detached here. For offline KD pass
  ``teacher_logits.detach()`` (or compute it under ``torch.no_grad``); online KD (e.g. BD-KD,
  where the teacher is trained too) relies on the teacher receiving gradients. Data-dependent
  weights (AKL head/tail weights, BD-KD entropy-gap weights) are treated as constants.
- **Fused**: ``core.losses.linear_kd_loss`` runs the same per-row maths chunk by chunk and
  differentiates it by autograd; where a hand-written in-place closed form is measurably faster
  it sits beside the definition (``@per_row(closed_form=...)``) and is tested against it.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F

from core.losses._registry import DIVERGENCES
from kernels.vocab_parallel import (
    active,
    log_softmax,
    row_logsumexp,
    row_max,
    row_sum,
    softmax,
)
from kernels.vocab_parallel import log_softmax_ as _log_softmax_

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
    "per_row",
    "reverse_kl",
    "sinkhorn",
    "skew_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "total_variation",
]

_REDUCTIONS = ("mean", "sum", "none")
_INF = math.inf


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
    _check_range("temperature", temperature, 0.0, _INF)
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


_PUBLIC = [
    inspect.Parameter("student_logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("teacher_logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
] + [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    for name, default in (
        ("temperature", 1.0),
        ("reduction", "mean"),
        ("mask", None),
        ("targets", None),
        ("ignore_index", -100),
    )
]


def per_row(
    rows: Callable[..., torch.Tensor] | None = None,
    *,
    closed_form: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    buffers: int | None = None,
):
    """Make ``rows(s, t, [targets,] **hyperparameters) -> (N,)`` (scaled logits (N, C)) the
    public divergence f(student_logits, teacher_logits, *, temperature, reduction, mask, targets,
    ignore_index, **hyperparameters) of the module conventions.

    The result keeps ``rows`` as ``.rows`` for the fused loss, with an optional hand-written
    ``closed_form(s, t, **hp) -> (values (k,), d sum(values) / d s (k, C))`` that may overwrite
    s and t, and ``buffers``: the (k, C) buffers alive at the fused form's peak (the closed
    form's, else autograd's over ``rows``), both logit chunks included; None: the kernel's
    conservative default.
    """
    if rows is None:
        return functools.partial(per_row, closed_form=closed_form, buffers=buffers)
    params = inspect.signature(rows).parameters
    needs_targets = "targets" in params
    hyper = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in params.items()
        if name not in ("s", "t", "targets")
    ]

    @functools.wraps(rows)
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
            raise ValueError(f"{rows.__name__} needs class targets: pass targets=(...) int labels")
        s, t, keep, tg = _rows(
            student_logits, teacher_logits, temperature, reduction, mask, targets, ignore_index
        )
        extra = {"targets": tg} if needs_targets else {}
        values = rows(s, t, **extra, **hparams) * temperature**2  # (n,)
        return _reduce(values, keep, student_logits.shape[:-1], reduction)

    divergence.__signature__ = inspect.Signature(_PUBLIC + hyper, return_annotation=torch.Tensor)
    divergence.rows, divergence.needs_targets = rows, needs_targets
    divergence.closed_form, divergence.closed_form_buffers = closed_form, buffers
    return divergence


def _check_range(
    name: str, value: float, low: float, high: float, low_closed=False, high_closed=False
) -> None:
    """A real ``value`` in the interval, else a TypeError/ValueError naming ``name`` and it."""
    interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    if not (above and below):
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def _kl_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise from log-probabilities; 0 where p = 0 (0 log 0 = 0)."""
    return lp.exp() * torch.where(lp == -_INF, 0.0, lp - lq)


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (N, C) -> (N,)."""
    return row_sum(_kl_terms(lp, lq))


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q) from log-probabilities, stably; w in [0, 1). Where p = q = 0 it is
    -inf, computed from zeros so that its (unused) gradient is not NaN."""
    if w == 0.0:
        return lq
    a, b = lp + math.log(w), lq + math.log1p(-w)
    both = (a == -_INF) & (b == -_INF)
    mixed = torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b))
    return torch.where(both, -_INF, mixed)


def _log_mix_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from probabilities a, b into ``out`` (floored at the smallest
    normal number, where both underflow and the term's weight is 0 anyway)."""
    torch.mul(b, 1.0 - w, out=out).add_(a, alpha=w)
    return out.clamp_min_(torch.finfo(out.dtype).tiny).log_()


def _probabilities_(s: torch.Tensor, t: torch.Tensor):
    """(log q, log p, q, p) from scaled logits; the log-probabilities in place of s and t."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    return ls, lt, ls.exp(), lt.exp()


def _fkl_rkl(ls, lt, q, p):
    """(FKL, RKL, dFKL/ds, dRKL/ds) per row from log-probabilities and probabilities."""
    d = ls - lt  # (k, C)
    fkl = -row_sum(p * d)
    rkl = row_sum(q * d)
    return fkl, rkl, q - p, d.sub_(rkl[:, None]).mul_(q)


# --- per-row divergences on scaled logits s, t (N, C) -> (N,), with closed forms -----------
# A closed form (s, t, **hp) -> (values, d sum(values) / d s) works in place on the chunk's two
# logit buffers; d/ds_k sum_j f(q_j) = q_k (g_k - sum_j q_j g_j), g = df/dq, q = softmax(s).
# It is exact for finite logits; a row it returns non-finite (a -inf, masked class) the fused
# loss recomputes through the definition, which follows the masked-class convention.


def _forward_kl_fused(s, t):
    """FKL in place (one extra buffer): loss, d/ds = q - p."""
    s.sub_(row_max(s, keepdim=True))
    t.sub_(row_max(t, keepdim=True))
    p = t.exp()  # (k, C) unnormalised teacher probabilities
    z_t = row_sum(p)
    cross = row_sum(t.sub_(s).mul_(p))  # sum_j e^t_j (t_j - s_j), shifted logits
    z_s = row_sum(s.exp_())  # s <- unnormalised student probabilities
    loss = cross / z_t - z_t.log() + z_s.log()
    g = s.mul_(z_s.reciprocal()[:, None]).sub_(p.mul_(z_t.reciprocal()[:, None]))
    return loss, g


@DIVERGENCES.register(paper="Hinton et al. 2015, arXiv:1503.02531")
@per_row(closed_form=_forward_kl_fused, buffers=3)
def forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_t || p_s) * T^2 per row (N, C) -> reduced. Hinton et al. 2015, arXiv:1503.02531."""
    return _kl_rows(log_softmax(t), log_softmax(s))


def _reverse_kl_fused(s, t):
    """RKL in place: loss, d/ds = q (log q/p - RKL)."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    d = lt.neg_().add_(ls)  # (k, C) log q - log p, in t
    q = ls.exp_()  # in s
    qd = d.mul_(q)
    rkl = row_sum(qd)
    return rkl, qd.addcmul_(q, rkl[:, None], value=-1.0)


@DIVERGENCES.register(paper="Gu et al. 2024 (MiniLLM), arXiv:2306.08543")
@per_row(closed_form=_reverse_kl_fused, buffers=3)
def reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Reverse KL(p_s || p_t) * T^2 (mode-seeking). Gu et al. 2024 (MiniLLM), arXiv:2306.08543."""
    return _kl_rows(log_softmax(s), log_softmax(t))


def _symmetric_kl_fused(s, t):
    fkl, rkl, gf, gr = _fkl_rkl(*_probabilities_(s, t))
    return fkl + rkl, gf.add_(gr)


@DIVERGENCES.register(paper="Jeffreys 1946, Proc. R. Soc. A 186:453")
@per_row(closed_form=_symmetric_kl_fused, buffers=6)
def symmetric_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Jeffreys divergence KL(p_t || p_s) + KL(p_s || p_t), times T^2; (N, C) -> reduced.
    Jeffreys 1946, "An invariant form for the prior probability in estimation problems"."""
    ls, lt = log_softmax(s), log_softmax(t)
    return _kl_rows(lt, ls) + _kl_rows(ls, lt)


def _js_fused(s, t, beta: float = 0.5):
    """Generalised JS in place (three extra buffers):
    d/ds = (1 - beta) q (log(q/m) - <q, log(q/m)>), m = beta p + (1 - beta) q."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    m = p.mul(beta).add_(q, alpha=1 - beta)  # (k, C); 0 only where p and q underflow
    lm = m.clamp_min_(torch.finfo(m.dtype).tiny).log_()
    fwd = row_sum(lt.sub_(lm).mul_(p))  # KL(p || m); t is scratch from here on
    r = ls.sub_(lm)  # log(q / m), in s
    rev = row_sum(torch.mul(r, q, out=t))  # KL(q || m)
    return beta * fwd + (1 - beta) * rev, r.sub_(rev[:, None]).mul_(q).mul_(1 - beta)


@DIVERGENCES.register(paper="Agarwal et al. 2024 (GKD), arXiv:2306.13649")
@per_row(closed_form=_js_fused, buffers=5)
def js(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon, ``beta`` in (0, 1) (default 0.5), times T^2.

    JS_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s;
    at beta = 0.5 it is symmetric and bounded by ln 2. Agarwal et al. 2024 (GKD), arXiv:2306.13649.
    """
    _check_range("beta", beta, 0.0, 1.0)
    ls, lt = log_softmax(s), log_softmax(t)
    lm = _log_mix(lt, ls, beta)  # log(beta p_t + (1 - beta) p_s)
    return beta * _kl_rows(lt, lm) + (1.0 - beta) * _kl_rows(ls, lm)


def _total_variation_fused(s, t):
    _, _, q, p = _probabilities_(s, t)
    diff = q - p
    loss = 0.5 * row_sum(diff.abs())
    g = diff.sign_().mul_(0.5)  # d/dq of 0.5 |q - p|, taken through the softmax below
    return loss, g.sub_(row_sum(q * g, keepdim=True)).mul_(q)


@DIVERGENCES.register(paper="Wen et al. 2023 (f-DISTILL), arXiv:2307.15190")
@per_row(closed_form=_total_variation_fused, buffers=6)
def total_variation(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Total variation 0.5 * sum |p_t - p_s| * T^2; (N, C) -> reduced. Wen et al. 2023 (f-DISTILL)."""
    return 0.5 * row_sum((softmax(t) - softmax(s)).abs())


def _skew_kl_fused(s, t, lam: float = 0.1):
    """Skew KL(p || m), m = lam p + (1 - lam) q, in place (two extra buffers).
    d/dq_j = -(1 - lam) p_j / m_j, taken through the softmax. m is mixed from probabilities,
    so lam = 0 (forward KL, where m = q may underflow) takes the forward KL's closed form."""
    if lam == 0.0:
        return _forward_kl_fused(s, t)
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    lm = _log_mix_(s, p, q, lam)  # log m, in s (log q is no longer needed)
    r = lt.sub_(lm)  # log(p / m), in t
    loss = row_sum(torch.mul(p, r, out=s))
    g = r.exp_().mul_(-(1.0 - lam))  # -(1 - lam) p / m, in t
    dot = row_sum(torch.mul(q, g, out=s))
    return loss, g.sub_(dot[:, None]).mul_(q)


@DIVERGENCES.register(paper="Ko et al. 2024 (DistiLLM, ICML 2024), arXiv:2402.03898")
@per_row(closed_form=_skew_kl_fused, buffers=4)
def skew_kl(s: torch.Tensor, t: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Skew KL(p_t || lam p_t + (1 - lam) p_s) * T^2, ``lam`` in [0, 1) (default 0.1; 0 -> KL).

    The teacher is mixed into the student side, as in ``skewed_forward_kl`` of the authors'
    code (github.com/jongwooko/distillm distillm/losses.py, lam 0.1), which drops the constant
    teacher entropy (same gradients). Ko et al. 2024, "DistiLLM: Towards Streamlined
    Distillation for Large Language Models" (ICML 2024, arXiv:2402.03898), its skew KL (SKL).
    """
    _check_range("lam", lam, 0.0, 1.0, low_closed=True)
    ls, lt = log_softmax(s), log_softmax(t)
    return _kl_rows(lt, _log_mix(lt, ls, lam))  # KL(p_t || lam p_t + (1-lam) p_s)


def _skew_reverse_kl_fused(s, t, lam: float = 0.1):
    """Skew KL(q || m), m = lam q + (1 - lam) p, in place (two extra buffers).
    d/dq_j = log(q_j / m_j) - lam q_j / m_j (+1, which the softmax removes); lam = 0 takes the
    reverse KL's closed form (see ``_skew_kl_fused``)."""
    if lam == 0.0:
        return _reverse_kl_fused(s, t)
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    lm = _log_mix_(t, q, p, lam)  # log m, in t (log p is no longer needed)
    r = ls.sub_(lm)  # log(q / m), in s
    loss = row_sum(torch.mul(q, r, out=t))
    g = r.sub_(torch.exp(r, out=t).mul_(lam))  # log(q/m) - lam q/m, in s
    dot = row_sum(torch.mul(q, g, out=t))
    return loss, g.sub_(dot[:, None]).mul_(q)


@DIVERGENCES.register(paper="Ko et al. 2024 (DistiLLM, ICML 2024), arXiv:2402.03898")
@per_row(closed_form=_skew_reverse_kl_fused, buffers=4)
def skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Skew reverse KL(p_s || lam p_s + (1 - lam) p_t) * T^2, ``lam`` in [0, 1) (default 0.1).

    The student is mixed into the teacher side, as in ``skewed_reverse_kl`` of
    github.com/jongwooko/distillm distillm/losses.py (lam 0.1). Ko et al. 2024 (DistiLLM,
    ICML 2024, arXiv:2402.03898), its skew reverse KL (SRKL).
    """
    _check_range("lam", lam, 0.0, 1.0, low_closed=True)
    ls, lt = log_softmax(s), log_softmax(t)
    return _kl_rows(ls, _log_mix(ls, lt, lam))  # KL(p_s || lam p_s + (1-lam) p_t)


def _teacher_top(p: torch.Tensor, q: torch.Tensor, top: int):
    """The teacher's ``top`` largest probabilities (rows, top), descending, and the student's at
    the same classes. On a vocabulary shard: every rank's own top-``top`` candidates (padded
    with p = -1) are all-gathered and the global top is taken from them; a global top-k entry
    is in its rank's top-k, so this equals the top-k of the whole vocabulary."""
    shard = active()
    if shard is None:
        p_top, idx = p.topk(top, -1)
        return p_top, q.gather(-1, idx)
    width = min(top, max(shard.sizes))
    p_top, idx = p.topk(min(top, p.shape[-1]), -1)
    pad = width - p_top.shape[-1]
    p_top = F.pad(p_top, (0, pad), value=-1.0)
    q_top = F.pad(q.gather(-1, idx), (0, pad), value=0.0)
    rows = p.shape[0]
    every_p = shard.all_gather(p_top).permute(1, 0, 2).reshape(rows, -1)  # (rows, W width)
    every_q = shard.all_gather(q_top).permute(1, 0, 2).reshape(rows, -1)
    p_top, order = every_p.topk(top, -1)
    return p_top, every_q.gather(-1, order)


@torch.no_grad()
def akl_weights(
    q: torch.Tensor, p: torch.Tensor, mu: float, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL (head, tail) weights (N,) from probabilities q (student), p (teacher) (N, C).

    The teacher's head is its top classes up to cumulative mass ``mu`` (the top class always
    counts), the student's probabilities taken at the same classes; the weights are the L1 gaps
    |p - q| on head and tail over their sum (0.5 each when both are 0), as constants. Found
    without sorting the vocabulary: the head lies inside the teacher's top-k, k grown 4-fold
    until every row's top-k mass exceeds mu (a row block starts from the k its predecessor
    needed); the tail gap is the total gap minus the head's. Rows go in blocks of N / 8 so the
    (rows, top-k) temporaries stay below one (N, C) buffer even for a flat teacher. On a
    vocabulary shard (``kernels.vocab_parallel.using``) the top-k is merged from every rank's
    candidates (``_teacher_top``), so every rank finds the same head; sums are all-reduced.
    ``scratch`` (N, C), if given, holds |q - p| (overwritten). Wu et al. 2024, arXiv:2404.02657.
    """
    n, c = p.shape
    shard = active()
    n_classes = c if shard is None else shard.total
    gap = torch.sub(q, p, out=scratch) if scratch is not None else q - p
    total = row_sum(gap.abs_())  # (N,) L1 gap over all classes
    g_head = torch.empty_like(total)
    block = max(1, n // 8)
    top = min(64, n_classes)
    for r in range(0, n, block):
        pb, qb = p[r : r + block], q[r : r + block]
        while True:
            p_top, q_top = _teacher_top(pb, qb, top)  # (rows, top), p descending
            cum = p_top.cumsum(-1)
            if top == n_classes or bool((cum[:, -1] > mu).all()):
                break
            top = min(4 * top, n_classes)
        head = cum <= mu
        head[:, 0] = True  # the top class is always head
        head_gap = p_top.sub_(q_top).abs_()
        g_head[r : r + block] = head_gap.masked_fill_(~head, 0.0).sum(-1)
    g_tail = (total - g_head).clamp_min_(0.0)
    tot = g_head + g_tail
    w_head = torch.where(tot > 0, g_head / tot.clamp_min(1e-30), 0.5)
    return w_head, 1.0 - w_head


def _akl_fused(s, t, mu: float = 0.5):
    """AKL in place (two extra buffers, plus the head search's temporaries): w_h FKL + w_t RKL.
    d/ds = w_h (q - p) + w_t q (log q/p - RKL) = q (w_h + w_t (log q/p - RKL)) - w_h p."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    d = ls.sub_(lt)  # (k, C) log q - log p, in s; t is scratch from here on
    fkl, rkl = -row_sum(torch.mul(p, d, out=t)), row_sum(torch.mul(q, d, out=t))
    w_head, w_tail = akl_weights(q, p, mu, scratch=t)
    g = d.sub_(rkl[:, None]).mul_(w_tail[:, None]).add_(w_head[:, None]).mul_(q)
    return w_head * fkl + w_tail * rkl, g.sub_(p.mul_(w_head[:, None]))


@DIVERGENCES.register(paper="Wu et al. 2024, arXiv:2404.02657")
@per_row(closed_form=_akl_fused, buffers=5)  # s, t, q, p and the head search's temporaries
def akl(s: torch.Tensor, t: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL: w_head FKL + w_tail RKL per row, times T^2; ``mu`` = head mass (default 0.5).

    Teacher probabilities are sorted descending and the student's are gathered with the SAME
    permutation; the head is the top classes until the teacher's cumulative mass exceeds mu
    (the top class always counts as head); w_head = g_head / (g_head + g_tail) with g the L1
    gaps |p_t - p_s| of each part (constants, no gradient; ``akl_weights``). Checked against
    the authors' ``get_ratio`` / ``AKL`` in github.com/wutaiqiang/LLM_KD_AKL AKL.py (mu 0.5, head
    weight on FKL, tail weight on RKL). Wu et al. 2024, "Rethinking Kullback-Leibler Divergence
    in Knowledge Distillation for Large Language Models", arXiv:2404.02657.
    """
    _check_range("mu", mu, 0.0, 1.0, high_closed=True)
    ls, lt = log_softmax(s), log_softmax(t)
    w_head, w_tail = akl_weights(ls.detach().exp(), lt.detach().exp(), mu)
    return w_head * _kl_rows(lt, ls) + w_tail * _kl_rows(ls, lt)


def _entropy_rows(lp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy per row from log-probabilities (N, C) -> (N,); masked classes add 0."""
    return -row_sum(lp.exp() * torch.where(lp == -_INF, 0.0, lp))


@torch.no_grad()
def bdkd_weights(
    ls: torch.Tensor, lt: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-KD (forward, reverse) weights (N,) from the entropy gap H(p_s) - H(p_t), as constants.

    ls, lt (N, C) log-probs. Amara et al. 2022, arXiv:2212.12965 (rule unverified: see ``bdkd``).
    """
    under = _entropy_rows(ls) > _entropy_rows(lt)  # student less confident -> stress RKL
    w_fwd = torch.where(under, 1.0, lam).to(ls.dtype)
    w_rev = torch.where(under, lam, 1.0).to(ls.dtype)
    return w_fwd, w_rev


def _bdkd_fused(s, t, lam: float = 2.0):
    ls, lt, q, p = _probabilities_(s, t)
    w_fwd, w_rev = bdkd_weights(ls, lt, lam)
    fkl, rkl, gf, gr = _fkl_rkl(ls, lt, q, p)
    return w_fwd * fkl + w_rev * rkl, gf.mul_(w_fwd[:, None]).add_(gr.mul_(w_rev[:, None]))


@DIVERGENCES.register(paper="Amara et al. 2022 (BD-KD), arXiv:2212.12965")
@per_row(closed_form=_bdkd_fused, buffers=7)
def bdkd(s: torch.Tensor, t: torch.Tensor, lam: float = 2.0) -> torch.Tensor:
    """BD-KD student divergence: per-sample weighting of forward and reverse KL, times T^2.

    With gap = H(p_s) - H(p_t): gap > 0 (student under-confident) -> KL(p_t||p_s) +
    lam KL(p_s||p_t) (stress mode-seeking RKL); otherwise lam KL(p_t||p_s) + KL(p_s||p_t).
    ``lam`` > 0 (default 2). Weights are constants. Online KD: pass a teacher that requires
    grad to train it too.
    UNVERIFIED rule. Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge
    Distillation", arXiv:2212.12965: only the abstracts could be read here, not the equations
    nor any code. v2 (2024): "sample-wise weighting of forward and reverse Kullback-Leibler
    divergence", adjusting "both the student and teacher losses"; v1 (2022): the balancing is
    done "at the level of the student distillation loss". That the weights follow the
    teacher/student entropy gap, and that the teacher keeps reverse KL, come from a third-party
    summary of the paper. The hard switch, which KL gets lam, and lam = 2 are this module's
    reading (RKL sharpens an under-confident student, FKL softens an over-confident one).
    """
    _check_range("lam", lam, 0.0, _INF)
    ls, lt = log_softmax(s), log_softmax(t)
    w_fwd, w_rev = bdkd_weights(ls, lt, lam)
    return w_fwd * _kl_rows(lt, ls) + w_rev * _kl_rows(ls, lt)


def _binary_kl_fused(s, t):
    """Binary KL: loss (k,), d/ds = sigmoid(s) - sigmoid(t)."""
    lt1, lt0 = F.logsigmoid(t), F.logsigmoid(-t)
    loss = row_sum(lt1.exp() * (lt1 - F.logsigmoid(s)) + lt0.exp() * (lt0 - F.logsigmoid(-s)))
    return loss, torch.sigmoid(s).sub_(torch.sigmoid(t))


@DIVERGENCES.register(paper="Yang et al. 2024 (Dual-Head KD), arXiv:2411.08937")
@per_row(closed_form=_binary_kl_fused, buffers=10)
def binary_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logit-level binary KL: sum_c KL(Bern(sigmoid(z_t,c/T)) || Bern(sigmoid(z_s,c/T))) * T^2.

    Matches github.com/penghui-yang/DHKD distiller_zoo/BinaryKL.py (sum over classes, mean over
    rows, T^2; they use T = 2). Yang et al. 2024, "Dual-Head Knowledge Distillation",
    arXiv:2411.08937 (its BinaryKL loss).
    """
    pos = _kl_terms(F.logsigmoid(t), F.logsigmoid(s))
    return row_sum(pos + _kl_terms(F.logsigmoid(-t), F.logsigmoid(-s)))


def _log_cosh_half(x: torch.Tensor) -> torch.Tensor:
    """log cosh(x / 2) elementwise, accurate near 0 and finite at +-1e4 (with its gradient)."""
    a = x.abs()
    small = torch.log1p(2.0 * torch.sinh(a.clamp(max=2.0) / 4) ** 2)  # cosh y = 1 + 2 sinh^2(y/2)
    large = a / 2 + torch.log1p(torch.exp(-a)) - math.log(2.0)
    return torch.where(a < 2.0, small, large)


def _dual_head_binary_kl_fused(s, t):
    """BinaryKL-Norm in place: loss sum_c log cosh(d_c / 2), d/ds = sigmoid(d) - 1/2."""
    d = s.sub_(t)  # (k, C) s - t, in s
    return row_sum(_log_cosh_half(d)), d.sigmoid_().sub_(0.5)


@DIVERGENCES.register(paper="Yang et al. 2024 (Dual-Head KD), arXiv:2411.08937")
@per_row(closed_form=_dual_head_binary_kl_fused, buffers=7)
def dual_head_binary_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Dual-Head KD's BinaryKL-Norm: sum_c KL(Bern(1/2) || Bern(sigmoid((z_s,c - z_t,c)/T))) * T^2.

    Per class this is log cosh((z_s,c - z_t,c) / 2T): zero iff the logits match exactly (not
    up to a shift), gradient (sigmoid(d) - 1/2) / T, bounded; a class masked (-inf) in both
    adds 0. Checked against the authors' code, github.com/penghui-yang/DHKD
    distiller_zoo/BinaryKLNorm.py (sum over classes, mean over rows, T^2; they use T = 2).
    Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an
    Auxiliary Head", arXiv:2411.08937 (the loss of the auxiliary head).
    """
    both = (s == -_INF) & (t == -_INF)
    return row_sum(_log_cosh_half(torch.where(both, 0.0, s - t)))


def dkd_parts(
    s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD) per row from *scaled* logits s, t (N, C) and targets (N,), no T^2.

    TCKD = KL([p_t,gt, 1 - p_t,gt] || [p_s,gt, 1 - p_s,gt]); NCKD = KL over the non-target
    classes renormalised. Identity: KL(p_t || p_s) = TCKD + (1 - p_t,gt) NCKD.
    Zhao et al. 2022, "Decoupled Knowledge Distillation", arXiv:2203.08679.
    """
    n, c = s.shape
    shard = active()
    n_classes = c if shard is None else shard.total
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != (n,):
        raise ValueError(
            f"targets must be int labels of shape ({n},), got {targets.dtype} {tuple(targets.shape)}"
        )
    if n and (targets.min() < 0 or targets.max() >= n_classes):
        raise ValueError(f"targets must lie in [0, {n_classes}) apart from ignore_index")
    ls, lt = log_softmax(s), log_softmax(t)
    if shard is None:
        gt = F.one_hot(targets.long(), c).bool()  # (N, C)
        ls_nt, lt_nt = ls[~gt].view(n, c - 1), lt[~gt].view(n, c - 1)  # non-target log-probs
        ls_gt, lt_gt = ls[gt], lt[gt]
        ls_rest, lt_rest = ls_nt.logsumexp(-1), lt_nt.logsumexp(-1)
    else:  # the target column lies on one rank: mask it (-inf) rather than drop it
        gt = torch.arange(c, device=s.device) == shard.local_targets(targets.long())[:, None]
        ls_gt, lt_gt = row_sum(ls.masked_fill(~gt, 0.0)), row_sum(lt.masked_fill(~gt, 0.0))
        ls_nt, lt_nt = ls.masked_fill(gt, -_INF), lt.masked_fill(gt, -_INF)
        ls_rest, lt_rest = row_logsumexp(ls_nt), row_logsumexp(lt_nt)
    ls_b = torch.stack([ls_gt, ls_rest], -1)  # (N, 2): log p_gt, log(1 - p_gt)
    lt_b = torch.stack([lt_gt, lt_rest], -1)
    nckd = _kl_rows(log_softmax(lt_nt), log_softmax(ls_nt))
    return _kl_terms(lt_b, ls_b).sum(-1), nckd


@DIVERGENCES.register(paper="Zhao et al. 2022 (DKD, CVPR 2022), arXiv:2203.08679")
@per_row(buffers=12)  # fused by autograd over the definition (measured 11.5 buffers)
def dkd(
    s: torch.Tensor,
    t: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    warmup: float = 1.0,
) -> torch.Tensor:
    """Decoupled KD: warmup * (alpha TCKD + beta NCKD) * T^2; ``targets`` (N,) are REQUIRED.

    Defaults alpha 1, beta 8 (CIFAR); ``warmup`` in [0, 1] is the caller's
    min(epoch / warmup_epochs, 1) (20 epochs on CIFAR, with T = 4). The CE term of the paper's
    loss is not included. Same value as ``dkd_loss`` in github.com/megvii-research/mdistiller
    mdistiller/distillers/DKD.py (NCKD not scaled by 1 - p_t,gt, T^2 on both parts, mean over
    rows). Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR 2022, arXiv:2203.08679):
    its decomposition KD = TCKD + (1 - p_t,gt) NCKD and the loss alpha TCKD + beta NCKD.
    """
    _check_range("alpha", alpha, 0.0, _INF, low_closed=True)
    _check_range("beta", beta, 0.0, _INF, low_closed=True)
    _check_range("warmup", warmup, 0.0, 1.0, low_closed=True, high_closed=True)
    tckd, nckd = dkd_parts(s, t, targets)
    return warmup * (alpha * tckd + beta * nckd)


# --- batch-wise Sinkhorn (not per row) -----------------------------------------------------


@DIVERGENCES.register(paper="Cui et al. 2024 (SinKD, COLING 2024), arXiv:2402.17110")
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
    Not per row, so it has no fused form. Cui et al. 2024, "SinKD: Sinkhorn Distance
    Minimization for Knowledge Distillation" (COLING 2024, arXiv:2402.17110), its batch-wise
    reformulation; equations not checked.
    """
    if reduction == "none":
        raise ValueError("sinkhorn is batch-wise: reduction='none' has no per-row value")
    _check_range("eps", eps, 0.0, _INF)
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Real) or n_iters < 1:
        raise ValueError(f"n_iters must be an int >= 1, got {n_iters!r}")
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

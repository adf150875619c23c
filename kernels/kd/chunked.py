"""Chunked pure-PyTorch fused linear KD loss: the CPU path, no (N, V) logits.

Loops over token chunks: the student and teacher logits of a chunk (chunk x V each) are
computed by GEMM, the per-token divergence and its gradient with respect to the student
logits are evaluated in closed form, and the gradient is pushed straight into the hidden
states and the weight (dE = G W_s, dW_s += G^T E_s). The loss is a scalar, so backward only
scales the stored gradients. Memory is O(chunk x V + N x D + V x D); cost 8 N V D flops
(two forward GEMMs, two gradient GEMMs). The teacher receives no gradient.

Closed forms use d/ds_k sum_j f(q_j) = q_k (g_k - sum_j q_j g_j), g = df/dq, q = softmax(s).
Forward and reverse KL, JS, skew KL / skew reverse KL and AKL (the divergences of the kd LM
runs) are written in place over the two logit buffers (3-5 (chunk, V) buffers in all), so their
chunks can be larger, hence their GEMMs faster, at equal memory. AKL finds the teacher's head
with a growing top-k instead of sorting the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from core.losses.divergences import _log_cosh_half, bdkd_weights

# The chunk's (chunk, V) work buffers may use this fraction of the gradient buffers.
CHUNK_BUDGET_FRACTION = 0.25
MIN_CHUNK_BUDGET_BYTES = 8 << 20

Spec = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pick_chunk_size(n: int, v: int, d: int, dtype: torch.dtype, n_buffers: int) -> int:
    """Rows per chunk so that ``n_buffers`` (chunk, V) work buffers fit the budget.

    The budget is ``CHUNK_BUDGET_FRACTION`` of the gradient buffers ((N + V) x D), so the peak
    memory above the inputs stays near 1.25 x the gradient buffers. Fewer rows per chunk
    mean more passes over the weights (memory-bound GEMMs): smaller but slower.
    """
    item = torch.finfo(acc_dtype(dtype)).bits // 8
    budget = max(CHUNK_BUDGET_FRACTION * (n + v) * d * item, MIN_CHUNK_BUDGET_BYTES)
    return max(1, min(int(budget // (v * item * n_buffers)), n))


def _through_softmax(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. s given g = dD/dq (k, V), in place on g: q * (g - <q, g>)."""
    return g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)


def _fkl_rkl(ls, lt, q, p):
    """(FKL, RKL, dFKL/ds, dRKL/ds) per row."""
    d = ls - lt  # (k, V)
    fkl = -(p * d).sum(-1)
    rkl = (q * d).sum(-1)
    return fkl, rkl, q - p, d.sub_(rkl[:, None]).mul_(q)


def _forward_kl(s, t):
    """FKL from scaled logits, overwriting s and t (one extra buffer): loss, d/ds = q - p."""
    s.sub_(s.amax(-1, keepdim=True))
    t.sub_(t.amax(-1, keepdim=True))
    p = t.exp()  # (k, V) unnormalised teacher probabilities
    z_t = p.sum(-1)
    cross = t.sub_(s).mul_(p).sum(-1)  # sum_j e^t_j (t_j - s_j), shifted logits
    z_s = s.exp_().sum(-1)  # s <- unnormalised student probabilities
    loss = cross / z_t - z_t.log() + z_s.log()
    g = s.mul_(z_s.reciprocal()[:, None]).sub_(p.mul_(z_t.reciprocal()[:, None]))
    return loss, g


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, in place."""
    return x.sub_(x.logsumexp(-1, keepdim=True))


def _reverse_kl(s, t):
    """RKL from scaled logits, overwriting s and t: loss, d/ds = q (log q/p - RKL)."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    d = lt.neg_().add_(ls)  # (k, V) log q - log p, in t
    q = ls.exp_()  # in s
    qd = d.mul_(q)
    rkl = qd.sum(-1)
    return rkl, qd.addcmul_(q, rkl[:, None], value=-1.0)


def _symmetric_kl(ls, lt, q, p):
    fkl, rkl, gf, gr = _fkl_rkl(ls, lt, q, p)
    return fkl + rkl, gf.add_(gr)


def _js(s, t, beta: float = 0.5):
    """Generalised JS from scaled logits, overwriting s and t (three extra buffers).

    d/ds = (1 - beta) q (log(q/m) - <q, log(q/m)>), m = beta p + (1 - beta) q.
    """
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    m = p.mul(beta).add_(q, alpha=1 - beta)  # (k, V); 0 only where p and q underflow
    lm = m.clamp_min_(torch.finfo(m.dtype).tiny).log_()
    fwd = lt.sub_(lm).mul_(p).sum(-1)  # KL(p || m); t is scratch from here on
    r = ls.sub_(lm)  # log(q / m), in s
    rev = torch.mul(r, q, out=t).sum(-1)  # KL(q || m)
    return beta * fwd + (1 - beta) * rev, r.sub_(rev[:, None]).mul_(q).mul_(1 - beta)


def _total_variation(ls, lt, q, p):
    diff = q - p
    loss = 0.5 * diff.abs().sum(-1)
    return loss, _through_softmax(q, diff.sign_().mul_(0.5))


def _log_mix_(out, a, b, w: float):
    """log(w a + (1 - w) b) from probabilities a, b into ``out`` (floored at the smallest
    normal number, where both underflow and the term's weight is 0 anyway)."""
    torch.mul(b, 1.0 - w, out=out).add_(a, alpha=w)
    return out.clamp_min_(torch.finfo(out.dtype).tiny).log_()


def _skew_kl(s, t, lam: float = 0.1):
    """Skew KL(p || m), m = lam p + (1 - lam) q, from scaled logits, overwriting s and t (two
    extra buffers). d/dq_j = -(1 - lam) p_j / m_j, taken through the softmax."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    lm = _log_mix_(s, p, q, lam)  # log m, in s (log q is no longer needed)
    r = lt.sub_(lm)  # log(p / m), in t
    loss = torch.mul(p, r, out=s).sum(-1)
    g = r.exp_().mul_(-(1.0 - lam))  # -(1 - lam) p / m, in t
    dot = torch.mul(q, g, out=s).sum(-1)
    return loss, g.sub_(dot[:, None]).mul_(q)


def _skew_reverse_kl(s, t, lam: float = 0.1):
    """Skew KL(q || m), m = lam q + (1 - lam) p, from scaled logits, overwriting s and t (two
    extra buffers). d/dq_j = log(q_j / m_j) - lam q_j / m_j (+1, which the softmax removes)."""
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    lm = _log_mix_(t, q, p, lam)  # log m, in t (log p is no longer needed)
    r = ls.sub_(lm)  # log(q / m), in s
    loss = torch.mul(q, r, out=t).sum(-1)
    g = r.sub_(torch.exp(r, out=t).mul_(lam))  # log(q/m) - lam q/m, in s
    dot = torch.mul(q, g, out=t).sum(-1)
    return loss, g.sub_(dot[:, None]).mul_(q)


def _akl_weights_topk(q, p, scratch, mu: float, k0: int = 64):
    """AKL (head, tail) weights (k,) from probabilities q (student), p (teacher) (k, V).

    Same rule as ``core.losses.divergences.akl_weights`` (the teacher's head is its top classes
    up to cumulative mass ``mu``, the top class always included; the weights are the L1 gaps on
    head and tail over their sum) without sorting the vocabulary: the head lies inside the
    teacher's top-k, k grown 4-fold until every row's top-k mass exceeds ``mu`` (each row block
    starts from the k its predecessor needed). The tail gap is the total L1 gap minus the
    head's. Rows go in blocks of k / 8, so the (rows, top-k) temporaries stay below one (k, V)
    buffer even for a flat teacher (top-k -> V: a full sort, as in the reference).
    ``scratch`` (k, V) is overwritten. Wu et al. 2024, arXiv 2404.02657.
    """
    n, v = p.shape
    total = torch.sub(q, p, out=scratch).abs_().sum(-1)  # (k,) L1 gap over all classes
    g_head = torch.empty_like(total)
    block = max(1, n // 8)
    top = min(k0, v)
    for r in range(0, n, block):
        pb, qb = p[r : r + block], q[r : r + block]
        while True:
            p_top, idx = pb.topk(top, -1)  # (rows, top), descending
            cum = p_top.cumsum(-1)
            if top == v or bool((cum[:, -1] > mu).all()):
                break
            top = min(4 * top, v)
        head = cum <= mu
        head[:, 0] = True  # the top class is always head
        gap = p_top.sub_(qb.gather(-1, idx)).abs_()
        g_head[r : r + block] = gap.masked_fill_(~head, 0.0).sum(-1)
    g_tail = (total - g_head).clamp_min_(0.0)
    tot = g_head + g_tail
    w_head = torch.where(tot > 0, g_head / tot.clamp_min(1e-30), 0.5)
    return w_head, 1.0 - w_head


def _akl(s, t, mu: float = 0.5):
    """AKL from scaled logits, overwriting s and t (two extra buffers): w_h FKL + w_t RKL.

    d/ds = w_h (q - p) + w_t q (log q/p - RKL) = q (w_h + w_t (log q/p - RKL)) - w_h p.
    """
    ls, lt = _log_softmax_(s), _log_softmax_(t)
    q, p = ls.exp(), lt.exp()
    d = ls.sub_(lt)  # (k, V) log q - log p, in s; t is scratch from here on
    fkl, rkl = -torch.mul(p, d, out=t).sum(-1), torch.mul(q, d, out=t).sum(-1)
    w_head, w_tail = _akl_weights_topk(q, p, t, mu)
    g = d.sub_(rkl[:, None]).mul_(w_tail[:, None]).add_(w_head[:, None]).mul_(q)
    return w_head * fkl + w_tail * rkl, g.sub_(p.mul_(w_head[:, None]))


def _bdkd(ls, lt, q, p, lam: float = 2.0):
    w_fwd, w_rev = bdkd_weights(ls, lt, lam)
    fkl, rkl, gf, gr = _fkl_rkl(ls, lt, q, p)
    return w_fwd * fkl + w_rev * rkl, gf.mul_(w_fwd[:, None]).add_(gr.mul_(w_rev[:, None]))


def _binary_kl(s, t):
    """Binary KL from scaled logits: loss (k,), d/ds = sigmoid(s) - sigmoid(t)."""
    lt1, lt0 = F.logsigmoid(t), F.logsigmoid(-t)
    loss = (lt1.exp() * (lt1 - F.logsigmoid(s)) + lt0.exp() * (lt0 - F.logsigmoid(-s))).sum(-1)
    return loss, torch.sigmoid(s).sub_(torch.sigmoid(t))


def _dual_head_binary_kl(s, t):
    """BinaryKL-Norm from scaled logits: loss sum_c log cosh(d_c / 2), d/ds = sigmoid(d) - 1/2."""
    d = s.sub_(t)  # (k, V) s - t, in s
    return _log_cosh_half(d).sum(-1), d.sigmoid_().sub_(0.5)


# name -> (per-chunk closed form, whether it reads log-softmax outputs (else scaled logits),
#          (chunk, V) buffers alive at its peak, counted with the two logit buffers)
SPECS: dict[str, tuple[Spec, bool, int]] = {
    "forward_kl": (_forward_kl, False, 3),
    "reverse_kl": (_reverse_kl, False, 3),
    "symmetric_kl": (_symmetric_kl, True, 7),
    "js": (_js, False, 5),
    "total_variation": (_total_variation, True, 6),
    "skew_kl": (_skew_kl, False, 4),
    "skew_reverse_kl": (_skew_reverse_kl, False, 4),
    "akl": (_akl, False, 5),  # s, t, q, p and the head search's (rows, top-k) temporaries
    "bdkd": (_bdkd, True, 7),
    "binary_kl": (_binary_kl, False, 6),
    "dual_head_binary_kl": (_dual_head_binary_kl, False, 6),
}


def _sweep(e_s, w_s, e_t, w_t, targets, valid, n_valid, opts, need_grad):
    """One pass over the valid rows: the scalar loss and, if asked, (dE_s, dW_s)."""
    divergence, temperature, hard_weight, scale, chunk_size, hparams = opts
    spec, uses_softmax, _ = SPECS[divergence]
    v = w_s.shape[0]
    total = e_s.new_zeros(())
    de = e_s.new_zeros(e_s.shape) if need_grad else None
    dw = torch.zeros_like(w_s) if need_grad else None
    k_max = max(1, min(chunk_size, n_valid))
    zs_buf = e_s.new_empty(k_max * v)
    zt_buf = e_s.new_empty(k_max * v)
    w_kd = (1.0 - hard_weight) * temperature**2  # T^2 convention on the divergence
    for start in range(0, n_valid, k_max):
        k = min(k_max, n_valid - start)
        rows = slice(start, start + k) if valid is None else valid[start : start + k]
        es = e_s[rows]  # (k, D)
        s = torch.mm(es, w_s.T, out=zs_buf[: k * v].view(k, v))  # (k, V) student logits
        t = torch.mm(e_t[rows], w_t.T, out=zt_buf[: k * v].view(k, v))  # (k, V) teacher
        if hard_weight > 0:
            tk = targets[rows]
            lse = s.logsumexp(-1)  # (k,)
            total += hard_weight * (lse - s.gather(1, tk[:, None]).squeeze(1)).sum()
            soft = (s - lse[:, None]).exp_() if need_grad else None  # (k, V) softmax(z)
        if temperature != 1.0:
            s.div_(temperature)
            t.div_(temperature)
        if uses_softmax:
            ls, lt = _log_softmax_(s), _log_softmax_(t)  # in place: log p_s, log p_t
            loss, g = spec(ls, lt, ls.exp(), lt.exp(), **hparams)
        else:
            loss, g = spec(s, t, **hparams)
        total += w_kd * loss.sum()
        if not need_grad:
            continue
        g.mul_(w_kd / temperature * scale)  # (k, V) d loss / d z_s
        if hard_weight > 0:
            g.add_(soft, alpha=hard_weight * scale)
            g[torch.arange(k), tk] -= hard_weight * scale
        de[rows] = g @ w_s
        dw.addmm_(g.T, es)
    return total * scale, de, dw


class _ChunkedLinearKD(torch.autograd.Function):
    """Gradients computed in the forward; backward scales them by the output gradient."""

    @staticmethod
    def forward(ctx, e_s, w_s, e_t, w_t, targets, valid, n_valid, opts, need_grad):
        acc = acc_dtype(e_s.dtype)
        loss, de, dw = _sweep(
            e_s.to(acc),
            w_s.to(acc),
            e_t.to(acc),
            w_t.to(acc),
            targets,
            valid,
            n_valid,
            opts,
            need_grad,
        )
        ctx.grads = (de, dw)
        ctx.dtypes = (e_s.dtype, w_s.dtype)
        return loss  # fp32 (fp64 for fp64 inputs): a bf16 scalar loss would only lose digits

    @staticmethod
    def backward(ctx, grad_out):
        de, dw = ctx.grads
        if de is None:
            raise RuntimeError("linear_kd (chunked): backward after a forward run without grad")
        ctx.grads = (None, None)
        g = float(grad_out)
        if g != 1.0:
            de.mul_(g)
            dw.mul_(g)
        return de.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), *([None] * 7)


def chunked_linear_kd(
    e_s: torch.Tensor,
    w_s: torch.Tensor,
    e_t: torch.Tensor,
    w_t: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    **hparams: float,
) -> torch.Tensor:
    """Fused (1 - h) T^2 D(p_t || p_s) + h CE, mean over non-ignored rows, without (N, V) logits.

    e_s (N, D_s), w_s (V, D_s), e_t (N, D_t), w_t (V, D_t), targets (N,) or None; divergences
    in ``SPECS``. Gradients reach e_s and w_s only (in their dtypes); the loss is returned in
    the accumulation dtype (fp32, or fp64). Inputs are assumed validated by the api.
    """
    n = e_s.shape[0]
    if targets is None:
        valid, n_valid = None, n
    else:
        keep = targets != ignore_index
        n_valid = int(keep.sum())
        valid = None if n_valid == n else keep.nonzero().squeeze(1)
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    if chunk_size is None:
        n_buf = SPECS[divergence][2] + (1 if hard_weight > 0 else 0)
        chunk_size = pick_chunk_size(n, w_s.shape[0], e_s.shape[1], e_s.dtype, n_buf)
    need_grad = torch.is_grad_enabled() and (e_s.requires_grad or w_s.requires_grad)
    opts = (divergence, float(temperature), float(hard_weight), scale, int(chunk_size), hparams)
    return _ChunkedLinearKD.apply(e_s, w_s, e_t, w_t, targets, valid, n_valid, opts, need_grad)

"""Chunked pure-PyTorch Cut Cross-Entropy: the fast CPU path.

Loops over token chunks; each chunk's logits live in one preallocated (V, chunk) buffer that
is reused in place (GEMM into it, exp_, scale, GEMM out of it), so memory is
O(chunk x V + N x D + V x D) and the cost is the three GEMMs (6 N V D flops).
For reduction "mean"/"sum" without ``return_lse`` the gradients are computed during the
forward (the loss is a scalar, so backward only scales them). For reduction "none" or
``return_lse`` the per-row output gradients are unknown at forward time, so the forward
computes loss and LSE only (2 N V D) and the backward recomputes chunk by chunk with the
exact per-row weights (6 N V D). fp16/bf16 inputs are upcast once to fp32 (CPU half GEMMs
are slow and accumulate less exactly); gradients come back in the input dtype. ``filter_eps``
is not used here: on CPU the dense GEMMs cost the same whether or not a tile could be skipped.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch

# Peak memory above the inputs may reach MEMORY_TARGET x the gradient buffers ((N + V) x D
# accumulators); the chunk buffers get what is left after a safety margin, but at least 8 MiB
# (GEMM efficiency at small V, where the absolute memory is small anyway).
MEMORY_TARGET = 1.25
SAFETY_BYTES = 2 << 20
MIN_CHUNK_BUDGET_BYTES = 8 << 20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pick_chunk_size(
    n: int,
    v: int,
    d: int,
    dtype: torch.dtype,
    n_buffers: int = 1,
    memory_target: float = MEMORY_TARGET,
) -> int:
    """Rows per chunk so that the (V, chunk) buffers fit in the memory budget.

    Budget: (memory_target - 1) x the gradient buffers ((N + V) x D accumulators) minus a small
    margin, so the peak above the inputs stays <= memory_target x the gradient buffers. A
    larger target buys longer GEMMs (more rows per chunk), i.e. speed for memory.
    """
    if not memory_target > 1.0:
        raise ValueError(f"memory_target must be > 1 (x the gradient buffers), got {memory_target}")
    item = torch.finfo(acc_dtype(dtype)).bits // 8
    grad_bytes = (n + v) * d * item
    budget = max((memory_target - 1) * grad_bytes - SAFETY_BYTES, MIN_CHUNK_BUDGET_BYTES)
    rows = int(budget // (v * item * n_buffers))
    rows = rows // 8 * 8 if rows >= 16 else max(rows, 1)
    return max(1, min(rows, n))


def _sweep(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    softcap: float | None,
    chunk_size: int,
    w_loss: torch.Tensor | None = None,
    w_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """One pass over the valid rows: per-row loss and LSE, and with row weights the gradients.

    e (N, D), c (V, D) in the accumulation dtype; targets (N,); valid: indices of non-ignored
    rows, or None when all rows count. w_loss, w_lse (n_valid,): d out / d loss_i and
    d out / d lse_i. Returns loss (N,), lse (N,) (zero on ignored rows) and (dE, dC, dbias).
    """
    n, v = e.shape[0], c.shape[0]
    rows_total = n if valid is None else valid.numel()
    loss = e.new_zeros(n)
    lse = e.new_zeros(n)
    grads = w_loss is not None
    if grads:
        de = e.new_empty(e.shape) if valid is None else e.new_zeros(e.shape)
        dc = torch.empty_like(c) if rows_total else torch.zeros_like(c)
        db = c.new_zeros(v) if bias is not None else None
    chunk_size = max(1, min(chunk_size, rows_total))
    flat = e.new_empty(v * chunk_size)
    flat_t = e.new_empty(v * chunk_size) if softcap is not None else None
    de_tmp = e.new_empty(chunk_size, e.shape[1]) if grads and valid is not None else None
    col = torch.arange(chunk_size, device=e.device)
    for s in range(0, rows_total, chunk_size):
        k = min(chunk_size, rows_total - s)
        if valid is None:
            rows, ec, tc = slice(s, s + k), e[s : s + k], targets[s : s + k]
        else:
            rows = valid[s : s + k]
            ec, tc = e.index_select(0, rows), targets.index_select(0, rows)
        z = flat[: v * k].view(v, k)  # (V, k): logits of this chunk, transposed
        if bias is not None:
            torch.addmm(bias[:, None], c, ec.T, out=z)
        else:
            torch.mm(c, ec.T, out=z)
        if softcap is not None:  # z <- cap * tanh(z / cap); keep tanh for the chain rule
            t = flat_t[: v * k].view(v, k)
            torch.div(z, softcap, out=t).tanh_()
            torch.mul(t, softcap, out=z)
        ck = col[:k]
        z_target = z[tc, ck]  # (k,)
        m = z.amax(0)  # (k,)
        z.sub_(m).exp_()
        s_exp = z.sum(0)  # (k,)
        lse_k = s_exp.log_().add_(m)
        loss[rows] = lse_k - z_target
        lse[rows] = lse_k
        if not grads:
            continue
        wl, wz = w_loss[s : s + k], w_lse[s : s + k]
        # d out / d z = (wl + wz) * softmax - wl * onehot; exp(z - m) / sum = exp(z - m - log sum)
        z.mul_(((wl + wz) * torch.exp(m - lse_k))[None, :])
        z.index_put_((tc, ck), -wl, accumulate=True)
        if softcap is not None:  # d tanh: (1 - t^2)
            t.mul_(t)
            z.addcmul_(z, t, value=-1.0)
        if valid is None:
            torch.mm(z.T, c, out=de[rows])
        else:
            torch.mm(z.T, c, out=de_tmp[:k])
            de.index_copy_(0, rows, de_tmp[:k])
        if s == 0:
            torch.mm(z, ec, out=dc)  # first chunk initialises dC: no zero-fill pass
        else:
            dc.addmm_(z, ec)
        if db is not None:
            db.add_(z.sum(1))
    return loss, lse, ((de, dc, db) if grads else None)


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor | None, int]:
    """Indices of non-ignored rows (None when every row counts) and their count."""
    keep = targets != ignore_index
    n_valid = int(keep.sum())
    if n_valid == targets.numel():
        return None, n_valid
    return keep.nonzero().squeeze(1), n_valid


class _ChunkedCCE(torch.autograd.Function):
    """Autograd wrapper: gradients during forward (scalar losses) or recomputed in backward."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, ignore_index, softcap, reduction, want_lse, chunk_size):
        acc = acc_dtype(e.dtype)
        e_a, c_a = e.to(acc), c.to(acc)
        b_a = bias.to(acc) if bias is not None else None
        valid, n_valid = _valid_rows(targets, ignore_index)
        need_grad = any(ctx.needs_input_grad[:3])
        eager = need_grad and reduction != "none" and not want_lse
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        w = e_a.new_full((n_valid,), scale) if eager else None
        w_lse = torch.zeros_like(w) if eager else None
        loss, lse, grads = _sweep(e_a, c_a, b_a, targets, valid, softcap, chunk_size, w, w_lse)
        ctx.eager, ctx.grads, ctx.dtypes = eager, grads, (e.dtype, c.dtype)
        ctx.opts = (ignore_index, softcap, reduction, chunk_size, scale)
        if need_grad and not eager:
            ctx.save_for_backward(e, c, bias, targets)
        out = loss if reduction == "none" else loss.sum() * scale
        return out.to(e.dtype), lse.to(e.dtype)

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy (chunked): backward called twice")
            grads, ctx.grads = ctx.grads, None  # hand the buffers over without a copy
            g = float(g_loss)
            out = []
            for buf in grads:
                if buf is not None and g != 1.0:
                    buf.mul_(g)
                out.append(buf)
        else:
            e, c, bias, targets = ctx.saved_tensors
            ignore_index, softcap, reduction, chunk_size, scale = ctx.opts
            acc = acc_dtype(e.dtype)
            valid, n_valid = _valid_rows(targets, ignore_index)
            if reduction == "none":
                wl = g_loss.to(acc)
            else:
                wl = (g_loss.to(acc) * scale).expand(targets.numel())
            wz = g_lse.to(acc) if g_lse is not None else torch.zeros_like(wl)
            if valid is not None:
                wl, wz = wl.index_select(0, valid), wz.index_select(0, valid)
            b_a = bias.to(acc) if bias is not None else None
            _, _, out = _sweep(
                e.to(acc), c.to(acc), b_a, targets, valid, softcap, chunk_size, wl, wz
            )
        de, dc, db = out
        return (
            de.to(ctx.dtypes[0]),
            dc.to(ctx.dtypes[1]),
            db.to(ctx.dtypes[1]) if db is not None else None,
            *([None] * 6),
        )


def chunked_linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
    chunk_size: int | None = None,
    memory_target: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused linear + cross-entropy on flat rows without the (N, V) logits.

    e (N, D), c (V, D), targets (N,), bias (V,) -> (loss, lse): loss is a scalar (mean over
    non-ignored rows / sum) or (N,) for "none"; lse (N,) is differentiable and 0 on ignored
    rows. ``chunk_size`` (rows per chunk) overrides ``memory_target`` (peak above the inputs as
    a multiple of the gradient buffers, default MEMORY_TARGET), from which it is derived.
    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary LMs", arXiv 2411.09009.
    """
    if chunk_size is None:
        n_buf = 2 if softcap is not None else 1
        target = MEMORY_TARGET if memory_target is None else memory_target
        chunk_size = pick_chunk_size(e.shape[0], c.shape[0], e.shape[1], e.dtype, n_buf, target)
    return _ChunkedCCE.apply(
        e, c, bias, targets, ignore_index, softcap, reduction, return_lse, chunk_size
    )

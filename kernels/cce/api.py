"""Dispatch for Cut Cross-Entropy: flatten/shift the inputs, pick the path, shape the outputs.

impl="auto": CUDA tensors -> Triton kernels (float64 -> the chunked path: the kernels compute in
fp32), CPU tensors -> the chunked PyTorch path; it never picks the materialised reference.
impl="triton" on CPU needs TRITON_INTERPRET=1 set before the kernel modules are imported
(triton.jit reads it at decoration time). Every path returns the loss and LSE in fp32 (fp64
for fp64 inputs) whatever the input dtype: a half-precision sum of per-token losses overflows.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import os

import torch

from kernels.cce.chunked import chunked_linear_cross_entropy, combine_rows, row_loss
from kernels.cce.reference import reference_linear_cross_entropy
from kernels.chunking import acc_dtype, first_order
from kernels.vocab_parallel import VocabShard

IMPLS = ("auto", "chunked", "triton", "reference")


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """``"auto"``/``"high"`` -> eps(dtype) / 32 (the CCE default); None disables filtering."""
    if filter_eps in ("auto", "high"):
        return torch.finfo(dtype).eps / 32
    return None if filter_eps is None else float(filter_eps)


def _check_triton_available(device: torch.device, dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        raise ValueError(
            "impl='triton' computes in fp32 and would round float64 inputs; use impl='chunked' "
            "(or 'auto') for float64"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' needs a CUDA tensor (got device {device}); on CPU set "
            "TRITON_INTERPRET=1 before importing kernels.cce (Triton interpreter, slow)."
        )


class _TritonCCE(torch.autograd.Function):
    """Forward LSE + target logit kernels; backward recomputes tiles with per-row weights. On a
    vocabulary shard the kernels give this shard's statistics, combined here by one all-gather
    (forward), and dE is all-reduced after the backward kernel."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, ignore_index, softcap, reduction, filter_eps, sort,
                smoothing, z_loss, vocab):  # fmt: skip
        from kernels.cce.triton_fwd import cce_forward

        e, c = e.contiguous(), c.contiguous()
        bias = bias.contiguous() if bias is not None else None  # the kernels read it unstrided
        rows = (targets != ignore_index).nonzero().squeeze(1)  # (R,)
        local = targets if vocab is None else vocab.local_targets(targets)
        lse_r, tgt_logit, avg, z_sum = cce_forward(
            e, c, bias, local, rows, softcap, sort, want_row_sum=smoothing > 0
        )
        if vocab is not None:
            lse_r, tgt_logit, z_sum = combine_rows(vocab, lse_r, tgt_logit, z_sum)
        n_classes = c.shape[0] if vocab is None else vocab.total
        n = targets.numel()
        loss = torch.zeros(n, device=e.device, dtype=torch.float32).index_copy_(
            0, rows, row_loss(lse_r, tgt_logit, z_sum, smoothing, z_loss, n_classes)
        )
        lse = torch.zeros_like(loss).index_copy_(0, rows, lse_r)
        perm = torch.argsort(avg, descending=True) if sort else None
        ctx.save_for_backward(e, c, bias, local, rows, lse_r, perm)
        ctx.opts = (softcap, reduction, filter_eps, smoothing, z_loss, n_classes, vocab)
        scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
        out = loss if reduction == "none" else loss.sum() * scale
        return out, lse

    @staticmethod
    @first_order
    def backward(ctx, g_loss, g_lse):
        from kernels.cce.triton_bwd import cce_backward

        e, c, bias, local, rows, lse_r, perm = ctx.saved_tensors
        softcap, reduction, filter_eps, smoothing, z_loss, n_classes, vocab = ctx.opts
        if reduction == "none":
            wl = g_loss.float().index_select(0, rows)
        else:
            scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
            wl = (g_loss.float() * scale).expand(rows.numel()).contiguous()
        wz = g_lse.float().index_select(0, rows) if g_lse is not None else None
        if z_loss:  # d (z_loss lse^2) / d lse = 2 z_loss lse: an LSE-gradient weight
            wz = wl * (2.0 * z_loss) * lse_r + (0.0 if wz is None else wz)
        de, dc, db = cce_backward(
            e, c, bias, local, rows, lse_r, wl, wz, softcap, filter_eps, perm,
            label_smoothing=smoothing, n_classes=n_classes,
        )  # fmt: skip
        if vocab is not None:
            vocab.all_reduce_(de)
        db = db.to(bias.dtype) if db is not None else None
        return de.to(e.dtype), dc.to(c.dtype), db, *([None] * 9)


def linear_cross_entropy_impl(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool | int = False,
    filter_eps: float | str | None = "auto",
    return_lse: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    sort_vocab: bool = False,
    memory_target: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab: VocabShard | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cut Cross-Entropy on validated inputs: e (..., D), c (V, D), targets (...), bias (V,).

    Returns the loss (scalar, or shaped like ``targets`` for "none") and with ``return_lse`` the
    per-token LSE shaped like ``targets``, both fp32 (fp64 for fp64 inputs). ``shift`` k (True
    = 1): e[..., :-k, :] predicts targets[..., k:] without copying e, and per-token outputs have
    shape (..., T - k) (as in cut_cross_entropy). ``chunk_size`` / ``memory_target``: the
    chunked path's rows per chunk, or the peak memory it may use as a multiple of the gradient
    buffers (default 1.25). ``label_smoothing`` eps and ``z_loss`` coefficient: see
    ``kernels.cce.chunked.row_loss``. ``vocab``: c and bias hold this rank's vocabulary shard
    (chunked and Triton paths), targets are global ids, e is replicated; every rank gets the
    global loss and LSE and the full gradient of e. Wijmans et al. 2024, arXiv 2411.09009.
    """
    d, k = c.shape[1], int(shift)
    targets = targets.to(torch.int64)  # uint8 ids would wrap ignore_index (-100 -> 156)
    e2 = e.reshape(targets.numel(), d)  # (N, D), a view when e is contiguous
    if k:
        pad = targets.new_full((*targets.shape[:-1], k), ignore_index)
        t = torch.cat([targets[..., k:], pad], dim=-1).reshape(-1)  # (N,)
    else:
        t = targets.reshape(-1).contiguous()  # Triton reads the ids unstrided
    if impl == "auto":
        cuda = e.device.type == "cuda" and e.dtype != torch.float64
        impl = "triton" if cuda else "chunked"
    if impl == "chunked":
        out = chunked_linear_cross_entropy(
            e2, c, t, bias, ignore_index, softcap, reduction, return_lse, chunk_size,
            memory_target, label_smoothing, z_loss, vocab,
        )  # fmt: skip
        loss, lse = out if return_lse else (out, None)
    elif impl == "triton":
        _check_triton_available(e.device, e.dtype)
        eps = resolve_filter_eps(filter_eps, e.dtype)
        loss, lse = _TritonCCE.apply(
            e2, c, bias, t, ignore_index, softcap, reduction, eps, sort_vocab, label_smoothing,
            z_loss, vocab,
        )  # fmt: skip
    elif impl == "reference":
        if vocab is not None:
            raise ValueError(
                "impl='reference' is single-process; a vocabulary shard needs 'chunked' or 'triton'"
            )
        loss, lse = reference_linear_cross_entropy(
            e2, c, t, bias, ignore_index, softcap, reduction, return_lse,
            label_smoothing=label_smoothing, z_loss=z_loss,
        )  # fmt: skip
        loss, lse = loss.to(acc_dtype(e.dtype)), lse.to(acc_dtype(e.dtype))
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def per_token(x: torch.Tensor) -> torch.Tensor:
        x = x.view(targets.shape)
        return x[..., :-k] if k else x

    if reduction == "none":
        loss = per_token(loss)
    return (loss, per_token(lse)) if return_lse else loss

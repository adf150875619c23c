"""Triton backward of Cut Cross-Entropy: recompute each logit tile, skip negligible tiles.

One program per (row block, vocabulary block) tile: it recomputes the logits over D, forms
d = softmax - onehot (label smoothing: minus the smoothed target distribution; plus the
LSE-gradient term), skips the tile when every |d| is below
``filter_eps`` (gradient filtering), scales by the per-row output gradients, applies the softcap
chain rule and atomically adds d @ C into dE, d^T @ E into dC and the column sums into dbias
(fp32 accumulators). An optional vocabulary permutation (sorted by average logit) makes the
skippable tiles cluster. Set TRITON_INTERPRET=1 before importing this module to run on CPU.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cce.triton_utils import dot_precision, mma, tanh_softcap, upcast_dot


@triton.jit
def _cce_bwd_kernel(
    E, C, Bias, Targets, Rows, Lse, WLoss, WLse, VPerm, DE, DC, DBias,
    n_rows, V, D, softcap, filter_eps, smoothing, smooth_per_class,
    stride_en, stride_ed, stride_cv, stride_cd,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LSE_GRAD: tl.constexpr,
    HAS_PERM: tl.constexpr, FILTER: tl.constexpr, SMOOTH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n_blocks_n = tl.cdiv(n_rows, BLOCK_N)
    pid = tl.program_id(0)
    pid_n, pid_v = pid % n_blocks_n, pid // n_blocks_n
    offs_i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = offs_i < n_rows
    rows = tl.load(Rows + offs_i, mask=i_mask, other=0)  # (BLOCK_N,) row ids of E
    offs_j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_j < V
    if HAS_PERM:
        offs_v = tl.load(VPerm + offs_j, mask=v_mask, other=0)  # (BLOCK_V,) vocabulary ids
    else:
        offs_v = offs_j
    offs_d = tl.arange(0, BLOCK_D)

    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)  # recomputed logit tile
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + offs_d) < D
        e = tl.load(
            E + rows[:, None] * stride_en + (d0 + offs_d)[None, :] * stride_ed,
            mask=i_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        c = tl.load(
            C + offs_v[None, :] * stride_cv + (d0 + offs_d)[:, None] * stride_cd,
            mask=v_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_V)
        acc = mma(e, c.to(e.dtype), acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc, t = tanh_softcap(acc, softcap)

    lse = tl.load(Lse + offs_i, mask=i_mask, other=0.0)
    tile_mask = i_mask[:, None] & v_mask[None, :]
    p = tl.where(tile_mask, tl.exp(acc - lse[:, None]), 0.0)  # (BLOCK_N, BLOCK_V) softmax
    tgt = tl.load(Targets + rows, mask=i_mask, other=-1)
    onehot = (offs_v[None, :] == tgt[:, None]) & tile_mask
    if SMOOTH:  # the target distribution (1 - eps) onehot + eps / V_total
        d = p - (1.0 - smoothing) * onehot.to(tl.float32)
        d = tl.where(tile_mask, d - smooth_per_class, 0.0)
    else:
        d = p - onehot.to(tl.float32)
    if FILTER:
        size = tl.abs(d)
        if HAS_LSE_GRAD:
            size = tl.maximum(size, p)
        if tl.max(size) < filter_eps:
            return

    wl = tl.load(WLoss + offs_i, mask=i_mask, other=0.0)
    g = d * wl[:, None]
    if HAS_LSE_GRAD:
        g += p * tl.load(WLse + offs_i, mask=i_mask, other=0.0)[:, None]
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    if HAS_BIAS:
        tl.atomic_add(DBias + offs_v, tl.sum(g, axis=0), mask=v_mask)

    g_in = g.to(E.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + offs_d) < D
        e_mask = i_mask[:, None] & d_mask[None, :]
        c_mask = v_mask[:, None] & d_mask[None, :]
        e = tl.load(
            E + rows[:, None] * stride_en + (d0 + offs_d)[None, :] * stride_ed,
            mask=e_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        c = tl.load(
            C + offs_v[:, None] * stride_cv + (d0 + offs_d)[None, :] * stride_cd,
            mask=c_mask,
            other=0.0,
        ).to(E.dtype.element_ty)  # (BLOCK_V, BLOCK_D)
        de = mma(g_in, c, None, DOT_PRECISION, UPCAST_DOT)  # (BLOCK_N, BLOCK_D)
        tl.atomic_add(DE + rows[:, None] * D + (d0 + offs_d)[None, :], de, mask=e_mask)
        dc = mma(tl.trans(g_in), e, None, DOT_PRECISION, UPCAST_DOT)  # (BLOCK_V, BLOCK_D)
        tl.atomic_add(DC + offs_v[:, None] * D + (d0 + offs_d)[None, :], dc, mask=c_mask)


def cce_backward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
    w_loss: torch.Tensor,
    w_lse: torch.Tensor | None = None,
    softcap: float | None = None,
    filter_eps: float | None = None,
    vocab_perm: torch.Tensor | None = None,
    block_n: int = 64,
    block_v: int = 128,
    block_d: int = 32,
    label_smoothing: float = 0.0,
    n_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of sum_i w_loss_i * loss_i + w_lse_i * lse_i over the selected rows.

    e (N, D), c (V, D), bias (V,), targets (N,) (ids outside [0, V): no target column here),
    rows (R,) int64, lse / w_loss / w_lse (R,) fp32, vocab_perm (V,) optional vocabulary order
    -> dE (N, D), dC (V, D), dbias (V,), all fp32 (rows not selected get zero). With
    ``label_smoothing`` eps, loss_i is the smoothed CE over ``n_classes`` (default V) classes:
    its logit gradient is softmax - (1 - eps) onehot - eps / n_classes; a tile is skipped only
    where all of that is below ``filter_eps``. Wijmans et al. 2024, arXiv 2411.09009.
    """
    n_rows, (v, d) = rows.numel(), c.shape
    de = torch.zeros(e.shape, device=e.device, dtype=torch.float32)
    dc = torch.zeros((v, d), device=e.device, dtype=torch.float32)
    db = torch.zeros(v, device=e.device, dtype=torch.float32) if bias is not None else None
    if n_rows:
        grid = (triton.cdiv(n_rows, block_n) * triton.cdiv(v, block_v),)
        _cce_bwd_kernel[grid](
            e, c, bias if bias is not None else c, targets, rows, lse, w_loss,
            w_lse if w_lse is not None else w_loss,
            vocab_perm if vocab_perm is not None else rows,
            de, dc, db if db is not None else dc,
            n_rows, v, d, softcap or 1.0, filter_eps or 0.0,
            label_smoothing, label_smoothing / (n_classes or v),
            e.stride(0), e.stride(1), c.stride(0), c.stride(1),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_LSE_GRAD=w_lse is not None, HAS_PERM=vocab_perm is not None,
            FILTER=filter_eps is not None, SMOOTH=label_smoothing > 0,
            DOT_PRECISION=dot_precision(e.dtype), UPCAST_DOT=upcast_dot(e.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        )  # fmt: skip
    return de, dc, db

"""Triton forward of Cut Cross-Entropy: per-row log-sum-exp and target logit, no (N, V) logits.

Each program owns a block of rows and a contiguous range of vocabulary blocks: it computes each
logit tile by a blocked matmul over D (fp32 accumulation), keeps an online (max, sum) over its
vocabulary range and writes one tile-local LSE; the launcher merges the splits with a
logsumexp. The target logit is an indexed dot e_i . c_{t_i} in a second small kernel.
Set TRITON_INTERPRET=1 before importing this module to run it on CPU.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cce.triton_utils import dot_precision, mma, tanh_softcap, upcast_dot


@triton.jit
def _lse_fwd_kernel(
    E, C, Bias, Rows, LsePart, LogitSum, RowSumPart,
    n_rows, V, D, softcap,
    stride_en, stride_ed, stride_cv, stride_cd,
    V_BLOCKS_PER_SPLIT,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SUM: tl.constexpr,
    HAS_ROW_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = offs_i < n_rows
    rows = tl.load(Rows + offs_i, mask=i_mask, other=0)  # (BLOCK_N,) row ids of E
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float32)
    v_start = split * V_BLOCKS_PER_SPLIT * BLOCK_V
    for vb in range(0, V_BLOCKS_PER_SPLIT):
        offs_v = v_start + vb * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
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
            acc, _ = tanh_softcap(acc, softcap)
        if HAS_LOGIT_SUM:
            tile_sum = tl.sum(tl.where(i_mask[:, None], acc, 0.0), axis=0)  # (BLOCK_V,)
            tl.atomic_add(LogitSum + offs_v, tile_sum, mask=v_mask)
        if HAS_ROW_SUM:
            row_sum += tl.sum(tl.where(v_mask[None, :], acc, 0.0), axis=1)
        acc = tl.where(v_mask[None, :], acc, -float("inf"))
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(acc - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(s > 0, m + tl.log(s), -float("inf"))
    tl.store(LsePart + split * n_rows + offs_i, lse, mask=i_mask)
    if HAS_ROW_SUM:
        tl.store(RowSumPart + split * n_rows + offs_i, row_sum, mask=i_mask)


@triton.jit
def _target_logit_kernel(
    E, C, Bias, Targets, Rows, Out,
    n_rows, V, D, softcap,
    stride_en, stride_ed, stride_cv, stride_cd,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = offs_i < n_rows
    rows = tl.load(Rows + offs_i, mask=i_mask, other=0)
    tgt = tl.load(Targets + rows, mask=i_mask, other=0)
    t_mask = i_mask & (tgt >= 0) & (tgt < V)  # a vocabulary shard holds some targets only
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = t_mask[:, None] & ((d0 + offs_d) < D)[None, :]
        e = tl.load(
            E + rows[:, None] * stride_en + (d0 + offs_d)[None, :] * stride_ed, mask=mask, other=0.0
        )
        c = tl.load(
            C + tgt[:, None] * stride_cv + (d0 + offs_d)[None, :] * stride_cd, mask=mask, other=0.0
        )
        acc += tl.sum(e.to(tl.float32) * c.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(Bias + tgt, mask=t_mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        acc, _ = tanh_softcap(acc, softcap)
    tl.store(Out + offs_i, tl.where(t_mask, acc, 0.0), mask=i_mask)


def cce_forward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor,
    softcap: float | None = None,
    want_logit_avg: bool = False,
    block_n: int = 64,
    block_v: int = 128,
    block_d: int = 32,
    n_splits: int | None = None,
    want_row_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LSE and target logit of the selected rows, in fp32, without the (N, V) logits.

    e (N, D), c (V, D), bias (V,), targets (N,) (an id outside [0, V), e.g. -1 for a class on
    another rank's vocabulary shard, gives target logit 0), rows (R,) int64 ids of the rows to
    score -> lse (R,), target_logit (R,), the per-vocabulary average logit (V,) when asked (for
    vocabulary sorting in the backward) and each row's logit sum (R,) when asked (label
    smoothing). Wijmans et al. 2024, arXiv 2411.09009.
    """
    n_rows, (v, d) = rows.numel(), c.shape
    n_blocks_v = triton.cdiv(v, block_v)
    if n_splits is None:  # enough programs to fill a GPU, few enough to keep the merge cheap
        n_splits = max(1, min(n_blocks_v, 1024 // max(1, triton.cdiv(n_rows, block_n))))
    per_split = triton.cdiv(n_blocks_v, n_splits)
    n_splits = triton.cdiv(n_blocks_v, per_split)
    part = torch.empty((n_splits, n_rows), device=e.device, dtype=torch.float32)  # (S, R)
    logit_sum = torch.zeros(v, device=e.device, dtype=torch.float32) if want_logit_avg else None
    row_part = torch.empty_like(part) if want_row_sum else None  # (S, R)
    b = bias if bias is not None else c  # placeholder pointer, unused without HAS_BIAS
    grid = (triton.cdiv(n_rows, block_n), n_splits)
    if n_rows:
        _lse_fwd_kernel[grid](
            e, c, b, rows, part, logit_sum if want_logit_avg else part,
            row_part if want_row_sum else part,
            n_rows, v, d, softcap or 1.0,
            e.stride(0), e.stride(1), c.stride(0), c.stride(1),
            per_split,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_LOGIT_SUM=want_logit_avg, HAS_ROW_SUM=want_row_sum,
            DOT_PRECISION=dot_precision(e.dtype), UPCAST_DOT=upcast_dot(e.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        )  # fmt: skip
    lse = torch.logsumexp(part, dim=0)  # (R,)
    target_logit = torch.empty(n_rows, device=e.device, dtype=torch.float32)
    if n_rows:
        _target_logit_kernel[(triton.cdiv(n_rows, block_n),)](
            e, c, b, targets, rows, target_logit,
            n_rows, v, d, softcap or 1.0,
            e.stride(0), e.stride(1), c.stride(0), c.stride(1),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    logit_avg = logit_sum / max(n_rows, 1) if want_logit_avg else None
    row_sum = None if row_part is None else row_part.sum(0)
    return lse, target_logit, logit_avg, row_sum

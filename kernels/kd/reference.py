"""Materialised fused linear KD loss: the obvious (N, V)-logits version, for tests only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kd.chunked import FusedDivergence


def reference_linear_kd(
    e_s: torch.Tensor,
    w_s: torch.Tensor,
    e_t: torch.Tensor,
    w_t: torch.Tensor,
    targets: torch.Tensor | None,
    divergence: FusedDivergence,
    *,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(1 - h) T^2 D(p_t || p_s) + h CE over materialised logits; autograd backward.

    e_s (N, D_s), w_s (V, D_s), e_t (N, D_t), w_t (V, D_t), targets (N,) or None; D is the
    divergence's per-row maths (in fp32 at least). Returns a scalar (mean over non-ignored rows,
    or sum) or (N,) for "none" (0 on ignored rows). The teacher logits are computed without
    gradient, as in the fused path. Pass ``compute_dtype=torch.float64`` for the float64 ground
    truth of parity tests.
    """
    dt = compute_dtype or torch.promote_types(e_s.dtype, torch.float32)
    zs = e_s.to(dt) @ w_s.to(dt).T  # (N, V)
    with torch.no_grad():
        zt = e_t.to(dt) @ w_t.to(dt).T  # (N, V)
    n = zs.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if targets is None else targets != ignore_index
    div_dt = torch.promote_types(dt, torch.float32)
    s, t = zs[keep].to(div_dt) / temperature, zt[keep].to(div_dt) / temperature  # (n, V)
    kw = {"targets": targets[keep]} if divergence.needs_targets else {}
    rows = (1.0 - hard_weight) * temperature**2 * divergence.per_row(s, t, **kw)  # (n,)
    if hard_weight > 0:
        rows = rows + hard_weight * F.cross_entropy(zs[keep], targets[keep], reduction="none")
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(rows.shape[0], 1)
    return rows.new_zeros(n).masked_scatter(keep, rows)

"""Materialised fused linear KD loss: the obvious (N, V)-logits version, for tests only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.losses import get_divergence


def reference_linear_kd(
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
    compute_dtype: torch.dtype | None = None,
    **hparams: float,
) -> torch.Tensor:
    """(1 - h) D(student || teacher logits) + h CE over materialised logits; autograd backward.

    e_s (N, D_s), w_s (V, D_s), e_t (N, D_t), w_t (V, D_t), targets (N,) or None. ``D`` is
    any per-row divergence of ``core.losses`` (T^2 included there); mean over non-ignored
    rows or sum. The teacher logits are computed without gradient, as in the fused path.
    Pass ``compute_dtype=torch.float64`` for the float64 ground truth of parity tests.
    """
    dt = compute_dtype or torch.promote_types(e_s.dtype, torch.float32)
    zs = e_s.to(dt) @ w_s.to(dt).T  # (N, V)
    with torch.no_grad():
        zt = e_t.to(dt) @ w_t.to(dt).T  # (N, V)
    kw = {"targets": targets, "ignore_index": ignore_index} if targets is not None else {}
    rows = get_divergence(divergence)(
        zs, zt, temperature=temperature, reduction="none", **kw, **hparams
    )
    if hard_weight > 0:
        ce = F.cross_entropy(zs, targets, ignore_index=ignore_index, reduction="none")  # (N,)
        rows = (1.0 - hard_weight) * rows + hard_weight * ce
    if reduction == "sum":
        return rows.sum()
    n_valid = zs.shape[0] if targets is None else int((targets != ignore_index).sum())
    return rows.sum() / max(n_valid, 1)

"""Entropy of discrete distributions: softmax outputs (from logits) and discrete samples.

Shannon, 1948, "A Mathematical Theory of Communication"; Miller, 1955, "Note on the bias of
information estimates" (the Miller-Madow correction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.entropy._registry import ESTIMATORS

__all__ = ["shannon_entropy"]


@ESTIMATORS.register("shannon")
def shannon_entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Per-row entropy (nats) of ``softmax(logits)``: ``H = -sum_c p_c log p_c``.

    Stable for extreme logits via ``log_softmax`` (no ``log(0)``): (..., C) -> (...).
    Differentiable; used as the TTA objective (Wang et al., 2021, Tent, arXiv:2006.10726).
    Shannon, 1948, "A Mathematical Theory of Communication".
    """
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise ValueError(f"shannon_entropy: logits must be a floating tensor, got {type(logits)}")
    if logits.dim() == 0 or logits.shape[dim] == 0:
        raise ValueError(
            f"shannon_entropy: need a non-empty class dim, got shape {tuple(logits.shape)}"
        )
    logp = F.log_softmax(logits, dim=dim)
    # a gap beyond the float range makes logp = -inf and p = 0: mask so 0 * log 0 = 0, not nan
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim)

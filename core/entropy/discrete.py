"""Entropy of discrete distributions: softmax outputs (from logits) and discrete samples.

Shannon, 1948, "A Mathematical Theory of Communication"; Miller, 1955, "Note on the bias of
information estimates" (the Miller-Madow correction).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from core.entropy._registry import ESTIMATORS

__all__ = ["plugin_entropy", "shannon_entropy"]


@ESTIMATORS.register(paper='Shannon 1948, "A Mathematical Theory of Communication"')
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


@ESTIMATORS.register(paper='Miller 1955, "Note on the bias of information estimates"')
def plugin_entropy(samples, miller_madow: bool = True) -> float:
    """Plug-in (maximum-likelihood) entropy in nats of discrete samples (n,) of any hashable
    values, ``-sum_v p_v log p_v`` with empirical p, plus the Miller-Madow bias correction
    ``(m - 1) / (2 n)`` (m = number of observed values) when ``miller_madow``. Returns a float.

    Miller, 1955, "Note on the bias of information estimates".
    """
    if torch.is_tensor(samples):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(
            f"plugin_entropy: samples must be non-empty 1-D, got shape {samples.shape}"
        )
    counts = np.unique(samples, return_counts=True)[1]
    n = samples.size
    p = counts / n
    h = float(-(p * np.log(p)).sum())
    return h + (len(counts) - 1) / (2 * n) if miller_madow else h

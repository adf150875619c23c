"""Materialised linear cross-entropy: the obvious (N, V)-logits version, for tests only.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch


def reference_linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and LSE from materialised logits, in ``compute_dtype`` (default: the input dtype).

    e (N, D), c (V, D), targets (N,), bias (V,) -> (loss, lse): loss a scalar (mean over
    non-ignored rows, 0 if none; or sum) or (N,) for "none"; lse (N,), 0 on ignored rows.
    ``label_smoothing`` eps: (1 - eps) CE + eps (lse - mean_j z_j) as in torch's cross_entropy;
    ``z_loss``: + z_loss lse^2 per row (PaLM, arXiv:2204.02311). Pass
    ``compute_dtype=torch.float64`` for the float64 ground truth of the parity tests.
    """
    dt = compute_dtype or e.dtype
    logits = e.to(dt) @ c.to(dt).T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(dt)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = targets != ignore_index  # (N,)
    safe_t = torch.where(keep, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)  # (N,)
    lse = torch.where(keep, lse, 0.0)
    loss = lse - target_logit  # (N,)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse**2
    loss = torch.where(keep, loss, 0.0)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / keep.sum().clamp_min(1)
    return loss, lse

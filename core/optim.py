"""Optimiser recipes shared by the projects' training loops.

``adamw_warmup_cosine`` is the GPT recipe of the cce project (and the kd students): AdamW with
weight decay on the 2-D weight matrices only (not on biases, norms or embeddings), a linear
warm-up and a cosine decay to a floor, stepped once per optimiser step (Loshchilov & Hutter
2019, "Decoupled Weight Decay Regularization"; the grouping follows nanoGPT / GPT-2 practice).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["adamw_warmup_cosine", "warmup_cosine"]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): (step + 1) / warmup during the
    warm-up, then a cosine from 1 down to ``min_ratio`` at ``total_steps`` (flat after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    model: nn.Module, cfg: dict[str, Any], total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s parameters and its per-step warm-up + cosine LambdaLR.

    ``cfg``: lr, betas, weight_decay (on 2-D weights whose name has no "emb"; biases, norms
    and embeddings get none), warmup_steps, min_lr_ratio. Step the scheduler once per step.
    """
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "emb" not in name else rest).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg["weight_decay"]},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
    )
    warm, floor = cfg["warmup_steps"], cfg["min_lr_ratio"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, total_steps, warm, floor)
    )
    return opt, sched

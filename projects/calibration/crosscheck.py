"""Cross-check against Chidambaram & Ge's released code: their temperature fit, re-expressed.

github.com/2014mchidamb/temp-scaling-limitations, ``models/temperature_scaled_model.py``: T itself
(not log T) starts at 1 and is fitted by a single ``torch.optim.LBFGS([T], lr=0.01).step`` on the
calibration NLL, i.e. at most 20 quasi-Newton iterations of step 0.01 without a line search, so T
moves only part of the way to the NLL optimum. Ours (``core.calibration.TemperatureScaling``,
Guo et al. 2017) minimises the same NLL over log T with a strong-Wolfe line search to
convergence. Both are scored on the same logits so the report can show what the difference does
to "ERM + TS" (README, "Cross-check").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["authors_temperature"]


def authors_temperature(logits: Tensor, labels: Tensor) -> float:
    """T fitted on held-out logits (N, C) and labels (N,) as the authors' code fits it."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (N, C) and labels (N,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    z = logits.detach().double()
    t = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([t], lr=0.01)  # max_iter 20, no line search: the authors' settings

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / t, labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(t.detach())

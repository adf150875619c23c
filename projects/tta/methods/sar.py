"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., 2023, arXiv:2302.12400)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from core.entropy import shannon_entropy
from projects.tta.methods.base import METHODS, TTAMethod, check_number, norm_layers, reliable

__all__ = ["SAR"]


@METHODS.register(name="sar", paper="Niu et al. 2023, arXiv:2302.12400")
class SAR(TTAMethod):
    """Reliable entropy (H < e0) minimised with a sharpness-aware two-step update; recovery.

    Step 1: g = grad of the mean entropy of the reliable samples S1; ascend to w + rho g / |g|.
    Step 2: the entropy there on S2 = {n in S1: H(w + eps) < e0}; its gradient drives the base
    optimizer step from w. Recovery: reset when the EMA(0.9) of the step-2 loss falls below
    ``reset_constant``. Paper defaults: e0 = 0.4 ln K, rho 0.05, SGD lr 0.00025 momentum 0.9,
    reset_constant 0.2; norm layers whose names start with an ``exclude`` prefix are frozen
    (the paper's last block: ``layer4`` / ViT ``blocks.9-11``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float = 0.4,
        rho: float = 0.05,
        reset_constant: float = 0.2,
        exclude: Sequence[str] = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm."),
        optimizer: str = "sgd",
        lr: float = 0.00025,
        **kw,
    ) -> None:
        check_number("SAR", "e_margin", e_margin, 0, math.inf, open_low=True, open_high=True)
        check_number("SAR", "rho", rho, 0, math.inf, open_high=True)
        check_number("SAR", "reset_constant", reset_constant, 0, math.inf, open_high=True)
        if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
            raise TypeError(f"SAR: exclude must be a list of name prefixes, got {exclude!r}")
        self.e_margin, self.rho, self.reset_constant = e_margin, rho, reset_constant
        self.exclude = tuple(exclude)
        self.ema: float | None = None
        self.recoveries = 0
        super().__init__(model, optimizer=optimizer, lr=lr, **kw)

    def collect_params(self) -> list[nn.Parameter]:
        return [
            p
            for n, m in norm_layers(self.model)
            if not n.startswith(self.exclude)
            for p in m.parameters()
        ]

    def reset_state(self) -> None:
        self.ema = None

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        logits = self.model(x)
        e0 = self.e_margin * math.log(logits.shape[1])
        keep = reliable(logits, e0)
        self.optimizer.zero_grad()
        if not keep.any():
            return logits.detach()
        shannon_entropy(logits[keep]).mean().backward()
        # first step: ascend to w + rho g / ||g||
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        scale = self.rho / (torch.stack([g.norm(2) for g in grads]).norm(2) + 1e-12)
        eps = [g * scale for g in grads]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        self.optimizer.zero_grad()
        ent2 = shannon_entropy(self.model(x))[keep]  # full batch: same BN statistics as step 1
        keep2 = ent2.detach() < e0
        if keep2.any():
            loss2 = ent2[keep2].mean()
            loss2.backward()
            self.last_loss = loss2.detach()
            value = loss2.item()
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        # second step: back to w, then the base optimizer step with the gradient at w + eps
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        if keep2.any():
            self.optimizer.step()
        self.optimizer.zero_grad()
        if self.ema is not None and self.ema < self.reset_constant:
            self.recoveries += 1
            self.reset()
        return logits.detach()

"""The unadapted source model: the baseline every TTA table starts from."""

from __future__ import annotations

import torch

from projects.tta.methods.base import METHODS, TTAMethod

__all__ = ["Source"]


@METHODS.register(name="source")
class Source(TTAMethod):
    """The unadapted source model in eval mode: (N, ...) -> logits (N, K), nothing learnt."""

    adapts = False
    needs_norm = False

    def configure_model(self) -> None:
        self.model.eval()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

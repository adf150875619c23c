"""The source models' checkpoints: where tta-train-source writes them and how tta-adapt loads them."""

from __future__ import annotations

from pathlib import Path

import torch

from core.models.resnet import ResNet

__all__ = ["checkpoint_path", "load_source_model"]


def checkpoint_path(params: dict, norm: str) -> Path:
    """``paths.checkpoints/source-<norm>.pt``: the state dict of the ``norm`` source ResNet."""
    return Path(params["paths"]["checkpoints"]) / f"source-{norm}.pt"


def load_source_model(params: dict, norm: str) -> ResNet:
    """The trained source ResNet (He et al. 2016) with norm ``norm`` ("bn" / "gn"), on the CPU
    in eval mode: (N, 1, 28, 28) in [0, 1] -> logits (N, 10)."""
    path = checkpoint_path(params, norm)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dvc repro tta-train-source` first")
    model = ResNet(norm=norm, **params["model"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()

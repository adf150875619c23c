"""Params loading and data helpers shared by the TTA entry points."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

from core.models.resnet import ResNet

DEFAULT_PARAMS = Path("projects/tta/params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params dict from a YAML file."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--params`` option every entry point takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params YAML file")
    return parser


def to_float(images) -> torch.Tensor:
    """uint8 (N, 28, 28) array or tensor -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.as_tensor(images).float().div(255).unsqueeze(1)


def checkpoint_path(params: dict, norm: str) -> Path:
    return Path(params["paths"]["checkpoints"]) / f"source-{norm}.pt"


def load_source_model(params: dict, norm: str) -> ResNet:
    """The trained source ResNet with norm ``norm`` ("bn" / "gn"), in eval mode."""
    path = checkpoint_path(params, norm)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dvc repro tta-train-source` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = ResNet(norm=norm, **params["model"])
    model.load_state_dict(ckpt)
    return model.eval()

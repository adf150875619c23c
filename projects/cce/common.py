"""Params loading shared by the project's entry points (``--params`` picks the CPU or GPU set)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("projects/cce/params.yaml")
LOSS_IMPLS = ("torch", "cce")  # materialised logits + F.cross_entropy, or linear_cross_entropy


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params dict from a YAML file."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--params`` option every entry point takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params YAML file")
    return parser

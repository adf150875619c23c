"""The Fashion-MNIST runs of the calibration study: (loss, seed, noise) jobs, names, directories.

Shared by the train, calibrate and report stages so that all three enumerate the same runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Job", "fmnist_dir", "jobs", "run_name"]

Job = tuple[str, int, float]  # (loss, seed, noise rate)


def run_name(loss: str, seed: int, noise: float = 0.0) -> str:
    """Directory name of one run, e.g. ``mixup_noise0.2_seed1``."""
    return f"{loss}_noise{noise:g}_seed{seed}"


def fmnist_dir(params: Mapping[str, Any]) -> Path:
    """Where the Fashion-MNIST runs live: ``<paths.runs>/fmnist``."""
    return Path(params["paths"]["runs"]) / "fmnist"


def jobs(cfg: Mapping[str, Any]) -> list[Job]:
    """Every run of the ``fmnist`` params block: each loss x seed on clean labels, then each
    noise loss x positive noise rate x seed."""
    main = [(loss, s, 0.0) for loss in cfg["losses"] for s in cfg["seeds"]]
    noisy = [
        (loss, s, float(r))
        for r in cfg["label_noise"]["rates"]
        if r > 0
        for loss in cfg["label_noise"]["losses"]
        for s in cfg["seeds"]
    ]
    return main + noisy

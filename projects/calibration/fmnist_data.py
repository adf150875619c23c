"""Fashion-MNIST splits of the calibration study: train / calibration / test / FMNIST-C, label noise.

Xiao et al. 2017 (Fashion-MNIST, arXiv:1708.07747); Fashion-MNIST-C regenerates the 19
corruptions of Hendrycks & Dietterich 2019 (arXiv:1903.12261) at 5 severities.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.data.corruptions import BENCHMARK, HOLDOUT
from core.data.fashion_mnist import load_fashion_mnist
from core.data.fashion_mnist_c import load_corruption

__all__ = ["CORRUPTIONS", "N_CLASSES", "images", "load_splits", "symmetric_noise"]

N_CLASSES = 10
CORRUPTIONS = BENCHMARK + HOLDOUT


def symmetric_noise(labels: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """With probability ``rate`` replace each label (N,) by a uniformly drawn *other* class
    (symmetric label noise; Natarajan et al. 2013). Returns (N,) int64."""
    if not (isinstance(rate, int | float) and 0 <= rate < 1):
        raise ValueError(f"noise rate must be in [0, 1), got {rate!r}")
    flip = torch.rand(labels.shape, generator=generator) < rate
    shift = torch.randint(1, N_CLASSES, labels.shape, generator=generator)
    return torch.where(flip, (labels + shift) % N_CLASSES, labels)


def images(x: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.as_tensor(np.asarray(x)).float().div(255).unsqueeze(1)


def load_splits(
    cfg: Mapping[str, Any],
    fmnist_root: str | os.PathLike,
    fmnist_c_root: str | os.PathLike | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (images (N, 1, 28, 28), labels (N,))} for "train", "cal", "test" and, when
    ``fmnist_c_root`` is given, "c<severity>" per ``cfg["ood"]["severities"]``.

    A fixed permutation (``split_seed``) of the 60k training images gives the calibration split
    (first ``cal_size``) and the training split (next ``train_size``); "test" is the first
    ``test_size`` test images; "c<s>" pools the same ``per_corruption`` test indices of all 19
    corruptions at severity s.
    """
    data = load_fashion_mnist(fmnist_root)
    g = torch.Generator().manual_seed(cfg["split_seed"])
    perm = torch.randperm(len(data.y_train), generator=g)
    cal, train = perm[: cfg["cal_size"]], perm[cfg["cal_size"] :][: cfg["train_size"]]
    n_test = cfg["test_size"]
    sets = {
        "train": (images(data.x_train[train]), torch.as_tensor(data.y_train[train])),
        "cal": (images(data.x_train[cal]), torch.as_tensor(data.y_train[cal])),
        "test": (images(data.x_test[:n_test]), torch.as_tensor(data.y_test[:n_test])),
    }
    if fmnist_c_root is None:
        return sets
    ood = cfg["ood"]
    idx = torch.randperm(len(data.y_test), generator=g)[: ood["per_corruption"]].numpy()
    for s in ood["severities"]:
        xs, ys = [], []
        for name in CORRUPTIONS:
            x, y = load_corruption(name, s, fmnist_c_root)
            xs.append(images(x[idx]))
            ys.append(torch.as_tensor(np.asarray(y[idx])))
        sets[f"c{s}"] = (torch.cat(xs), torch.cat(ys))
    return sets

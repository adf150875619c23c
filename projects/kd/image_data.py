"""Fashion-MNIST for the kd image stages: the teacher's and the student's training subsets, the
test set, seeded index batches and the loaders that serve them (teacher logits included).

The student learns from a small subset (``data.train_size`` images) of the teacher's training
set (``data.teacher_size``): the data budget of Hinton et al.'s "soft targets as regularizers"
experiment (arXiv:1503.02531, section 5), where the teacher's soft labels carry what the
student's few hard labels cannot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.data.fashion_mnist import load_fashion_mnist
from core.engine.dist import rank_loader

DEFAULT_FMNIST = Path("datasets/fashion-mnist/processed")
N_CLASSES = 10


def _images(x: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return x.float().div(255).unsqueeze(1)


def load_data(cfg: dict[str, Any], root: str | os.PathLike = DEFAULT_FMNIST) -> dict[str, Tensor]:
    """The teacher's set (first ``teacher_size`` of a permutation seeded by ``cfg["seed"]``), the
    student's subset (its first ``train_size``) and the first ``test_size`` test images:
    {x_teacher (Nt, 1, 28, 28), y_teacher (Nt,), x_train (N, 1, 28, 28), y_train, x_test, y_test}."""
    for key in ("teacher_size", "train_size", "test_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg["train_size"] > cfg["teacher_size"]:
        raise ValueError(
            f"data.train_size ({cfg['train_size']}) must be <= data.teacher_size "
            f"({cfg['teacher_size']}): the student's subset is drawn from the teacher's set"
        )
    data = load_fashion_mnist(root)
    n_all = len(data.y_train)
    if cfg["teacher_size"] > n_all or cfg["test_size"] > len(data.y_test):
        raise ValueError(
            f"data.teacher_size <= {n_all} and data.test_size <= {len(data.y_test)} required, "
            f"got {cfg['teacher_size']} and {cfg['test_size']}"
        )
    perm = torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg["seed"]))
    teacher_idx, student_idx = perm[: cfg["teacher_size"]], perm[: cfg["train_size"]]
    n_test = cfg["test_size"]
    return {
        "x_teacher": _images(data.x_train[teacher_idx]),
        "y_teacher": data.y_train[teacher_idx],
        "x_train": _images(data.x_train[student_idx]),
        "y_train": data.y_train[student_idx],
        "x_test": _images(data.x_test[:n_test]),
        "y_test": data.y_test[:n_test],
    }


def batch_indices(n: int, batch_size: int, epochs: int, seed: int) -> list[Tensor]:
    """Index batches (B,) of every epoch in a seeded shuffled order (same seed, same order), so
    every method of a seed sees the same batches."""
    g = torch.Generator().manual_seed(seed)
    return [idx for _ in range(epochs) for idx in torch.randperm(n, generator=g).split(batch_size)]


class IndexBatches(Dataset):
    """Item ``i`` is batch ``i``: the rows ``batches[i]`` of each tensor (a DataLoader with
    ``batch_size=None`` then yields whole batches, in this order, without per-sample collation)."""

    def __init__(self, tensors: Sequence[Tensor], batches: Sequence[Tensor]) -> None:
        n = {len(t) for t in tensors}
        if len(n) != 1:
            raise ValueError(f"tensors must have equal lengths, got {sorted(n)}")
        self.tensors, self.batches = tuple(tensors), list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        idx = self.batches[i]
        return tuple(t[idx] for t in self.tensors)


def loader(
    tensors: Sequence[Tensor], batches: Sequence[Tensor], world: int = 1, train: bool = True
) -> DataLoader:
    """A DataLoader over :class:`IndexBatches` (main process; the data is in memory); over
    ``world`` ranks each loads its rows of every global batch (``core.engine.dist.rank_loader``;
    training batches, ``train``, must split evenly so DDP's gradient mean is the 1-process one).
    """
    return rank_loader(lambda bs: IndexBatches(tensors, bs), batches, world, even=train)


def eval_loader(tensors: Sequence[Tensor], batch_size: int = 1000, world: int = 1) -> DataLoader:
    """Consecutive batches of ``batch_size`` rows, for evaluation and prediction (over
    ``world`` ranks: each rank's rows of each, see :func:`loader`; the torchmetrics metrics
    sync the counts across the ranks)."""
    n = len(tensors[0])
    return loader(tensors, list(torch.arange(n).split(batch_size)), world, train=False)

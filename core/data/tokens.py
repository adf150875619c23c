"""Token-id arrays written by a tokenizer stage: ``<data_dir>/<split>.npy``, memory-mapped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.utils.io import load_npy

__all__ = ["load_token_ids"]


def load_token_ids(
    data_dir: str | os.PathLike,
    split: str,
    how_to_make: str = "`dvc repro projects/cce/dvc.yaml:cce-tokenizer`",
) -> np.ndarray:
    """The ``(n_tokens,)`` id array of ``split``, memory-mapped (no copy into RAM).

    A missing file raises FileNotFoundError, a truncated one ValueError, both naming the path
    and ``how_to_make`` it.
    """
    path = Path(data_dir) / f"{split}.npy"
    array = load_npy(path, mmap_mode="r", remedy=f"run {how_to_make}")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{path}: expected a 1-D integer id array, got {array.dtype} {array.shape}"
        )
    return array

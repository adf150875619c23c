"""Token-id arrays written by a tokenizer stage: ``<data_dir>/<split>.npy``, memory-mapped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_token_ids"]


def load_token_ids(
    data_dir: str | os.PathLike,
    split: str,
    how_to_make: str = "`dvc repro projects/cce/dvc.yaml:cce-tokenizer`",
) -> np.ndarray:
    """The ``(n_tokens,)`` id array of ``split``, memory-mapped (no copy into RAM).

    A missing file raises FileNotFoundError naming the path and ``how_to_make`` it.
    """
    path = Path(data_dir) / f"{split}.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run {how_to_make}")
    return np.load(path, mmap_mode="r")

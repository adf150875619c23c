"""Headline metrics as DVC reads them: small JSON files with short keys and numeric leaves.

``dvc metrics show`` / ``dvc exp show`` print one column per leaf (``a.b.c``), so a metrics file
holds headline numbers only: no lists (per-seed values go in a results file), no sentences as
keys, no strings.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from core.utils.io import atomic_write_json

__all__ = ["check_metrics", "write_metrics"]

KEY = re.compile(r"^[A-Za-z0-9_+@-]{1,32}$")


def check_metrics(metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ValueError unless ``metrics`` is nested dicts of short keys (letters, digits,
    ``_+@-``, at most 32 characters) with finite numbers (or None) as leaves."""
    for k, v in metrics.items():
        where = f"{prefix}{k}"
        if not isinstance(k, str) or not KEY.match(k):
            raise ValueError(f"metrics key {where!r}: use 1-32 letters, digits or _+@-")
        if isinstance(v, Mapping):
            check_metrics(v, where + ".")
        elif v is None:
            continue
        elif isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"metrics value {where!r} must be a finite number, got {v!r}")


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
    """Check ``metrics`` (:func:`check_metrics`) and write them atomically as sorted JSON."""
    check_metrics(metrics)
    atomic_write_json(path, metrics)

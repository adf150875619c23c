"""Summary statistics over seeds: one convention for every report (sample std, ddof = 1)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["MeanStd", "mean_std", "paired_differences", "t_quantile"]


@dataclass(frozen=True)
class MeanStd:
    """Mean, sample standard deviation (ddof = 1; NaN for one value) and count."""

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        """Standard error of the mean, std / sqrt(n) (NaN for n < 2)."""
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan


def mean_std(values: Iterable[float]) -> MeanStd:
    """:class:`MeanStd` of ``values`` (S,), computed in float64; empty or non-finite raise."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"values must be finite, got {x.tolist()}")
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return MeanStd(float(x.mean()), std, int(x.size))


def paired_differences(a: dict, b: dict) -> np.ndarray:
    """``a[s] - b[s]`` (S,) over the seeds both dicts hold, in sorted seed order.

    Pairing by seed removes what two runs of one seed share (initialisation, batch order, data
    subset) from the comparison. Seeds present in only one dict raise.
    """
    if set(a) != set(b):
        raise ValueError(f"paired seeds differ: {sorted(set(a) ^ set(b))}")
    keys = sorted(a)
    return np.array([a[k] - b[k] for k in keys], dtype=np.float64)


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile ``q`` with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(q, df))

"""Input checks shared by the estimators: samples are (n, d) with d >= 1, finite; a bad argument
raises ValueError naming it and its allowed range."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def as_samples(x, name: str = "x", min_n: int = 2) -> np.ndarray:
    """Samples as a float64 numpy array (n, d); a 1-D input is n scalars. Raises ValueError."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d) or (n,), got {x.shape}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name}: need at least {min_n} samples, got n={x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: need at least one feature (d >= 1), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains nan or inf")
    return x


def check_k(k: int, n: int) -> None:
    """A k-th neighbour needs 1 <= k < n."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1 or k >= n:
        raise ValueError(f"k must be an integer with 1 <= k < n={n}, got k={k!r}")


def check_positive(name: str, value: object) -> float:
    """A finite real > 0 (kernel widths, Renyi orders), else ValueError naming it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_count(name: str, value: object, low: int = 1) -> int:
    """An integer >= low (diffusion time, repetitions), else ValueError naming it."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def as_tensor_samples(x, name: str = "x", min_n: int = 2) -> torch.Tensor:
    """Samples as a floating torch tensor (n, d), keeping autograd; numpy becomes float64."""
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if not x.is_floating_point():
        x = x.double()
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d) or (n,), got {tuple(x.shape)}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name}: need at least {min_n} samples, got n={x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: need at least one feature (d >= 1), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains nan or inf")
    return x

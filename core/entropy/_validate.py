"""Input checks shared by the sample-based estimators."""

from __future__ import annotations

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
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains nan or inf")
    return x


def check_k(k: int, n: int) -> None:
    """A k-th neighbour needs 1 <= k < n."""
    if not isinstance(k, int) or k < 1 or k >= n:
        raise ValueError(f"k must be an integer with 1 <= k < n={n}, got k={k}")


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
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains nan or inf")
    return x

"""Kernel (Gram-matrix) information measures: matrix-based Renyi alpha-entropy and mutual
information, and the Cauchy-Schwarz divergence between two samples.

These are differentiable: they take torch tensors (or numpy, computed in float64) and return
0-dim torch tensors in nats, so they can serve as training objectives. Pairwise distances are
taken from coordinate differences (never |x|^2 + |y|^2 - 2 x.y, which cancels catastrophically
once the data sit far from the origin), so every measure is translation invariant in any dtype.
"""

from __future__ import annotations

import math

import torch

from core.entropy._registry import ESTIMATORS
from core.entropy._validate import as_tensor_samples, check_positive

__all__ = ["cs_divergence", "matrix_renyi_entropy", "matrix_renyi_mi"]


def _sq_dists(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m) from coordinate differences (no cancellation)."""
    return torch.cdist(u, v, compute_mode="donot_use_mm_for_euclid_dist").square()


def _gram(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Trace-normalised Gaussian Gram matrix ``A = K / tr K``, K_ij = exp(-|xi-xj|^2 / 2s^2)."""
    check_positive("kernel width sigma", sigma)
    k = torch.exp(-_sq_dists(x, x) / (2 * sigma**2))  # (n, n)
    return k / k.diagonal().sum()


def _spectral_renyi(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """``S_alpha(A) = log(sum_i lam_i^alpha) / (1 - alpha)`` over the eigenvalues of A (tr 1)."""
    check_positive("alpha", alpha)
    lam = torch.linalg.eigvalsh(a).clamp(min=0)  # (n,); tiny negatives are round-off
    if alpha == 1:
        return -torch.special.xlogy(lam, lam).sum()
    return torch.log(lam.pow(alpha).sum()) / (1 - alpha)


@ESTIMATORS.register(paper="Sanchez Giraldo, Rao & Principe 2015, arXiv:1211.2459")
def matrix_renyi_entropy(x, alpha: float = 1.01, sigma: float = 1.0) -> torch.Tensor:
    """Matrix-based Renyi alpha-entropy (nats) of samples x (n, d): the Renyi entropy of the
    eigenvalues of the trace-normalised Gaussian Gram matrix; in [0, log n]; alpha = 1 is the
    von Neumann (Shannon) limit. Returns a 0-dim tensor (differentiable).

    Sanchez Giraldo, Rao & Principe, 2015, "Measures of Entropy from Data Using Infinitely
    Divisible Kernels" (arXiv:1211.2459; the paper uses log2).
    """
    x = as_tensor_samples(x, "matrix_renyi_entropy: x")
    return _spectral_renyi(_gram(x, sigma), alpha)


@ESTIMATORS.register(paper="Sanchez Giraldo, Rao & Principe 2015, arXiv:1211.2459")
def matrix_renyi_mi(
    x, y, alpha: float = 1.01, sigma_x: float = 1.0, sigma_y: float = 1.0
) -> torch.Tensor:
    """Matrix-based Renyi mutual information ``S(A) + S(B) - S(A o B / tr(A o B))`` (nats) of
    paired samples x (n, dx), y (n, dy); the Hadamard product is the joint Gram matrix.
    Returns a 0-dim tensor. Sanchez Giraldo, Rao & Principe, 2015 (arXiv:1211.2459).
    """
    x = as_tensor_samples(x, "matrix_renyi_mi: x")
    y = as_tensor_samples(y, "matrix_renyi_mi: y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"matrix_renyi_mi: x and y need the same n, got {x.shape[0]}, {y.shape[0]}"
        )
    a, b = _gram(x, sigma_x), _gram(y.to(x.dtype), sigma_y)
    ab = a * b
    joint = _spectral_renyi(ab / ab.trace(), alpha)
    return _spectral_renyi(a, alpha) + _spectral_renyi(b, alpha) - joint


@ESTIMATORS.register(
    paper='Jenssen et al. 2006, "The Cauchy-Schwarz divergence and Parzen windowing"'
)
def cs_divergence(x, y, sigma: float = 1.0) -> torch.Tensor:
    """Cauchy-Schwarz divergence ``-log((int p q)^2 / (int p^2 int q^2))`` between the Parzen
    (Gaussian, width sigma) densities of samples x (n, d) and y (m, d), in closed form:
    ``log mean K_xx + log mean K_yy - 2 log mean K_xy`` with ``K(u, v) = exp(-|u-v|^2 / 4 sigma^2)``
    (the kernel of width sigma*sqrt(2); normalisers cancel). >= 0, 0 iff the samples coincide.
    Returns a 0-dim tensor (differentiable). Jenssen, Principe, Erdogmus & Eltoft, 2006,
    "The Cauchy-Schwarz divergence and Parzen windowing".
    """
    x = as_tensor_samples(x, "cs_divergence: x", min_n=1)
    y = as_tensor_samples(y, "cs_divergence: y", min_n=1).to(x.dtype)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cs_divergence: x and y need the same d, got {x.shape[1]}, {y.shape[1]}")
    check_positive("kernel width sigma", sigma)

    def log_mean_k(u, v):  # log mean_ij exp(-|u_i - v_j|^2 / 4 sigma^2), stable
        s = -_sq_dists(u, v) / (4 * sigma**2)  # (n, m)
        return torch.logsumexp(s.flatten(), 0) - math.log(s.numel())

    return log_mean_k(x, x) + log_mean_k(y, y) - 2 * log_mean_k(x, y)

"""Entropy and mutual-information estimators, each registered in ``ESTIMATORS`` by name.

Estimators accept torch tensors or numpy arrays. Return types: ``shannon_entropy`` a per-row
tensor; the kernel measures (``matrix_renyi_*``, ``cs_divergence``) differentiable 0-dim
tensors; the sample estimators (plug-in, kNN, KSG, DSE, DSMI) Python floats. All in nats.

Conventions (pinned by tests): samples are (n, d) with d >= 1 and finite values; the sample
estimators compute in float64; distances come from coordinate differences, so every estimator is
translation invariant in any dtype and kNN is exact under power-of-two rescaling at any
magnitude. A bad argument (k, sigma, alpha, t, repetitions) raises ValueError naming it and its
allowed range.
"""

from core.entropy._registry import ESTIMATORS
from core.entropy.diffusion import (
    diffusion_eigenvalues,
    diffusion_spectral_entropy,
    diffusion_spectral_mi,
)
from core.entropy.discrete import plugin_entropy, shannon_entropy
from core.entropy.knn import knn_entropy, ksg_mi
from core.entropy.matrix import cs_divergence, matrix_renyi_entropy, matrix_renyi_mi

__all__ = [
    "ESTIMATORS",
    "cs_divergence",
    "diffusion_eigenvalues",
    "diffusion_spectral_entropy",
    "diffusion_spectral_mi",
    "knn_entropy",
    "ksg_mi",
    "matrix_renyi_entropy",
    "matrix_renyi_mi",
    "plugin_entropy",
    "shannon_entropy",
]

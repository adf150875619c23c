"""k-nearest-neighbour estimators: Kozachenko-Leonenko differential entropy and KSG mutual
information. Both take torch or numpy samples and return Python floats (nats).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

from core.entropy._registry import ESTIMATORS
from core.entropy._validate import as_samples, check_k

__all__ = ["knn_entropy", "ksg_mi"]


@ESTIMATORS.register(
    paper="Kozachenko & Leonenko 1987; Kraskov et al. 2004, arXiv:cond-mat/0305641"
)
def knn_entropy(x, k: int = 3) -> float:
    """Kozachenko-Leonenko differential entropy (nats) of samples x (n, d) or (n,):
    ``H = psi(n) - psi(k) + log V_d + (d / n) sum_i log eps_i`` with eps_i the Euclidean
    distance to the k-th neighbour and V_d the unit-ball volume. Translation/rotation invariant.

    Kozachenko & Leonenko, 1987, "Sample estimate of the entropy of a random vector";
    Kraskov, Stoegbauer & Grassberger, 2004, eq. 20 (arXiv:cond-mat/0305641).
    """
    x = as_samples(x, "knn_entropy: x")
    n, d = x.shape
    check_k(k, n)
    # H(x / s) + d log s with s a power of two (exact): distances of 1e-200 data would square to
    # 0 and of 1e200 data to inf inside the tree
    log2_s = float(np.floor(np.log2(np.abs(x).max()))) if np.abs(x).max() > 0 else 0.0
    x = np.ldexp(x, -int(log2_s))
    eps = cKDTree(x).query(x, k=k + 1)[0][:, k]  # (n,); column 0 is the point itself
    if (eps == 0).any():
        raise ValueError(
            "knn_entropy: some points have k identical neighbours (zero distance); "
            "the estimator needs continuous samples (increase k or add jitter)"
        )
    log_vd = d / 2 * np.log(np.pi) - gammaln(d / 2 + 1)
    log_s = log2_s * np.log(2.0)
    return float(digamma(n) - digamma(k) + log_vd + d * (np.log(eps).mean() + log_s))


@ESTIMATORS.register(paper="Kraskov, Stoegbauer & Grassberger 2004, arXiv:cond-mat/0305641")
def ksg_mi(x, y, k: int = 3) -> float:
    """KSG mutual information (nats), algorithm 1: ``I = psi(k) + psi(n) - <psi(n_x + 1) +
    psi(n_y + 1)>`` where eps_i is the max-norm distance to the k-th neighbour in the joint
    space and n_x(i) counts points strictly closer than eps_i in the x-marginal.
    x (n, dx) and y (n, dy), torch or numpy; invariant to translating either variable.

    Kraskov, Stoegbauer & Grassberger, 2004, "Estimating mutual information"
    (arXiv:cond-mat/0305641).
    """
    x = as_samples(x, "ksg_mi: x")
    y = as_samples(y, "ksg_mi: y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"ksg_mi: x and y need the same n, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    check_k(k, n)
    xy = np.hstack([x, y])  # (n, dx + dy)
    eps = cKDTree(xy).query(xy, k=k + 1, p=np.inf)[0][:, k]  # (n,)
    r = np.nextafter(eps, 0)  # strictly closer than eps
    # counts include the point itself, so they are n_x + 1 and n_y + 1 directly
    nx1 = cKDTree(x).query_ball_point(x, r, p=np.inf, return_length=True)
    ny1 = cKDTree(y).query_ball_point(y, r, p=np.inf, return_length=True)
    return float(digamma(k) + digamma(n) - (digamma(nx1) + digamma(ny1)).mean())

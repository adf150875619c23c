import numpy as np
import pytest
import torch

from core.entropy import ESTIMATORS, knn_entropy, ksg_mi


def _gauss_entropy(cov):
    d = cov.shape[0]
    return 0.5 * (d * np.log(2 * np.pi * np.e) + np.linalg.slogdet(cov)[1])


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6])
def test_knn_gaussian_entropy_within_0_12_nats(d):
    # measured error at n = 5000, k = 3: |bias| <= 0.055 nats for d <= 6. The tolerance must stay
    # below psi(k) - psi(k - 1) = 1 / (k - 1) = 0.5 nats, or a psi(k) -> psi(k - 1) slip passes
    # (the former 5 % relative tolerance allowed 0.46-0.70 nats at d >= 4).
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d))
    cov = a @ a.T + 2.0 * np.eye(d)  # a different full covariance per d
    x = rng.multivariate_normal(np.zeros(d), cov, size=5000)
    h = _gauss_entropy(cov)
    assert abs(knn_entropy(x, k=3) - h) <= 0.12, (knn_entropy(x, k=3), h)


def test_knn_one_estimate_by_hand():
    # 1-D points 0, 1, 3, 7 with k = 2: second-neighbour distances 3, 2, 3, 6;
    # H = psi(4) - psi(2) + log V_1 + mean log eps with psi(4) - psi(2) = 1/2 + 1/3, V_1 = 2
    x = np.array([0.0, 1.0, 3.0, 7.0])
    h = 1 / 2 + 1 / 3 + np.log(2.0) + np.mean(np.log([3.0, 2.0, 3.0, 6.0]))
    assert knn_entropy(x, k=2) == pytest.approx(h, abs=1e-12)


def test_knn_isotropic_scaled_gaussian():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(5000, 4))
    h = _gauss_entropy(9.0 * np.eye(4))
    assert abs(knn_entropy(x) - h) <= 0.05 * h


def test_knn_uniform_entropy():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 3, size=(5000, 2))
    h = 2 * np.log(3.0)
    assert abs(knn_entropy(x) - h) <= 0.05 * h


def test_knn_invariance_and_scaling():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    h = knn_entropy(x)
    assert knn_entropy(x + 100.0) == pytest.approx(h, abs=1e-9)
    assert knn_entropy(x @ q) == pytest.approx(h, abs=1e-9)
    # H(a X) = H(X) + d log a holds exactly for the estimator too
    assert knn_entropy(2.5 * x) == pytest.approx(h + 3 * np.log(2.5), abs=1e-9)
    assert knn_entropy(torch.from_numpy(x)) == pytest.approx(h, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1e30, 1e200])
def test_knn_scale_equivariance_at_extreme_magnitudes(scale):
    # 1e-200 data used to square to zero distances ("identical neighbours"); 1e200 to inf
    x = np.random.default_rng(6).normal(size=(300, 3))
    assert knn_entropy(x * scale) == pytest.approx(knn_entropy(x) + 3 * np.log(scale), abs=1e-9)


def test_knn_errors():
    with pytest.raises(ValueError, match="k must"):
        knn_entropy(np.arange(10.0).reshape(5, 2), k=5)
    with pytest.raises(ValueError, match="at least"):
        knn_entropy(np.ones((1, 2)), k=1)
    with pytest.raises(ValueError, match="identical"):
        knn_entropy(np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="nan"):
        knn_entropy(np.array([[0.0], [np.nan], [1.0]]), k=1)
    with pytest.raises(ValueError, match="shape"):
        knn_entropy(np.zeros((3, 2, 2)), k=1)
    with pytest.raises(ValueError, match=r"at least one feature \(d >= 1\)"):
        knn_entropy(np.zeros((10, 0)), k=3)  # was an IndexError from the tree
    for k in (True, 2.0, 0):
        with pytest.raises(ValueError, match="k must be an integer"):
            knn_entropy(np.arange(10.0), k=k)


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.9])
def test_ksg_gaussian_mi(rho):
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, rho], [rho, 1.0]])
    xy = rng.multivariate_normal(np.zeros(2), cov, size=3000)
    mi = -0.5 * np.log(1 - rho**2)
    assert abs(ksg_mi(xy[:, 0], xy[:, 1], k=3) - mi) < 0.03


def test_ksg_matches_sklearn_peer():
    # scikit-learn's mutual_info_regression is KSG algorithm 1 on unit-variance variables
    # (it adds 1e-10-scale jitter)
    feature_selection = pytest.importorskip("sklearn.feature_selection")
    rng = np.random.default_rng(4)
    x = rng.normal(size=1500)
    y = np.sin(2 * x) + 0.3 * rng.normal(size=1500)
    x, y = x / x.std(), y / y.std()
    ref = feature_selection.mutual_info_regression(x[:, None], y, n_neighbors=4, random_state=0)
    assert ksg_mi(x, y, k=4) == pytest.approx(ref[0], abs=2e-3)


def test_ksg_multivariate_gaussian_mi():
    rng = np.random.default_rng(5)
    rho = np.array([0.8, 0.5])
    x = rng.normal(size=(3000, 2))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(3000, 2))  # independent pairs
    mi = -0.5 * np.log(1 - rho**2).sum()
    assert abs(ksg_mi(x, y) - mi) < 0.05


def test_ksg_invariance_and_errors():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 2))
    y = x[:, :1] + rng.normal(size=(500, 1))
    mi = ksg_mi(x, y)
    assert ksg_mi(x + 7.0, y - 3.0) == pytest.approx(mi, abs=1e-9)
    assert ksg_mi(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(mi, abs=1e-12)
    with pytest.raises(ValueError, match="same n"):
        ksg_mi(x, y[:-1])
    with pytest.raises(ValueError, match="k must"):
        ksg_mi(x[:3], y[:3], k=3)


def test_registered():
    assert ESTIMATORS.get("knn_entropy") is knn_entropy and ESTIMATORS.get("ksg_mi") is ksg_mi

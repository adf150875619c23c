import math

import numpy as np
import pytest
import torch

from core.entropy import ESTIMATORS, cs_divergence, matrix_renyi_entropy, matrix_renyi_mi


def _x(n=60, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.01, 2.0, 5.0])
def test_renyi_closed_forms(alpha):
    n = 20
    far = torch.arange(n, dtype=torch.float64)[:, None] * 100.0  # Gram = I: A = I / n
    assert matrix_renyi_entropy(far, alpha=alpha).item() == pytest.approx(math.log(n), abs=1e-9)
    same = torch.zeros(n, 2, dtype=torch.float64)  # Gram = 11^T: one eigenvalue 1
    # round-off eigenvalues ~1e-17 enter as lam^alpha, visible for alpha < 1
    assert matrix_renyi_entropy(same, alpha=alpha).item() == pytest.approx(0.0, abs=1e-6)


def test_renyi_alpha2_is_frobenius_and_alpha1_limit():
    x = _x()
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1).numpy() / 2)  # sigma = 1
    a = k / np.trace(k)
    ref = -np.log((a**2).sum())  # S_2 = -log tr(A^2), no eigendecomposition
    assert matrix_renyi_entropy(x, alpha=2.0).item() == pytest.approx(ref, rel=1e-10)
    s1 = matrix_renyi_entropy(x, alpha=1.0).item()
    assert matrix_renyi_entropy(x, alpha=1.0001).item() == pytest.approx(s1, abs=1e-3)
    assert 0 < s1 < math.log(len(x))


def test_renyi_invariances_numpy_and_grad():
    x = _x()
    q, _ = torch.linalg.qr(_x(3, 3, seed=1))
    h = matrix_renyi_entropy(x)
    torch.testing.assert_close(matrix_renyi_entropy(x @ q + 5.0), h)
    torch.testing.assert_close(matrix_renyi_entropy(x[torch.randperm(len(x))]), h)
    torch.testing.assert_close(matrix_renyi_entropy(x.numpy()), h)
    xg = x.clone().requires_grad_(True)
    matrix_renyi_entropy(xg, alpha=2.0).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_renyi_mi_properties():
    n = 20
    far = torch.arange(n, dtype=torch.float64)[:, None] * 100.0
    assert matrix_renyi_mi(far, far).item() == pytest.approx(math.log(n), abs=1e-9)
    x = _x(200, 1)
    noise = _x(200, 1, seed=3)
    dep = matrix_renyi_mi(x, x + 0.1 * noise).item()
    ind = matrix_renyi_mi(x, noise).item()
    assert dep > ind + 0.5 and ind >= -1e-9  # S(A) + S(B) >= S(A o B) (Sanchez Giraldo, 2015)
    with pytest.raises(ValueError, match="same n"):
        matrix_renyi_mi(x, noise[:-1])


def _cs_gauss(m1, m2, a, b):  # CS divergence between N(m1, a I) and N(m2, b I)
    d = len(m1)
    return d / 2 * np.log((a + b) ** 2 / (4 * a * b)) + np.sum((m1 - m2) ** 2) / (a + b)


def test_cs_divergence_gaussian_closed_form():
    # the Parzen estimate targets the CS divergence of the kernel-smoothed densities
    # N(m, (s^2 + sigma^2) I), which is Gaussian again
    # N(m, (s^2 + sigma^2) I), which is Gaussian again; average 4 draws (sd ~0.05 each)
    g = torch.Generator().manual_seed(0)
    n, sigma, shift = 2000, 0.5, torch.tensor([1.0, -0.5], dtype=torch.float64)
    est = []
    for _ in range(4):
        x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        y = 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64) + shift
        est.append(cs_divergence(x, y, sigma=sigma).item())
    ref = _cs_gauss(np.zeros(2), shift.numpy(), 1 + sigma**2, 2.25 + sigma**2)
    assert np.mean(est) == pytest.approx(ref, abs=0.04)


def test_cs_divergence_properties():
    x, y = _x(50, 2), _x(70, 2, seed=1) + 0.5
    assert cs_divergence(x, x).item() == pytest.approx(0.0, abs=1e-12)
    d = cs_divergence(x, y)
    assert d.item() > 0
    torch.testing.assert_close(cs_divergence(y, x), d)
    torch.testing.assert_close(cs_divergence(x - 3.0, y - 3.0), d)
    far = cs_divergence(x, y + 1e3)  # stable far apart (log-sum-exp), no inf or nan
    assert torch.isfinite(far) and far.item() > 1e5
    xg = x.clone().requires_grad_(True)
    cs_divergence(xg, y).backward()
    assert torch.isfinite(xg.grad).all()
    with pytest.raises(ValueError, match="same d"):
        cs_divergence(x, y[:, :1])
    with pytest.raises(ValueError, match="sigma"):
        cs_divergence(x, y, sigma=0.0)


def test_registered():
    for name, fn in [
        ("matrix_renyi_entropy", matrix_renyi_entropy),
        ("matrix_renyi_mi", matrix_renyi_mi),
        ("cs_divergence", cs_divergence),
    ]:
        assert ESTIMATORS.get(name) is fn


# ---- issue 15 item 6: translation invariance in fp32, values in [0, log n] ----


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 1e5])
def test_renyi_and_cs_are_translation_invariant_in_float32(offset):
    x = _x(50, 3).float()
    y = _x(25, 3, seed=4).float() + 0.5
    # float64 reference on exactly the (rounded) float32 values
    xs, ys = x + offset, y + offset
    h = matrix_renyi_entropy(xs)
    assert 0 <= h.item() <= math.log(50) + 1e-5  # was -0.78 at +1e3, -48.7 at +1e4
    assert h.item() == pytest.approx(matrix_renyi_entropy(xs.double()).item(), abs=1e-4)
    d = cs_divergence(xs, ys)
    assert d.item() == pytest.approx(cs_divergence(xs.double(), ys.double()).item(), abs=1e-4)
    mi = matrix_renyi_mi(xs, xs[:, :1])
    assert mi.item() == pytest.approx(
        matrix_renyi_mi(xs.double(), xs[:, :1].double()).item(), abs=1e-4
    )


def test_gram_is_trace_normalised():
    from core.entropy.matrix import _gram

    a = _gram(_x(30, 2).float() + 1e4, 1.0)
    assert a.trace().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: matrix_renyi_entropy(x, alpha=0.0), "alpha must be a finite number > 0"),
        (lambda x: matrix_renyi_entropy(x, alpha=float("inf")), "alpha"),
        (lambda x: matrix_renyi_entropy(x, sigma=float("nan")), "sigma must be a finite number"),
        (lambda x: matrix_renyi_mi(x, x, sigma_y=-1.0), "sigma"),
        (lambda x: cs_divergence(x, x, sigma=float("inf")), "sigma"),
        (lambda x: matrix_renyi_entropy(x[:, :0]), r"at least one feature"),
    ],
)
def test_hyperparameters_and_empty_features_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call(_x(10, 2))

import numpy as np
import pytest
import torch

from core.entropy import (
    ESTIMATORS,
    diffusion_eigenvalues,
    diffusion_spectral_entropy,
    diffusion_spectral_mi,
)


def _clusters(k=5, per=40, d=3, spread=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 100.0
    x = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(k * per, d))
    return x, np.repeat(np.arange(k), per)


def test_eigenvalues_match_nonsymmetric_diffusion_matrix():
    x = np.random.default_rng(0).normal(size=(80, 4))
    g = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * 1.5**2))
    p = g / g.sum(1, keepdims=True)  # row-stochastic diffusion matrix
    ref = np.sort(np.linalg.eigvals(p).real)[::-1]
    np.testing.assert_allclose(diffusion_eigenvalues(x, sigma=1.5), ref, atol=1e-10)
    assert diffusion_eigenvalues(x, sigma=1.5)[0] == pytest.approx(1.0)


def test_dse_closed_forms():
    n = 30
    far = np.arange(n)[:, None] * 1e3  # P = I: n - 1 equal non-trivial eigenvalues
    assert diffusion_spectral_entropy(far, sigma=1.0) == pytest.approx(np.log(n - 1), abs=1e-9)
    # k tight, well-separated clusters: k eigenvalues ~ 1, the rest ~ (spread / sigma)^2
    x, _ = _clusters(k=5)
    assert diffusion_spectral_entropy(x, sigma=1.0) == pytest.approx(np.log(4), abs=1e-2)


def test_dse_matches_definition_and_t():
    x = np.random.default_rng(1).normal(size=(100, 5))
    lam = np.abs(np.sort(np.linalg.eigvals(_p(x, 2.0)).real)[::-1][1:]) ** 2
    p = lam / lam.sum()
    ref = -(p * np.log(p)).sum()
    assert diffusion_spectral_entropy(x, sigma=2.0, t=2) == pytest.approx(ref, rel=1e-8)
    # a larger diffusion time concentrates the spectrum
    assert diffusion_spectral_entropy(x, 2.0, t=5) < diffusion_spectral_entropy(x, 2.0, t=1)


def _p(x, sigma):
    g = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * sigma**2))
    return g / g.sum(1, keepdims=True)


def test_dse_invariances_and_torch_input():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    h = diffusion_spectral_entropy(x, sigma=1.0)
    assert diffusion_spectral_entropy(x @ q + 4.0, sigma=1.0) == pytest.approx(h, abs=1e-8)
    assert diffusion_spectral_entropy(x[rng.permutation(60)], sigma=1.0) == pytest.approx(
        h, abs=1e-8
    )
    assert diffusion_spectral_entropy(torch.from_numpy(x), sigma=1.0) == pytest.approx(h, abs=1e-12)


def test_dsmi_informative_vs_shuffled_labels():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 6)) * 3
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + rng.normal(size=(200, 6))
    info = diffusion_spectral_mi(x, y, sigma=2.0)
    shuffled = diffusion_spectral_mi(x, rng.permutation(y), sigma=2.0)
    assert info > shuffled + 0.2 and abs(shuffled) < 0.1, (info, shuffled)
    assert diffusion_spectral_mi(torch.from_numpy(x), torch.from_numpy(y), sigma=2.0) == info


def test_errors():
    x = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match="sigma"):
        diffusion_spectral_entropy(x, sigma=0.0)
    with pytest.raises(ValueError, match="t must"):
        diffusion_spectral_entropy(x, t=0)
    with pytest.raises(ValueError, match="at least"):
        diffusion_spectral_entropy(x[:1])
    with pytest.raises(ValueError, match="labels"):
        diffusion_spectral_mi(x, np.zeros(9))
    with pytest.raises(ValueError, match="2 samples"):
        diffusion_spectral_mi(x, np.arange(10))


def test_registered():
    assert ESTIMATORS.get("diffusion_spectral_entropy") is diffusion_spectral_entropy
    assert ESTIMATORS.get("diffusion_spectral_mi") is diffusion_spectral_mi


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: diffusion_spectral_entropy(x, t=0), "diffusion time t must be an integer >= 1"),
        (lambda x: diffusion_spectral_entropy(x, t=1.5), "diffusion time t"),
        (lambda x: diffusion_spectral_entropy(x, sigma=float("nan")), "sigma must be a finite"),
        (lambda x: diffusion_spectral_entropy(x[:, :0]), "at least one feature"),
        (lambda x: diffusion_spectral_mi(x, [0, 1] * 10, repetitions=0), "repetitions must be"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, match):
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match=match):
        call(x)

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from core.entropy import ESTIMATORS, plugin_entropy, shannon_entropy


def test_shannon_matches_scipy_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1).numpy()
    ref = scipy_entropy(p, axis=-1)
    np.testing.assert_allclose(shannon_entropy(logits).numpy(), ref, rtol=1e-12)


def test_shannon_shapes_and_dim():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert shannon_entropy(x).shape == (2, 5)
    torch.testing.assert_close(shannon_entropy(x, dim=1), shannon_entropy(x.transpose(1, 2)))


def test_shannon_closed_forms():
    assert shannon_entropy(torch.zeros(4, 10)).allclose(torch.full((4,), np.log(10.0)))
    one_hot = torch.tensor([[1e4, 0.0, 0.0], [0.0, -1e4, 1e4]])
    assert torch.equal(shannon_entropy(one_hot), torch.zeros(2))


def test_shannon_extreme_logits_finite_grad():
    x = torch.tensor([[1e4, -1e4, 0.0], [3e38, -3e38, 0.0]], requires_grad=True)
    h = shannon_entropy(x)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(x.grad).all()


def test_shannon_grad_matches_float64_autograd():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    shannon_entropy(x).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    p = torch.softmax(ref, -1)
    (-(p * p.log()).sum()).backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_shannon_rejects_bad_input():
    with pytest.raises(ValueError, match="floating"):
        shannon_entropy(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class dim"):
        shannon_entropy(torch.ones(3, 0))


def test_registered():
    assert ESTIMATORS.get("shannon_entropy") is shannon_entropy


def test_plugin_matches_scipy_and_miller_madow():
    rng = np.random.default_rng(0)
    x = rng.choice(6, size=400, p=[0.4, 0.2, 0.2, 0.1, 0.05, 0.05])
    counts = np.bincount(x)
    ref = scipy_entropy(counts)  # scipy normalises counts
    assert plugin_entropy(x, miller_madow=False) == pytest.approx(ref, abs=1e-12)
    m = (counts > 0).sum()
    assert plugin_entropy(x) == pytest.approx(ref + (m - 1) / (2 * 400), abs=1e-12)
    assert plugin_entropy(torch.from_numpy(x)) == pytest.approx(plugin_entropy(x), abs=1e-12)


def test_plugin_closed_forms_and_labels():
    assert plugin_entropy(np.arange(8).repeat(5), miller_madow=False) == pytest.approx(np.log(8))
    assert plugin_entropy(np.zeros(10)) == 0.0  # one value: no correction either
    # relabelling values leaves the entropy unchanged; strings are fine
    assert plugin_entropy(np.array(["a", "b", "b", "c"])) == pytest.approx(
        plugin_entropy(np.array([7, 3, 3, 1]))
    )


def test_miller_madow_reduces_bias_on_uniform():
    rng = np.random.default_rng(1)
    runs = [rng.integers(0, 20, size=100) for _ in range(200)]
    naive = np.mean([plugin_entropy(r, miller_madow=False) for r in runs])
    mm = np.mean([plugin_entropy(r) for r in runs])
    assert naive < mm and abs(mm - np.log(20)) < abs(naive - np.log(20)) / 3


def test_plugin_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        plugin_entropy(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-empty"):
        plugin_entropy(np.array([]))

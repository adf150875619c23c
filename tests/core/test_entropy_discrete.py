import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from core.entropy import ESTIMATORS, shannon_entropy


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
    assert ESTIMATORS.get("shannon") is shannon_entropy

"""Registry-driven checks (timm style): every registered entry is tested without editing a test.

A loss whose inputs are not ``(logits (N, C), class targets (N,))`` needs an input factory in
``SPECIAL_INPUTS``; a new entry without one fails here, which is the point.
"""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from core.calibration import CALIBRATORS
from core.entropy import ESTIMATORS
from core.losses import DIVERGENCES, LOSSES

N, C = 7, 5


def _standard():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    return (logits, torch.randint(0, C, (N,), generator=g)), {}


def _mixed():
    (logits, y), _ = _standard()
    mixed = (logits.detach() * 0.5).requires_grad_()
    lam = torch.linspace(0.2, 0.9, N, dtype=torch.float64)[:, None]
    soft = lam * F.one_hot(y, C) + (1 - lam) * F.one_hot(y.roll(1), C)
    return (logits, y, mixed, soft), {}


def _several_mixups():
    (logits, y, _, _), _ = _mixed()
    lam = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)[:, None, None]  # (M, 1, 1)
    soft = lam * F.one_hot(y, C) + (1 - lam) * F.one_hot(y.roll(1), C)  # (M, N, C)
    mixed = (logits.detach()[None] * lam).requires_grad_()
    return (logits, y, mixed, soft), {}


def _soft():
    (logits, y), _ = _standard()
    return (logits, 0.7 * F.one_hot(y, C) + 0.3 * F.one_hot(y.roll(1), C)), {}


def _adv():
    (logits, y), _ = _standard()
    return (logits, y), {"adv_logits": logits.detach() + 0.1}


def _linear():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(N, 3, generator=g, dtype=torch.float32, requires_grad=True)
    w = torch.randn(C, 3, generator=g, dtype=torch.float32, requires_grad=True)
    return (e, w, torch.randint(0, C, (N,), generator=g)), {}


SPECIAL_INPUTS = {
    "adv_comp_sum": _adv,
    "linear_cross_entropy": _linear,
    "mixup_cross_entropy": _soft,
    "mndcg": _several_mixups,
    "mrl": _mixed,
}
PAPER = re.compile(r"(19|20)\d\d")  # a docstring cites its paper (authors + year)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_differentiable_and_documented(name):
    fn = LOSSES.get(name)
    assert fn.__doc__ and PAPER.search(fn.__doc__), f"{name}: docstring must cite a paper"
    args, kwargs = SPECIAL_INPUTS.get(name, _standard)()
    loss = fn(*args, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), f"{name}: no gradient reaches the inputs"


@pytest.mark.parametrize(
    "name",
    [n for n in LOSSES.names() if "reduction" in inspect.signature(LOSSES.get(n)).parameters],
)
def test_reductions_agree(name):
    fn = LOSSES.get(name)
    args, kwargs = SPECIAL_INPUTS.get(name, _standard)()
    none = fn(*args, **kwargs, reduction="none")
    assert none.shape == (N,)
    torch.testing.assert_close(fn(*args, **kwargs, reduction="sum"), none.sum())
    torch.testing.assert_close(fn(*args, **kwargs, reduction="mean"), none.mean())


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_every_divergence_is_zero_on_identical_inputs_and_documented(name):
    fn = DIVERGENCES.get(name)
    assert fn.__doc__ and PAPER.search(fn.__doc__), f"{name}: docstring must cite a paper"
    (logits, y), _ = _standard()
    value = fn(logits, logits.detach(), temperature=2.0, targets=y)
    if name != "sinkhorn":  # entropic OT is not zero between identical batches
        torch.testing.assert_close(value, torch.zeros((), dtype=value.dtype), atol=1e-10, rtol=0)
    other = fn(logits, torch.randn(N, C, dtype=torch.float64), temperature=2.0, targets=y)
    assert torch.isfinite(other) and other >= -1e-12


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_every_estimator_is_documented(name):
    fn = ESTIMATORS.get(name)
    assert fn.__doc__ and PAPER.search(fn.__doc__), f"{name}: docstring must cite a paper"


@pytest.mark.parametrize("name", CALIBRATORS.names())
def test_every_calibrator_is_an_nn_module_with_fit(name):
    cls = CALIBRATORS.get(name)
    assert issubclass(cls, torch.nn.Module) and callable(cls.fit)
    assert cls.__doc__ and PAPER.search(cls.__doc__), f"{name}: docstring must cite a paper"

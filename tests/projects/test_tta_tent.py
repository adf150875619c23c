"""Tent's update rule against a hand computation; batch statistics after ``.eval()``; nesterov."""

import pytest
import torch

from projects.tta.methods import build
from tests.projects.tta_helpers import (
    BN,
    assert_params,
    entropy,
    forward,
    images,
    leaves,
    params,
    sgd_step,
    tiny_model,
)

LR = 0.5
pytestmark = pytest.mark.usefixtures("one_thread")


def test_tent_steps_match_the_hand_computation():
    """Two SGD steps on mean_n H(softmax(f(x_n))) over the BN affine params only."""
    method = build("tent", tiny_model(), optimizer="sgd", lr=LR, momentum=0.0)
    p = params(method.model)
    for seed in (1, 2):
        x = images(12, seed)
        q = leaves(p, BN)
        logits = forward(q, x)[1]
        loss = entropy(logits).mean()
        out = method(x)
        torch.testing.assert_close(out, logits.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(method.last_loss, loss.detach(), rtol=1e-12, atol=0)
        p = sgd_step(q, loss, BN, LR)
        assert_params(method.model, p)  # BN affine moved by -lr grad, the rest unchanged
    assert not torch.equal(p["2.weight"], params(tiny_model())["2.weight"])


def test_tent_after_eval_keeps_using_batch_statistics():
    """The authors' Tent removes the BN running buffers, so ``.eval()`` changes nothing."""
    model, x = tiny_model(), images(12)
    bn = model[2]
    p = params(model)
    running = forward(p, x, running=(bn.running_mean, bn.running_var))[1]
    batch = forward(p, x)[1]
    assert (running - batch).abs().max() > 0.5  # the two would be told apart
    method = build("tent", model, optimizer="sgd", lr=LR, momentum=0.0).eval()
    assert method.model[2].running_mean is None and method.model[2].running_var is None
    torch.testing.assert_close(method(x), batch, rtol=1e-12, atol=1e-12)
    trained = build("tent", model, optimizer="sgd", lr=LR, momentum=0.0)  # train mode
    eval_ = build("tent", model, optimizer="sgd", lr=LR, momentum=0.0).eval()
    for seed in (2, 3):
        torch.testing.assert_close(eval_(images(12, seed)), trained(images(12, seed)))
    assert model[2].running_mean is not None  # the caller's model keeps its buffers


@pytest.mark.parametrize("nesterov", [False, True])
def test_tent_sgd_momentum_and_nesterov_first_step(nesterov):
    """SGD's first step: -lr g (heavy ball: buffer = g) or -lr (1 + mu) g (nesterov)."""
    mu = 0.9
    method = build("tent", tiny_model(), optimizer="sgd", lr=LR, momentum=mu, nesterov=nesterov)
    x = images(12)
    q = leaves(params(method.model), BN)
    loss = entropy(forward(q, x)[1]).mean()
    method(x)
    step = LR * (1 + mu) if nesterov else LR
    assert_params(method.model, sgd_step(q, loss, BN, step))

"""EATA's update rule against a hand computation: filters, sample weights, Fisher anchor."""

import math

import pytest
import torch
import torch.nn.functional as F

from projects.tta.methods import build
from tests.projects.tta_helpers import (
    BN,
    K,
    assert_params,
    between,
    entropy,
    forward,
    images,
    leaves,
    params,
    sgd_step,
    tiny_model,
)

LR, ALPHA, FISHER_BS = 0.5, 200.0, 4
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_fisher(p, fisher_x):
    """Mean over batches of the squared gradient of CE(f(x), argmax f(x)) (Niu et al., eq. 9)."""
    acc = {n: torch.zeros_like(p[n]) for n in BN}
    batches = fisher_x.split(FISHER_BS)
    for xb in batches:
        q = leaves(p, BN)
        logits = forward(q, xb)[1]
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), [q[n] for n in BN])
        for n, g in zip(BN, grads):
            acc[n] += g**2
    return {n: acc[n] / len(batches) for n in BN}


def reference_step(p, x, e0, d_margin, mean_probs, fisher, anchor, alpha):
    """One EATA step: keep H < e0 (and |cos(p, m)| < d_margin once m exists), loss
    mean_S H exp(e0 - H) + alpha sum F (theta - theta0)^2. Returns (params, loss, m, keep)."""
    q = leaves(p, BN)
    logits = forward(q, x)[1]
    ent = entropy(logits)
    probs = logits.detach().softmax(1)
    keep = ent.detach() < e0
    if mean_probs is not None:
        cos = (probs @ mean_probs) / (probs.norm(dim=1) * mean_probs.norm())
        keep &= cos.abs() < d_margin
    weights = 1 / torch.exp(ent.detach() - e0)
    loss = (ent * weights)[keep].mean()
    loss = loss + alpha * sum((fisher[n] * (q[n] - anchor[n]) ** 2).sum() for n in BN)
    m = probs[keep].mean(0)
    m = m if mean_probs is None else 0.9 * mean_probs + 0.1 * m
    return sgd_step(q, loss, BN, LR), loss.detach(), m, keep


def test_eata_steps_match_the_hand_computation():
    model, fisher_x = tiny_model(), images(10, seed=5)
    x1, x2 = images(16, seed=1), images(16, seed=2)
    p0 = params(model)
    fisher = reference_fisher(p0, fisher_x)
    # thresholds between reference values, so each filter keeps some samples and drops others
    e0 = between(entropy(forward(p0, x1)[1]), 10)
    p1, loss1, m1, keep1 = reference_step(p0, x1, e0, None, None, fisher, p0, ALPHA)
    logits2 = forward(p1, x2)[1]
    reliable2 = entropy(logits2) < e0
    cos2 = torch.nn.functional.cosine_similarity(logits2.softmax(1), m1[None], dim=1).abs()
    d_margin = between(cos2[reliable2], int(reliable2.sum()) // 2)
    p2, loss2, m2, keep2 = reference_step(p1, x2, e0, d_margin, m1, fisher, p0, ALPHA)
    assert 0 < keep1.sum() < 16 and 0 < keep2.sum() < reliable2.sum()  # both filters bite

    method = build(
        "eata",
        model,
        e_margin=e0 / math.log(K),
        d_margin=d_margin,
        fisher_alpha=ALPHA,
        fisher_data=fisher_x,
        fisher_batch_size=FISHER_BS,
        optimizer="sgd",
        lr=LR,
        momentum=0.0,
    )
    for n in BN:  # the diagonal Fisher and its anchor
        fisher_n, anchor_n = method.fishers[n]
        torch.testing.assert_close(fisher_n, fisher[n], rtol=1e-10, atol=0)
        torch.testing.assert_close(anchor_n, p0[n], rtol=0, atol=0)
    torch.testing.assert_close(method(x1), forward(p0, x1)[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(method.last_loss, loss1, rtol=1e-12, atol=0)
    torch.testing.assert_close(method.mean_probs, m1, rtol=1e-12, atol=0)
    assert_params(method.model, p1)
    method(x2)
    torch.testing.assert_close(method.last_loss, loss2, rtol=1e-12, atol=0)
    torch.testing.assert_close(method.mean_probs, m2, rtol=1e-12, atol=0)
    assert_params(method.model, p2)
    # the Fisher anchor moves the second step by far more than the tolerance
    p2_eta = reference_step(p1, x2, e0, d_margin, m1, fisher, p0, 0.0)[0]
    assert (p2_eta["2.weight"] - p2["2.weight"]).abs().max() > 1e-3


def test_eata_without_fisher_data_is_eta():
    model, x = tiny_model(), images(16)
    p0 = params(model)
    e0 = between(entropy(forward(p0, x)[1]), 12)
    zero = {n: torch.zeros_like(p0[n]) for n in BN}
    p1 = reference_step(p0, x, e0, None, None, zero, p0, 0.0)[0]
    method = build("eata", model, e_margin=e0 / math.log(K), optimizer="sgd", lr=LR, momentum=0)
    method(x)
    assert method.fishers == {}
    assert_params(method.model, p1)


def test_eata_nothing_kept_leaves_the_model_and_the_ema():
    model = tiny_model()
    method = build("eata", model, e_margin=1e-6, optimizer="sgd", lr=LR, momentum=0.0)
    method(images(16))
    assert method.mean_probs is None and method.last_loss is None
    assert_params(method.model, params(model))

"""DeYO's update rule against a hand computation: entropy and PLPD filters, sample weights."""

import math

import pytest
import torch

from projects.tta.methods import build, patch_shuffle
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

LR, GRID, SEED, E_MARGIN = 0.5, 2, 3, 0.4
pytestmark = pytest.mark.usefixtures("one_thread")


def test_deyo_step_matches_the_hand_computation():
    model, x = tiny_model(), images(16)
    p0 = params(model)
    logits = forward(p0, x)[1]
    ent = entropy(logits)
    tau_ent = between(ent, 12)
    keep1 = ent < tau_ent
    # x': the kept images, 2x2 patches shuffled by the method's generator (seeded by ``seed``)
    shuffled = patch_shuffle(x[keep1], GRID, torch.Generator().manual_seed(SEED))
    probs, probs_s = logits[keep1].softmax(1), forward(p0, shuffled)[1].softmax(1)  # BN on S1
    yhat = probs.argmax(1)
    score = probs[range(len(yhat)), yhat] - probs_s[range(len(yhat)), yhat]  # PLPD, eq. 4
    tau_plpd = between(score, int(keep1.sum()) // 2)
    keep2 = score > tau_plpd
    assert 0 < keep2.sum() < keep1.sum() < 16  # both filters bite
    q = leaves(p0, BN)
    ent_q = entropy(forward(q, x)[1])[keep1][keep2]
    e0 = E_MARGIN * math.log(K)
    weights = torch.exp(e0 - ent_q.detach()) + torch.exp(score[keep2])  # eq. 7
    loss = (ent_q * weights).mean()
    p1 = sgd_step(q, loss, BN, LR)

    method = build(
        "deyo",
        model,
        deyo_margin=tau_ent / math.log(K),
        e_margin=E_MARGIN,
        plpd_threshold=tau_plpd,
        patch_grid=GRID,
        optimizer="sgd",
        lr=LR,
        momentum=0.0,
        seed=SEED,
    )
    torch.testing.assert_close(method(x), logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(method.last_loss, loss.detach(), rtol=1e-12, atol=0)
    assert_params(method.model, p1)


def test_deyo_filters_samples_below_the_plpd_threshold():
    model = tiny_model()
    method = build("deyo", model, deyo_margin=2.0, plpd_threshold=0.999)  # PLPD < 1 - p(x')
    method(images(16))
    assert method.last_loss is None
    assert_params(method.model, params(model))


def test_patch_shuffle_permutes_patches():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    assert not torch.equal(x, y)
    # each 4x4 patch of y is some 4x4 patch of x (same image)
    patches = lambda t: t.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)  # noqa: E731
    px, py = patches(x), patches(y)
    for i in range(2):
        assert sorted(map(tuple, px[i].tolist())) == sorted(map(tuple, py[i].tolist()))
    torch.testing.assert_close(patch_shuffle(x, 1), x)
    assert patch_shuffle(torch.rand(3, 1, 18, 18), 4).shape == (3, 1, 18, 18)


@pytest.mark.parametrize(("grid", "exc"), [(0, ValueError), (17, ValueError), (2.0, TypeError)])
def test_patch_shuffle_refuses_bad_grids(grid, exc):
    with pytest.raises(exc, match=r"patch_shuffle: grid must be an integer in \[1, 16\]"):
        patch_shuffle(torch.rand(2, 1, 16, 16), grid)

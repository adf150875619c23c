"""core.losses.consistency against float64 references: closed forms, loops, the authors' code."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.losses import get_loss
from core.losses.consistency import plpd, supcon_loss, symmetric_soft_cross_entropy


def _logits(n=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * 2


def _np_softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# --- symmetric soft cross-entropy (RMT) ------------------------------------------------------


def test_symmetric_soft_ce_matches_numpy_float64():
    s, t = _logits(seed=0), _logits(seed=1)
    p, q = _np_softmax(s.numpy()), _np_softmax(t.numpy())
    expected = 0.5 * -(q * np.log(p)).sum(1) + 0.5 * -(p * np.log(q)).sum(1)  # CE(t,s), CE(s,t)
    out = symmetric_soft_cross_entropy(s, t, reduction="none")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-13)
    torch.testing.assert_close(symmetric_soft_cross_entropy(s, t), out.mean())
    torch.testing.assert_close(symmetric_soft_cross_entropy(s, t, reduction="sum"), out.sum())
    # symmetric in its arguments; equal logits give the Shannon entropy
    torch.testing.assert_close(symmetric_soft_cross_entropy(t, s, reduction="none"), out)
    ent = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(
        symmetric_soft_cross_entropy(s, s, reduction="none").numpy(), ent, rtol=1e-13
    )


def test_symmetric_soft_ce_gradient_closed_form_reaches_both_arguments():
    s, t = _logits(seed=2).requires_grad_(), _logits(seed=3).requires_grad_()
    symmetric_soft_cross_entropy(s, t, reduction="sum").backward()
    p, q = s.detach().softmax(1), t.detach().softmax(1)
    # d/ds [-sum q log p] = p - q;  d/ds [-sum p log q] = -p (log q - sum_k p_k log q_k)
    lq = q.log()
    grad_s = 0.5 * (p - q) - 0.5 * p * (lq - (p * lq).sum(1, keepdim=True))
    torch.testing.assert_close(s.grad, grad_s, rtol=1e-12, atol=1e-14)
    lp = p.log()
    grad_t = 0.5 * (q - p) - 0.5 * q * (lp - (q * lp).sum(1, keepdim=True))
    torch.testing.assert_close(t.grad, grad_t, rtol=1e-12, atol=1e-14)


def test_symmetric_soft_ce_is_not_core_sce():
    """core's ``sce`` (Wang et al. 2019) takes hard labels; this one two soft predictions."""
    s, t = _logits(), _logits(seed=1)
    y = t.argmax(1)
    sce = get_loss("sce")
    assert sce is not symmetric_soft_cross_entropy
    assert not torch.allclose(sce(s, y), symmetric_soft_cross_entropy(s, t))


@pytest.mark.parametrize(
    ("s", "t", "kw", "match"),
    [
        (torch.randn(4, 3), torch.randn(4, 2), {}, "same shape"),
        (torch.randn(4), torch.randn(4), {}, r"\(N, K\)"),
        (torch.zeros(4, 3, dtype=torch.long), torch.randn(4, 3), {}, "floating"),
        (torch.randn(4, 3), torch.randn(4, 3), {"reduction": "avg"}, "reduction"),
    ],
)
def test_symmetric_soft_ce_refuses_bad_input(s, t, kw, match):
    with pytest.raises(ValueError, match=match):
        symmetric_soft_cross_entropy(s, t, **kw)


# --- supervised contrastive loss (Khosla et al.; RMT's prototype pull) -----------------------


def _supcon_loop(views: torch.Tensor, tau: float, labels=None) -> float:
    """Khosla et al. eq. 2 one anchor at a time, in python floats."""
    n, v, _ = views.shape
    z = F.normalize(views, dim=2)
    ids = list(range(n)) if labels is None else labels.tolist()
    total, count = 0.0, 0
    for i in range(n):
        for a in range(v):
            others = [(j, b) for j in range(n) for b in range(v) if (j, b) != (i, a)]
            denom = sum(math.exp(float(z[i, a] @ z[j, b]) / tau) for j, b in others)
            pos = [(j, b) for j, b in others if ids[j] == ids[i]]
            terms = [float(z[i, a] @ z[j, b]) / tau - math.log(denom) for j, b in pos]
            total += -sum(terms) / len(terms)
            count += 1
    return total / count


def _supcon_authors(views: torch.Tensor, tau: float) -> torch.Tensor:
    """The RMT authors' ``contrastive_loss`` (from HobbitLong/SupContrast), labels=None, mode
    'all', projector = identity: max-shifted logits, exp * mask, base temperature = tau."""
    n, v, _ = views.shape
    mask = torch.eye(n, dtype=views.dtype)
    feats = F.normalize(torch.cat(torch.unbind(views, dim=1), dim=0), p=2, dim=1)
    adc = feats @ feats.T / tau
    logits = adc - adc.max(1, keepdim=True).values.detach()
    mask = mask.repeat(v, v)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(n * v).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(tau / tau) * mean_log_prob_pos).view(v, n).mean()


def test_supcon_matches_a_loop_and_the_authors_code():
    views = torch.randn(4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for tau in (0.1, 0.5, 2.0):
        out = supcon_loss(views, tau)
        assert out.dtype == torch.float64 and out.dim() == 0
        torch.testing.assert_close(out.item(), _supcon_loop(views, tau), rtol=1e-12, atol=0)
        torch.testing.assert_close(out, _supcon_authors(views, tau), rtol=1e-12, atol=0)


def test_supcon_with_labels_matches_a_loop():
    views = torch.randn(5, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 2, 1])
    out = supcon_loss(views, 0.2, labels)
    torch.testing.assert_close(out.item(), _supcon_loop(views, 0.2, labels), rtol=1e-12, atol=0)
    # one view per sample is enough once a label repeats
    singles = views[:, :1]
    torch.testing.assert_close(
        supcon_loss(singles, 0.2, torch.tensor([0, 0, 1, 1, 1])).item(),
        _supcon_loop(singles, 0.2, torch.tensor([0, 0, 1, 1, 1])),
        rtol=1e-12,
        atol=0,
    )


def test_supcon_is_minimal_for_aligned_views_and_has_gradients():
    aligned = torch.eye(4, dtype=torch.float64)[:, None].repeat(1, 3, 1)  # (4, 3, 4)
    noisy = (aligned + 0.3 * torch.randn(4, 3, 4, dtype=torch.float64)).requires_grad_()
    assert supcon_loss(aligned, 0.1) < supcon_loss(noisy.detach(), 0.1)
    supcon_loss(noisy, 0.1).backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("views", "kw", "exc", "match"),
    [
        (torch.randn(4, 3), {}, ValueError, r"\(N, V, D\)"),
        (torch.randn(4, 1, 3), {}, ValueError, "positive"),
        (torch.randn(3, 1, 3), {"labels": torch.tensor([0, 1, 2])}, ValueError, "positive"),
        (torch.randn(4, 2, 3), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, "labels"),
        (torch.randn(4, 2, 3), {"temperature": 0.0}, ValueError, r"temperature .*\(0, inf\)"),
        (torch.randn(4, 2, 3), {"temperature": -0.1}, ValueError, "temperature"),
        (torch.randn(4, 2, 3), {"temperature": float("nan")}, ValueError, "temperature"),
        (torch.randn(4, 2, 3), {"temperature": float("inf")}, ValueError, "temperature"),
        (torch.randn(4, 2, 3), {"temperature": "0.1"}, TypeError, "temperature"),
    ],
)
def test_supcon_refuses_bad_input(views, kw, exc, match):
    with pytest.raises(exc, match=match):
        supcon_loss(views, **kw)


# --- PLPD (DeYO) --------------------------------------------------------------------------


def test_plpd_closed_form_range_and_no_gradient():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    pa, pb = _np_softmax(a.numpy()), _np_softmax(b.numpy())
    expected = [pa[0, 0] - pb[0, 0], pa[1, 2] - pb[1, 2]]  # the class argmax p(x) picks
    np.testing.assert_allclose(plpd(a, b).numpy(), expected, rtol=1e-14)
    s, t = _logits(50, 7).requires_grad_(), _logits(50, 7, seed=4) * 5
    out = plpd(s, t)
    assert not out.requires_grad and ((out > -1) & (out < 1)).all()
    torch.testing.assert_close(plpd(s, s), torch.zeros(50, dtype=torch.float64))


def test_plpd_refuses_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        plpd(torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="logits_shuffled"):
        plpd(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long))

"""Consistency between two views of the same unlabelled inputs, or between a student and its
teacher: the test-time-adaptation maths of RMT (Doebler et al. 2023) and DeYO (Lee et al. 2024).

- ``symmetric_soft_cross_entropy``: RMT's symmetric CE between two soft predictions. Not core's
  ``sce`` (Wang et al. 2019), which is CE + reverse CE against a hard label with log 0 replaced
  by a constant; hence the longer name.
- ``supcon_loss``: the supervised contrastive loss; with ``labels=None`` the views of a sample
  are its only positives (SimCLR's NT-Xent over V views), which is how RMT uses it.
- ``plpd``: DeYO's pseudo-label probability difference between an image and a shuffled view.

None is in the ``LOSSES`` registry: that registry holds ``f(logits, class targets)`` losses.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["plpd", "supcon_loss", "symmetric_soft_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    for t, name in zip((a, b), names):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != 2:
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be floating logits (N, K), got {shape}")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def symmetric_soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """0.5 [CE(p_t, p_s) + CE(p_s, p_t)] with CE(p, q) = -sum_k p_k log q_k, between logits.

    (N, K), (N, K) -> (N,) for ``reduction="none"``, else a scalar. Gradients flow into both
    arguments, as in the authors' code (detach the teacher to stop them).
    Doebler et al., 2023, "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation"
    (RMT, arXiv:2211.13081), eq. 3.
    """
    _check_pair(student, teacher, ("student", "teacher"))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    loss = -0.5 * (teacher.softmax(1) * student.log_softmax(1)).sum(1) - 0.5 * (
        student.softmax(1) * teacher.log_softmax(1)
    ).sum(1)  # (N,)
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def supcon_loss(
    views: torch.Tensor, temperature: float = 0.1, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Supervised contrastive loss over V views of N samples: (N, V, D) -> scalar.

    Each of the N V anchors (features L2-normalised) is scored against the other N V - 1 at
    ``1 / temperature``; its positives are the views of samples with the same label, or, with
    ``labels=None``, the other views of its own sample. Mean over anchors of the mean
    -log-probability of the positives, base temperature = temperature (loss scale 1).
    Khosla et al., 2020, "Supervised Contrastive Learning" (arXiv:2004.11362), eq. 2; RMT
    (Doebler et al., 2023) pulls (source prototype, test feature, augmented feature) together.
    """
    if not torch.is_tensor(views) or not views.is_floating_point() or views.dim() != 3:
        shape = tuple(views.shape) if torch.is_tensor(views) else type(views).__name__
        raise ValueError(f"views must be a floating tensor (N, V, D), got {shape}")
    n, v, _ = views.shape
    if n * v < 2 or (labels is None and v < 2):
        raise ValueError(f"views: every anchor needs a positive, got N={n}, V={v}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number in (0, inf), got {temperature!r}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a number in (0, inf), got {temperature!r}")
    if labels is None:
        ids = torch.arange(n, device=views.device).repeat(v)  # (V N,) sample ids, view-major
    elif labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels must be integer (N,) = ({n},), got {tuple(labels.shape)}")
    else:
        ids = labels.to(views.device).repeat(v)
    z = F.normalize(views.transpose(0, 1).reshape(n * v, -1), dim=1)  # (V N, D), view-major
    sim = z @ z.T / temperature  # (V N, V N)
    self_mask = torch.eye(n * v, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (ids[:, None] == ids[None, :]) & ~self_mask  # (V N, V N)
    if not pos.any(1).all():
        raise ValueError("labels: every anchor needs a positive (a label seen only once, V=1)")
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


def plpd(logits: torch.Tensor, logits_shuffled: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference p_yhat(x) - p_yhat(x'), yhat = argmax p(x): (N,).

    ``logits_shuffled`` are the predictions on x', a view that destroys the object's shape
    (DeYO: patches shuffled). A score in (-1, 1), not a loss: no gradient flows.
    Lee et al., 2024, "Entropy is not Enough for Test-Time Adaptation" (DeYO,
    arXiv:2403.07366), eq. 4. (N, K), (N, K) -> (N,).
    """
    _check_pair(logits, logits_shuffled, ("logits", "logits_shuffled"))
    p, q = logits.detach().softmax(1), logits_shuffled.detach().softmax(1)
    yhat = p.argmax(1, keepdim=True)  # (N, 1)
    return (p.gather(1, yhat) - q.gather(1, yhat)).squeeze(1)

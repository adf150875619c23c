"""Training-time calibration losses: label smoothing, focal loss (fixed gamma and the FLSD-53
schedule), mixup (batch mixer + soft-target CE), and RankMixup's MRL and M-NDCG.

Hard-target losses are ``f(logits (N, C), targets (N,), *, reduction="mean", **hp)``; ``mixup``
takes soft targets (N, C) from ``mixup_batch``; ``mrl`` / ``mndcg`` also take the logits and soft
targets of the mixed batch(es).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.losses._registry import LOSSES

__all__ = [
    "focal",
    "focal_flsd53",
    "label_smoothing",
    "mixup_batch",
    "mixup_cross_entropy",
    "mndcg",
    "mrl",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check(logits: Tensor, targets: Tensor, reduction: str = "mean", soft: bool = False) -> None:
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating (N, C) tensor, got shape {tuple(logits.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if soft:
        if targets.shape != logits.shape or not targets.is_floating_point():
            raise ValueError(
                f"soft targets must be floating {tuple(logits.shape)} (rows summing to 1), "
                f"got {tuple(targets.shape)} {targets.dtype}"
            )
        return
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be integer (N,) = ({logits.shape[0]},), got {tuple(targets.shape)} "
            f"{targets.dtype}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"targets must lie in [0, {logits.shape[1]})")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


@LOSSES.register(paper="Szegedy et al. 2016, arXiv:1512.00567")
def label_smoothing(
    logits: Tensor, targets: Tensor, *, smoothing: float = 0.1, reduction: str = "mean"
) -> Tensor:
    """CE against (1 - s) * onehot + s / C. logits (N, C), targets (N,) -> scalar or (N,).
    Szegedy et al. 2016, "Rethinking the Inception Architecture"; Muller et al. 2019,
    "When does label smoothing help?".
    """
    _check(logits, targets, reduction)
    if not 0 <= smoothing <= 1:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    logp = F.log_softmax(logits, dim=1)  # (N, C)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return _reduce((1 - smoothing) * nll - smoothing * logp.mean(dim=1), reduction)


def _focal_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logp = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    return logp, logp.exp()


@LOSSES.register(paper="Lin et al. 2017, arXiv:1708.02002")
def focal(
    logits: Tensor, targets: Tensor, *, gamma: float = 3.0, reduction: str = "mean"
) -> Tensor:
    """Focal loss -(1 - p_y)^gamma log p_y. logits (N, C), targets (N,). Lin et al. 2017,
    "Focal Loss for Dense Object Detection"; gamma = 3 as in Mukhoti et al. 2020 (FL-3).
    """
    _check(logits, targets, reduction)
    logp, p = _focal_terms(logits, targets)
    return _reduce(-((1 - p) ** gamma) * logp, reduction)


@LOSSES.register(paper="Mukhoti et al. 2020, arXiv:2002.09437")
def focal_flsd53(
    logits: Tensor,
    targets: Tensor,
    *,
    threshold: float = 0.2,
    gammas: tuple[float, float] = (5.0, 3.0),
    reduction: str = "mean",
) -> Tensor:
    """Sample-dependent focal loss FLSD-53: gamma = 5 if p_y < 0.2 else 3 (p_y detached for the
    choice). logits (N, C), targets (N,). Mukhoti et al. 2020, "Calibrating Deep Neural Networks
    using Focal Loss".
    """
    _check(logits, targets, reduction)
    logp, p = _focal_terms(logits, targets)
    gamma = torch.where(p.detach() < threshold, gammas[0], gammas[1])
    return _reduce(-((1 - p) ** gamma) * logp, reduction)


def mixup_batch(
    inputs: Tensor,
    targets: Tensor,
    n_classes: int,
    *,
    alpha: float = 1.0,
    lam: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Mix a batch with a shuffled copy of itself: x' = lam x + (1 - lam) x[perm], likewise the
    one-hot targets. inputs (N, ...), targets (N,) -> (mixed inputs (N, ...), soft targets
    (N, C), lam); lam ~ Beta(alpha, alpha) unless given. Zhang et al. 2018, "mixup: Beyond
    Empirical Risk Minimization".
    """
    if targets.ndim != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"targets must be (N,) with N = {inputs.shape[0]}, got {tuple(targets.shape)}"
        )
    if lam is None:
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    onehot = F.one_hot(targets, n_classes).to(
        inputs.dtype if inputs.is_floating_point() else torch.float32
    )
    return lam * inputs + (1 - lam) * inputs[perm], lam * onehot + (1 - lam) * onehot[perm], lam


@LOSSES.register(paper="Zhang et al. 2018, arXiv:1710.09412")
def mixup_cross_entropy(logits: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """CE against the soft targets of ``mixup_batch``: -sum_c t_c log p_c, which equals
    lam CE(y_a) + (1 - lam) CE(y_b). logits (N, C), targets (N, C). Zhang et al. 2018.
    """
    _check(logits, targets, reduction, soft=True)
    return _reduce(-(targets * F.log_softmax(logits, dim=1)).sum(dim=1), reduction)


@LOSSES.register(paper="Noh et al. 2023, arXiv:2308.11990")
def mrl(
    logits: Tensor,
    targets: Tensor,
    mixed_logits: Tensor,
    mixed_targets: Tensor,
    *,
    margin: float = 2.0,
    alpha: float = 0.1,
) -> Tensor:
    """RankMixup's mixup-based ranking loss: CE(logits, targets) + alpha * mean over samples of
    relu(max_logit(mixed) - max_logit(raw) + margin), skipping samples whose mixed target is
    one-hot (mixed with their own class). logits, mixed_logits (N, C); targets (N,);
    mixed_targets (N, C). Noh et al. 2023, "RankMixup: Ranking-Based Mixup Training for Network
    Calibration" (ICCV), as in the official code.
    """
    _check(logits, targets)
    _check(mixed_logits, mixed_targets, soft=True)
    really_mixed = (mixed_targets == 1).sum(dim=1) == 0  # (N,)
    gap = mixed_logits.max(dim=1).values - logits.max(dim=1).values
    ranking = (really_mixed * F.relu(gap + margin)).mean()
    return F.cross_entropy(logits, targets) + alpha * ranking


@LOSSES.register(paper="Noh et al. 2023, arXiv:2308.11990")
def mndcg(
    logits: Tensor,
    targets: Tensor,
    mixed_logits: Tensor,
    mixed_targets: Tensor,
    *,
    alpha: float = 0.1,
) -> Tensor:
    """RankMixup's M-NDCG: CE(logits, targets) + alpha * mean(1 - NDCG), where per sample the
    gains are max confidences [raw, M mixups ordered by their mixing coefficient max_c t_c,
    descending], the ideal gains are [1, those coefficients], DCG = sum_r g_r / log2(r + 1), and
    NDCG = min(DCG / IDCG, IDCG / DCG). logits (N, C), targets (N,), mixed_logits and
    mixed_targets (M, N, C). Noh et al. 2023 (ICCV), as in the official code.
    """
    _check(logits, targets)
    if mixed_logits.ndim != 3 or mixed_logits.shape[1:] != logits.shape:
        raise ValueError(
            f"mixed_logits must be (M, N, C) with (N, C) = {tuple(logits.shape)}, "
            f"got {tuple(mixed_logits.shape)}"
        )
    if mixed_targets.shape != mixed_logits.shape:
        raise ValueError(
            f"mixed_targets must match mixed_logits {tuple(mixed_logits.shape)}, "
            f"got {tuple(mixed_targets.shape)}"
        )
    coeff = mixed_targets.max(dim=2).values.T  # (N, M)
    conf = mixed_logits.softmax(dim=2).max(dim=2).values.T  # (N, M)
    order = coeff.argsort(dim=1, descending=True)
    raw_conf = logits.softmax(dim=1).max(dim=1, keepdim=True).values  # (N, 1)
    gains = torch.cat([raw_conf, conf.gather(1, order)], dim=1)  # (N, M + 1)
    ideal = torch.cat([torch.ones_like(raw_conf), coeff.gather(1, order)], dim=1)
    discount = torch.log2(
        torch.arange(2, gains.shape[1] + 2, device=logits.device, dtype=gains.dtype)
    )
    dcg, idcg = (gains / discount).sum(dim=1), (ideal / discount).sum(dim=1)
    ndcg = torch.minimum(dcg / idcg, idcg / dcg)
    return F.cross_entropy(logits, targets) + alpha * (1 - ndcg).mean()

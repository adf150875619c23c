"""Training-time calibration losses: label smoothing, focal loss (fixed gamma and the FLSD-53
schedule), mixup (batch mixer + soft-target CE), and RankMixup's MRL and M-NDCG.

Hard-target losses are ``f(logits (N, C), targets (N,), *, reduction="mean", **hp)`` with targets
of any integer dtype; ``mixup_cross_entropy`` takes soft targets (N, C) from ``mixup_batch``;
``mrl`` / ``mndcg`` also take the logits and soft targets of the mixed batch(es). The loss has the
logits' dtype, computed in float32 for fp16 / bf16 logits. Every hyperparameter is checked on each call (ValueError naming the loss, the argument and its range).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.losses._checks import (
    check_class_targets,
    check_int,
    check_number,
    check_reduction,
    float32_inside,
)
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


def _check(
    fn: str, logits: Tensor, targets: Tensor, reduction: str = "mean", soft: bool = False
) -> Tensor:
    """Validate (N, C) logits and targets; return int64 hard targets (or the soft ones)."""
    check_reduction(fn, reduction)
    if soft:
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2:
            raise TypeError(f"{fn}: logits must be a floating (N, C) torch.Tensor")
        if (
            not isinstance(targets, Tensor)
            or targets.shape != logits.shape
            or not targets.is_floating_point()
        ):
            raise ValueError(
                f"{fn}: soft targets must be floating {tuple(logits.shape)} (rows summing to 1), "
                f"got {tuple(getattr(targets, 'shape', ()))} {getattr(targets, 'dtype', '')}"
            )
        return targets
    targets = check_class_targets(fn, logits, targets)
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"{fn}: targets must lie in [0, {logits.shape[1]})")
    return targets


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


@LOSSES.register(paper="Szegedy et al. 2016, arXiv:1512.00567")
@float32_inside
def label_smoothing(
    logits: Tensor, targets: Tensor, *, smoothing: float = 0.1, reduction: str = "mean"
) -> Tensor:
    """CE against (1 - s) * onehot + s / C. logits (N, C), targets (N,) -> scalar or (N,).
    Szegedy et al. 2016, "Rethinking the Inception Architecture"; Muller et al. 2019,
    "When does label smoothing help?".
    """
    targets = _check("label_smoothing", logits, targets, reduction)
    check_number("label_smoothing", "smoothing", smoothing, 0, 1)
    logp = F.log_softmax(logits, dim=1)  # (N, C)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return _reduce((1 - smoothing) * nll - smoothing * logp.mean(dim=1), reduction)


def _focal_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_y, p_y, 1 - p_y floored at the dtype's smallest normal), each (N,).

    The floor changes only 1 - p_y == 0 (p_y rounded to 1): there (1 - p)^gamma with gamma < 1
    has an infinite derivative, and inf * 0 made the whole batch's gradient NaN.
    """
    logp = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    p = logp.exp()
    return logp, p, (1 - p).clamp_min(torch.finfo(p.dtype).tiny)


@LOSSES.register(paper="Lin et al. 2017, arXiv:1708.02002")
@float32_inside
def focal(
    logits: Tensor, targets: Tensor, *, gamma: float = 3.0, reduction: str = "mean"
) -> Tensor:
    """Focal loss -(1 - p_y)^gamma log p_y. logits (N, C), targets (N,). Lin et al. 2017,
    "Focal Loss for Dense Object Detection"; gamma = 3 as in Mukhoti et al. 2020 (FL-3).
    """
    targets = _check("focal", logits, targets, reduction)
    check_number("focal", "gamma", gamma, 0)
    logp, _, one_minus_p = _focal_terms(logits, targets)
    return _reduce(-(one_minus_p**gamma) * logp, reduction)


@LOSSES.register(paper="Mukhoti et al. 2020, arXiv:2002.09437")
@float32_inside
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
    targets = _check("focal_flsd53", logits, targets, reduction)
    check_number("focal_flsd53", "threshold", threshold, 0, 1)
    if not isinstance(gammas, (tuple, list)) or len(gammas) != 2:
        raise ValueError(f"focal_flsd53: gammas must be a pair (below, above), got {gammas!r}")
    for g in gammas:
        check_number("focal_flsd53", "gammas[i]", g, 0)
    logp, p, one_minus_p = _focal_terms(logits, targets)
    gamma = torch.where(p.detach() < threshold, gammas[0], gammas[1])
    return _reduce(-(one_minus_p**gamma) * logp, reduction)


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
    if not isinstance(inputs, Tensor) or inputs.ndim == 0:
        raise TypeError(f"mixup_batch: inputs must be a (N, ...) torch.Tensor, got {inputs!r:.60}")
    if (
        not isinstance(targets, Tensor)
        or targets.dtype == torch.bool
        or targets.is_floating_point()
    ):
        raise TypeError("mixup_batch: targets must be an integer (N,) torch.Tensor")
    if targets.ndim != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"mixup_batch: targets must be (N,) with N = {inputs.shape[0]}, "
            f"got {tuple(targets.shape)}"
        )
    check_int("mixup_batch", "n_classes", n_classes, 1)
    targets = targets.long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= n_classes):
        raise ValueError(f"mixup_batch: targets must lie in [0, n_classes={n_classes})")
    if lam is None:
        check_number("mixup_batch", "alpha", alpha, 0, low_open=True)
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    else:
        lam = check_number("mixup_batch", "lam", lam, 0, 1)
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    onehot = F.one_hot(targets, n_classes).to(
        inputs.dtype if inputs.is_floating_point() else torch.float32
    )
    return lam * inputs + (1 - lam) * inputs[perm], lam * onehot + (1 - lam) * onehot[perm], lam


@LOSSES.register(paper="Zhang et al. 2018, arXiv:1710.09412")
@float32_inside
def mixup_cross_entropy(logits: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """CE against the soft targets of ``mixup_batch``: -sum_c t_c log p_c, which equals
    lam CE(y_a) + (1 - lam) CE(y_b). logits (N, C), targets (N, C). Zhang et al. 2018.
    """
    _check("mixup_cross_entropy", logits, targets, reduction, soft=True)
    return _reduce(-(targets * F.log_softmax(logits, dim=1)).sum(dim=1), reduction)


@LOSSES.register(paper="Noh et al. 2023, arXiv:2308.11990")
@float32_inside
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
    targets = _check("mrl", logits, targets)
    _check("mrl", mixed_logits, mixed_targets, soft=True)
    check_number("mrl", "margin", margin, 0)
    check_number("mrl", "alpha", alpha, 0)
    really_mixed = (mixed_targets == 1).sum(dim=1) == 0  # (N,)
    gap = mixed_logits.max(dim=1).values - logits.max(dim=1).values
    ranking = (really_mixed * F.relu(gap + margin)).mean()
    return F.cross_entropy(logits, targets) + alpha * ranking


@LOSSES.register(paper="Noh et al. 2023, arXiv:2308.11990")
@float32_inside
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
    targets = _check("mndcg", logits, targets)
    check_number("mndcg", "alpha", alpha, 0)
    if (
        not isinstance(mixed_logits, Tensor)
        or mixed_logits.ndim != 3
        or mixed_logits.shape[1:] != logits.shape
    ):
        raise ValueError(
            f"mndcg: mixed_logits must be (M, N, C) with (N, C) = {tuple(logits.shape)}, "
            f"got {tuple(mixed_logits.shape)}"
        )
    if not isinstance(mixed_targets, Tensor) or mixed_targets.shape != mixed_logits.shape:
        raise ValueError(
            f"mndcg: mixed_targets must match mixed_logits {tuple(mixed_logits.shape)}, "
            f"got {tuple(getattr(mixed_targets, 'shape', ()))}"
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

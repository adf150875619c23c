"""Classification losses: the comp-sum family (CE, sum-exponential, GCE, MAE), its smooth
adversarial variant, label-distributionally robust losses (LDR-KL, ALDR-KL, top-k SVM),
symmetric CE, the spherical Z-loss, and PaLM's log-partition penalty.

Every loss is ``f(logits (N, C), targets (N,), *, reduction="mean", ignore_index=-100, **hp)``;
ignored rows contribute 0 and do not count in the mean (as in ``F.cross_entropy``; a mean over no
kept row is NaN, like torch). Targets may have any integer dtype (compared to ``ignore_index`` as
int64); the loss has the logits' dtype, computed in float32 for fp16 / bf16 logits. Every hyperparameter is checked on each call: a bad one
raises ValueError naming the loss, the argument and its allowed range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.losses._checks import (
    check_class_targets,
    check_int,
    check_number,
    check_reduction,
    float32_inside,
)
from core.losses._registry import LOSSES

__all__ = [
    "adv_comp_sum",
    "aldr_kl",
    "ce",
    "comp_sum",
    "gce",
    "ldr_kl",
    "logz_penalty",
    "mae",
    "sce",
    "spherical_zloss",
    "topk_svm",
]


def _prepare(
    fn: str, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate inputs; return (int64 targets with ignored rows set to 0, keep mask), both (N,)."""
    targets = check_class_targets(fn, logits, targets)
    check_reduction(fn, reduction)
    check_int(fn, "ignore_index", ignore_index, -(2**63))
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    if safe.numel() and (safe.min() < 0 or safe.max() >= logits.shape[1]):
        raise ValueError(
            f"{fn}: targets must lie in [0, {logits.shape[1]}) or equal ignore_index={ignore_index}"
        )
    return safe, keep


def _reduce(loss: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Zero ignored rows; 'mean' divides by the number kept (nan if none, like torch)."""
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()


def _target_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p_y = log_softmax(logits)[y]: (N, C), (N,) -> (N,)."""
    return F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)


def _margins(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """a_k = margin * [k != y] + z_k - z_y: (N, C); a_y = 0."""
    z_y = logits.gather(1, targets[:, None])  # (N, 1)
    off = torch.ones_like(logits).scatter_(1, targets[:, None], 0.0)
    return margin * off + logits - z_y


@LOSSES.register(paper="Mao, Mohri & Zhong 2023, arXiv:2304.07288")
@float32_inside
def ce(logits, targets, *, reduction="mean", ignore_index=-100):
    """Cross-entropy ``-log softmax(z)_y`` (the comp-sum loss at tau = 1): (N, C), (N,).

    Mao, Mohri & Zhong, 2023, "Cross-Entropy Loss Functions: Theoretical Analysis and
    Applications" (arXiv:2304.07288).
    """
    _prepare("ce", logits, targets, ignore_index, reduction)
    return F.cross_entropy(logits, targets.long(), reduction=reduction, ignore_index=ignore_index)


@LOSSES.register(paper="Mao, Mohri & Zhong 2023, arXiv:2304.07288")
@float32_inside
def comp_sum(logits, targets, *, tau=1.0, reduction="mean", ignore_index=-100):
    """Comp-sum loss ``Phi^tau(sum_{k != y} exp(z_k - z_y))`` with, for u >= 0,
    ``Phi^1(u) = log(1 + u)`` and ``Phi^tau(u) = ((1 + u)^(1 - tau) - 1) / (1 - tau)``.

    Since 1 + u = 1 / p_y this is ``(p_y^(tau-1) - 1)/(1 - tau)``, computed from log p_y:
    tau = 0 sum-exponential, tau = 1 logistic (CE), 1 < tau < 2 generalised CE (q = tau - 1),
    tau = 2 MAE ``1 - p_y``. (N, C), (N,) -> loss. Mao, Mohri & Zhong, 2023 (arXiv:2304.07288).
    """
    check_number("comp_sum", "tau", tau, 0)
    targets, keep = _prepare("comp_sum", logits, targets, ignore_index, reduction)
    logp = _target_logp(logits, targets)  # (N,)
    if tau == 1:
        loss = -logp
    else:
        loss = torch.expm1((tau - 1) * logp) / (1 - tau)
    return _reduce(loss, keep, reduction)


@LOSSES.register(paper="Zhang & Sabuncu 2018, arXiv:1805.07836")
@float32_inside
def gce(logits, targets, *, q=0.7, reduction="mean", ignore_index=-100):
    """Generalised cross-entropy ``(1 - p_y^q) / q`` (q -> 0: CE, q = 1: MAE), = comp_sum(1 + q).

    Zhang & Sabuncu, 2018, "Generalized Cross Entropy Loss for Training Deep Neural Networks
    with Noisy Labels" (arXiv:1805.07836); default q = 0.7 as in the paper.
    """
    check_number("gce", "q", q, 0, 1, low_open=True)
    return comp_sum(logits, targets, tau=1 + q, reduction=reduction, ignore_index=ignore_index)


@LOSSES.register(paper="Ghosh, Kumar & Sastry 2017, arXiv:1712.09482")
@float32_inside
def mae(logits, targets, *, reduction="mean", ignore_index=-100):
    """Mean absolute error ``1 - p_y`` as comp-sum at tau = 2 (Mao et al., 2023); this is half
    of Ghosh et al.'s ``||e_y - softmax(z)||_1`` (2017, "Robust Loss Functions under Label
    Noise for Deep Neural Networks", arXiv:1712.09482). (N, C), (N,) -> loss.
    """
    return comp_sum(logits, targets, tau=2.0, reduction=reduction, ignore_index=ignore_index)


@LOSSES.register(paper="Mao, Mohri & Zhong 2023, arXiv:2304.07288")
@float32_inside
def adv_comp_sum(
    logits,
    targets,
    *,
    adv_logits,
    tau=1.0,
    rho=1.0,
    nu=1.0,
    reduction="mean",
    ignore_index=-100,
):
    """Smooth adversarial comp-sum loss: ``comp_sum(z / rho) + nu * ||D(z') - D(z)||_2`` where
    ``D(z)_k = z_y - z_k`` (k != y) and ``z'`` are the logits at the perturbed input that
    maximises that distance (the caller's attack, e.g. PGD, supplies ``adv_logits``).

    Mao, Mohri & Zhong, 2023 (arXiv:2304.07288). (N, C), (N,), (N, C) -> loss.
    """
    safe, keep = _prepare("adv_comp_sum", logits, targets, ignore_index, reduction)
    if not isinstance(adv_logits, torch.Tensor) or adv_logits.shape != logits.shape:
        raise ValueError(
            f"adv_comp_sum: adv_logits must be a tensor of the logits' shape "
            f"{tuple(logits.shape)}, got {tuple(getattr(adv_logits, 'shape', ()))}"
        )
    check_number("adv_comp_sum", "rho", rho, 0, low_open=True)
    check_number("adv_comp_sum", "nu", nu, 0)
    base = comp_sum(logits / rho, targets, tau=tau, reduction="none", ignore_index=ignore_index)
    # z_y - z_k differs between z' and z by -(a'_k - a_k) with a = z - z_y; a_y = 0 for both
    diff = _margins(adv_logits, safe, 0.0) - _margins(logits, safe, 0.0)  # (N, C)
    smooth = diff.square().sum(1).add(1e-12).sqrt()  # eps keeps the gradient finite at z' = z
    return _reduce(base + nu * smooth, keep, reduction)


@LOSSES.register(paper="Zhu, Ying & Yang 2023, arXiv:2112.14869")
@float32_inside
def ldr_kl(logits, targets, *, lam=1.0, margin=0.1, reduction="mean", ignore_index=-100):
    """LDR-KL: ``max_{p in simplex} sum_k p_k a_k - lam KL(p || 1/C)
    = lam * log((1/C) sum_k exp(a_k / lam))`` with ``a_k = margin [k != y] + z_k - z_y``.

    lam = 1, margin = 0 gives CE - log C; lam -> 0 the Crammer-Singer max-margin loss
    ``max_k a_k``; lam -> inf the mean of a_k. Same value as LDRLoss_V1 in the authors' code
    (github.com/DixianZhu/LDR, = Optimization-AI/ICML2023_LDR), whose experiment.py uses
    margin 0.1 (our default) and tunes lam in {0.1, 1, 10}; that code also maps the logits to
    softplus(z) / mean softplus(z) first, this function takes them as given. Zhu, Ying & Yang,
    2023, "Label Distributionally Robust Losses for Multi-class Classification"
    (arXiv:2112.14869); paper equations not checked. (N, C), (N,) -> loss.
    """
    check_number("ldr_kl", "lam", lam, 0, low_open=True)
    check_number("ldr_kl", "margin", margin, 0)
    targets, keep = _prepare("ldr_kl", logits, targets, ignore_index, reduction)
    a = _margins(logits, targets, margin)  # (N, C)
    loss = lam * (torch.logsumexp(a / lam, dim=1) - math.log(logits.shape[1]))
    return _reduce(loss, keep, reduction)


@LOSSES.register(paper="Zhu, Ying & Yang 2023, arXiv:2112.14869")
@float32_inside
def aldr_kl(
    logits,
    targets,
    *,
    lam0=1.0,
    alpha=2.0,
    margin=0.1,
    grid=64,
    lam_min=1e-3,
    reduction="mean",
    ignore_index=-100,
):
    """ALDR-KL, LDR-KL whose adversary also picks a per-sample temperature lam:
    ``max_{lam > 0} [ lam log((1/C) sum_k exp(a_k / lam)) - alpha log(C) / (2 lam0) (lam - lam0)^2 ]``
    with ``a_k = margin [k != y] + z_k - z_y``.

    Stationary points satisfy ``lam = lam0 (1 - KL(p_lam || 1/C) / (alpha log C))``, so for
    alpha > 1 the maximiser lies in ``[lam0 (1 - 1/alpha), lam0]`` (lam > 0); we maximise over
    ``grid`` points of that interval (clipped at lam_min) and backpropagate at the argmax
    (envelope theorem). Penalty scale and defaults (alpha = 2, margin = 0.1; lam0 tuned in
    {0.1, 1, 10}) follow the authors' code, ALDRLoss_V1 with experiment.py of
    github.com/DixianZhu/LDR (= Optimization-AI/ICML2023_LDR), which tracks lam per sample by
    one fixed-point step per visit where we maximise exactly. That code also rescales the
    logits first (z / mean|z|); this function takes them as given. Zhu, Ying & Yang, 2023,
    "Label Distributionally Robust Losses for Multi-class Classification: Consistency,
    Robustness and Adaptivity" (ICML 2023, arXiv:2112.14869); paper equations not checked.
    (N, C), (N,) -> loss.
    """
    check_number("aldr_kl", "lam0", lam0, 0, low_open=True)
    check_number("aldr_kl", "alpha", alpha, 0, low_open=True)
    check_number("aldr_kl", "margin", margin, 0)
    check_int("aldr_kl", "grid", grid, 1)
    check_number("aldr_kl", "lam_min", lam_min, 0, low_open=True)
    targets, keep = _prepare("aldr_kl", logits, targets, ignore_index, reduction)
    a = _margins(logits, targets, margin)  # (N, C)
    log_c = math.log(logits.shape[1])
    lo = max(lam_min, lam0 * (1.0 - 1.0 / alpha))
    lams = torch.linspace(lo, lam0, grid, dtype=a.dtype, device=a.device)  # (G,)
    lse = torch.logsumexp(a[:, None, :] / lams[None, :, None], dim=2)  # (N, G)
    obj = lams * (lse - log_c) - alpha * log_c / (2 * lam0) * (lams - lam0) ** 2
    return _reduce(obj.max(dim=1).values, keep, reduction)


@LOSSES.register(paper="Zhu, Ying & Yang 2023, arXiv:2112.14869")
@float32_inside
def topk_svm(logits, targets, *, k=1, margin=1.0, reduction="mean", ignore_index=-100):
    """Top-k SVM member of the LDR family: ``max_{p in simplex, p_j <= 1/k} sum_j p_j a_j``
    = the mean of the k largest ``a_j = margin [j != y] + z_j - z_y`` (a_y = 0 is among the
    candidates, so k = 1 is Crammer & Singer's ``max(0, max_{j != y} a_j)``).

    Zhu, Ying & Yang, 2023 (arXiv:2112.14869); Lapin, Hein & Schiele, 2015, "Top-k Multiclass
    SVM". (N, C), (N,) -> loss.
    """
    targets, keep = _prepare("topk_svm", logits, targets, ignore_index, reduction)
    check_int("topk_svm", "k", k, 1, logits.shape[-1])
    check_number("topk_svm", "margin", margin, 0)
    a = _margins(logits, targets, margin)  # (N, C)
    return _reduce(a.topk(k, dim=1).values.mean(1), keep, reduction)


@LOSSES.register(paper="Wang et al. 2019, arXiv:1908.06112")
@float32_inside
def sce(
    logits, targets, *, alpha=0.1, beta=1.0, log_zero=-4.0, reduction="mean", ignore_index=-100
):
    """Symmetric CE ``alpha CE + beta RCE`` with reverse CE ``-sum_k p_k log q_k`` against the
    one-hot label whose log 0 is replaced by ``log_zero`` = A, i.e. ``RCE = -A (1 - p_y)``.

    Wang et al., 2019, "Symmetric Cross Entropy for Robust Learning with Noisy Labels"
    (arXiv:1908.06112): A = -4 in the paper (the official code clamps q at 1e-4, A = log 1e-4).
    Defaults alpha = 0.1, beta = 1 are the paper's CIFAR-10 setting. (N, C), (N,) -> loss.
    """
    check_number("sce", "alpha", alpha, 0)
    check_number("sce", "beta", beta, 0)
    check_number("sce", "log_zero", log_zero, high=0, high_open=True)
    targets, keep = _prepare("sce", logits, targets, ignore_index, reduction)
    logp = _target_logp(logits, targets)  # (N,)
    loss = -alpha * logp - beta * log_zero * (-torch.expm1(logp))
    return _reduce(loss, keep, reduction)


@LOSSES.register(paper="de Brebisson & Vincent 2016, arXiv:1604.08859")
@float32_inside
def spherical_zloss(logits, targets, *, a=0.1, b=10.0, reduction="mean", ignore_index=-100):
    """Z-loss ``(1/a) log(1 + exp(a (b - z_y)))`` on standardised outputs ``z = (o - mu) / sigma``,
    ``mu = mean o``, ``sigma^2 = mean o^2 - mu^2`` (population): shift and scale invariant, a
    member of the spherical family.

    de Brebisson & Vincent, 2016, "The Z-loss: a shift and scale invariant classification loss
    belonging to the Spherical Family" (arXiv:1604.08859), its definition of L_Z (form checked
    against a summary of the paper; equation number not checked). The paper tunes a and b per
    task; the defaults a = 0.1, b = 10 are ours (unverified), tune them. (N, C), (N,) -> loss.
    """
    check_number("spherical_zloss", "a", a, 0, low_open=True)
    check_number("spherical_zloss", "b", b)
    targets, keep = _prepare("spherical_zloss", logits, targets, ignore_index, reduction)
    mu = logits.mean(1, keepdim=True)
    sigma = (logits - mu).square().mean(1, keepdim=True).add(1e-12).sqrt()  # (N, 1)
    z_y = ((logits - mu) / sigma).gather(1, targets[:, None]).squeeze(1)
    return _reduce(F.softplus(a * (b - z_y)) / a, keep, reduction)


@LOSSES.register(paper="Chowdhery et al. 2022, arXiv:2204.02311")
@float32_inside
def logz_penalty(logits, targets, *, coef=1e-4, reduction="mean", ignore_index=-100):
    """Log-partition regulariser ``coef * (log sum_k exp z_k)^2`` that keeps the softmax
    normaliser near 1; add it to a main loss. Not the spherical Z-loss above.

    Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with Pathways" (arXiv:2204.02311),
    training setup (p. 10): "z-loss" 1e-4 * log^2 Z (checked through secondary sources that
    quote it, not the PDF). Targets only select ignored rows. (N, C), (N,) -> loss.
    """
    check_number("logz_penalty", "coef", coef, 0)
    _, keep = _prepare("logz_penalty", logits, targets, ignore_index, reduction)
    return _reduce(coef * torch.logsumexp(logits, dim=1).square(), keep, reduction)

"""Calibration metrics on probabilities: binned calibration errors, Brier score, NLL.

Binning convention (equal width) follows torchmetrics 1.9.0 exactly so numbers are comparable:
bin ``b`` holds confidences in ``[b / B, (b + 1) / B)`` and a confidence of exactly 1.0 lands in an
extra ``(B + 1)``-th bin of its own (``torch.bucketize(..., right=True)`` on ``linspace(0, 1, B+1)``;
the torchmetrics edge reported as a bug). netcal 1.4.0 instead clips confidences to
``[eps, 1 - eps]``, so 1.0 joins the last bin ``[(B-1)/B, 1]``; both agree whenever no confidence is
exactly 1.0. Empty bins contribute nothing (also to the max of MCE, where they count as 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Norm = Literal["l1", "l2", "max"]
Binning = Literal["equal_width", "equal_mass"]

__all__ = [
    "adaptive_calibration_error",
    "bin_statistics",
    "brier_score",
    "classwise_calibration_error",
    "debiased_l2_calibration_error",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "rms_calibration_error",
]


def _check_probs_labels(probs: Tensor, labels: Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C) probabilities, got shape {tuple(probs.shape)}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = probs.shape[0] = {probs.shape[0]}, "
            f"got shape {tuple(labels.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("need at least one sample, got N = 0")
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be finite and in [0, 1] (pass softmax outputs, not logits)")
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be integer class indices in [0, {probs.shape[1]})")


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def bin_statistics(
    confidences: Tensor, hits: Tensor, n_bins: int = 15, binning: Binning = "equal_width"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean hit rate, mean confidence and sample count of a 1-D confidence vector.

    confidences, hits: (N,). Equal width gives B + 1 bins (the last holds confidence == 1.0, see
    module doc); equal mass sorts confidences and splits them into B chunks of sizes differing by
    at most one (ties split by sort order). Returns (acc, conf, count), each (n_bins_used,);
    empty bins have acc = conf = 0.
    """
    _check_n_bins(n_bins)
    hits = hits.to(confidences.dtype)
    if binning == "equal_width":
        edges = torch.linspace(0, 1, n_bins + 1, dtype=confidences.dtype, device=confidences.device)
        index = torch.bucketize(confidences.contiguous(), edges, right=True) - 1  # (N,) in [0, B]
        n_slots = n_bins + 1
    elif binning == "equal_mass":
        order = torch.argsort(confidences, stable=True)
        index = torch.empty_like(order)
        sizes = [len(c) for c in torch.tensor_split(order, n_bins)]
        index[order] = torch.repeat_interleave(
            torch.arange(n_bins, device=order.device), torch.tensor(sizes, device=order.device)
        )
        n_slots = n_bins
    else:
        raise ValueError(f"binning must be 'equal_width' or 'equal_mass', got {binning!r}")
    count = torch.zeros(n_slots, dtype=confidences.dtype, device=confidences.device)
    count.index_add_(0, index, torch.ones_like(confidences))
    conf = torch.zeros_like(count).index_add_(0, index, confidences)
    acc = torch.zeros_like(count).index_add_(0, index, hits)
    safe = count.clamp_min(1)
    return acc / safe, conf / safe, count


def _binned_error(acc: Tensor, conf: Tensor, count: Tensor, norm: Norm) -> Tensor:
    weight = count / count.sum()
    gap = (acc - conf).abs()
    if norm == "l1":
        return (gap * weight).sum()
    if norm == "l2":
        return (gap.square() * weight).sum().sqrt()
    if norm == "max":
        return gap.max()
    raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}")


def _top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    _check_probs_labels(probs, labels)
    confidences, predictions = probs.max(dim=1)
    return confidences, predictions.eq(labels)


def expected_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, norm: Norm = "l1"
) -> Tensor:
    """Top-label ECE with equal-width bins (torchmetrics convention; norm l1 = ECE, l2 = RMS,
    max = MCE). probs: (N, C) softmax outputs, labels: (N,). Guo et al. 2017, "On Calibration of
    Modern Neural Networks"; Naeini et al. 2015.
    """
    confidences, hits = _top_label(probs, labels)
    return _binned_error(*bin_statistics(confidences, hits, n_bins), norm)


def maximum_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """MCE: the largest |accuracy - confidence| over non-empty equal-width bins. probs: (N, C).
    Naeini et al. 2015, "Obtaining Well Calibrated Probabilities Using Bayesian Binning".
    """
    return expected_calibration_error(probs, labels, n_bins, norm="max")


def rms_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """RMS calibration error: sqrt(sum_b w_b (acc_b - conf_b)^2), equal-width bins. probs: (N, C).
    Hendrycks et al. 2019 / Kumar et al. 2019 (plug-in L2 estimate, biased upwards).
    """
    return expected_calibration_error(probs, labels, n_bins, norm="l2")


def adaptive_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, norm: Norm = "l1"
) -> Tensor:
    """Top-label ECE with equal-mass bins (each bin holds N / B samples). probs: (N, C).
    Nixon et al. 2019, "Measuring Calibration in Deep Learning" (top-label variant).
    """
    confidences, hits = _top_label(probs, labels)
    return _binned_error(*bin_statistics(confidences, hits, n_bins, "equal_mass"), norm)


def classwise_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, norm: Norm = "l1"
) -> Tensor:
    """Class-wise ECE: mean over classes c of the binned error of p_c against 1[y = c], over all
    samples (equal-width bins). probs: (N, C). Kull et al. 2019, "Beyond temperature scaling"
    (also "static calibration error", Nixon et al. 2019).
    """
    _check_probs_labels(probs, labels)
    errors = [
        _binned_error(*bin_statistics(probs[:, c], labels.eq(c), n_bins), norm)
        for c in range(probs.shape[1])
    ]
    return torch.stack(errors).mean()


def debiased_l2_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, binning: Binning = "equal_width"
) -> Tensor:
    """Debiased top-label L2 calibration error: sqrt(max(0, sum_b w_b [(acc_b - conf_b)^2 -
    acc_b (1 - acc_b) / (n_b - 1)])); bins with n_b < 2 get no correction. probs: (N, C).
    Kumar, Liang & Ma 2019, "Verified Uncertainty Calibration" (their library uses equal-mass bins:
    pass ``binning="equal_mass"``).
    """
    confidences, hits = _top_label(probs, labels)
    acc, conf, count = bin_statistics(confidences, hits, n_bins, binning)
    weight = count / count.sum()
    variance = torch.where(count > 1, acc * (1 - acc) / (count - 1).clamp_min(1), 0)
    squared = (weight * ((acc - conf).square() - variance)).sum()
    return squared.clamp_min(0).sqrt()


def brier_score(probs: Tensor, labels: Tensor) -> Tensor:
    """Multi-class Brier score: mean over samples of sum_c (p_c - 1[y = c])^2, in [0, 2].
    probs: (N, C). Brier 1950, "Verification of forecasts expressed in terms of probability".
    """
    _check_probs_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(dim=1).mean()


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean -log p_y, with p_y clamped to ``eps`` so a zero probability gives a large finite value.
    probs: (N, C). The proper scoring rule that temperature scaling minimises (Guo et al. 2017).
    """
    _check_probs_labels(probs, labels)
    return -probs.gather(1, labels[:, None]).clamp_min(eps).log().mean()

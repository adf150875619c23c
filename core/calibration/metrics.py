"""Calibration metrics on probabilities: binned calibration errors, Brier score, NLL.

Binning convention (equal width) follows torchmetrics 1.9.0 exactly so numbers are comparable:
bin ``b`` holds confidences in ``[b / B, (b + 1) / B)`` and a confidence of exactly 1.0 lands in an
extra ``(B + 1)``-th bin of its own (``torch.bucketize(..., right=True)`` on ``linspace(0, 1, B+1)``;
the torchmetrics edge reported as a bug). netcal 1.4.0 instead clips confidences to
``[eps, 1 - eps]``, so 1.0 joins the last bin ``[(B-1)/B, 1]``; both agree whenever no confidence is
exactly 1.0. Empty bins contribute nothing (also to the max of MCE, where they count as 0).

Conventions (pinned by tests): ``probs`` may be any floating dtype, ``labels`` any integer dtype;
every metric computes in float64 (bin counts and sums included: bf16 holds integers exactly only
to 256) whatever the input dtype, and returns a 0-dim tensor of dtype
``promote_types(probs.dtype, float32)``. Bad input raises TypeError (wrong type or dtype) or
ValueError (wrong shape or value) naming the argument.
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


def _as_probs_labels(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validate (N, C) probabilities and (N,) labels; return them as float64 and int64."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"probs must be a floating torch.Tensor, got {_type_name(probs)}")
    if not isinstance(labels, Tensor) or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer torch.Tensor, got {_type_name(labels)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C) probabilities, got shape {tuple(probs.shape)}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = probs.shape[0] = {probs.shape[0]}, "
            f"got shape {tuple(labels.shape)}"
        )
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs: need at least one sample and one class, got {tuple(probs.shape)}")
    probs = probs.double()
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be finite and in [0, 1] (pass softmax outputs, not logits)")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be integer class indices in [0, {probs.shape[1]})")
    return probs, labels


def _type_name(x: object) -> str:
    return f"{type(x).__name__} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def _out_dtype(probs: Tensor) -> torch.dtype:
    return torch.promote_types(probs.dtype, torch.float32)


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def bin_statistics(
    confidences: Tensor, hits: Tensor, n_bins: int = 15, binning: Binning = "equal_width"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean hit rate, mean confidence and sample count of a 1-D confidence vector.

    confidences, hits: (N,), any dtypes; float64 out. Equal width gives B + 1 bins (the last holds confidence == 1.0, see
    module doc); equal mass sorts confidences and splits them into B chunks of sizes differing by
    at most one (ties split by sort order). Returns (acc, conf, count), each (n_bins_used,);
    empty bins have acc = conf = 0.
    """
    _check_n_bins(n_bins)
    if not isinstance(confidences, Tensor) or not confidences.is_floating_point():
        raise TypeError(
            f"confidences must be a floating torch.Tensor, got {_type_name(confidences)}"
        )
    if confidences.ndim != 1 or not isinstance(hits, Tensor) or hits.shape != confidences.shape:
        raise ValueError(
            f"confidences and hits must be (N,) tensors of one shape, got "
            f"{tuple(confidences.shape)} and {tuple(getattr(hits, 'shape', ()))}"
        )
    confidences, hits = confidences.double(), hits.double()  # counts and sums in float64
    if binning == "equal_width":
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=confidences.device)
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
    count = torch.zeros(n_slots, dtype=torch.float64, device=confidences.device)
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
    """Validated top-label (confidences, hits), both (N,), confidences in float64."""
    probs, labels = _as_probs_labels(probs, labels)
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
    return _binned_error(*bin_statistics(confidences, hits, n_bins), norm).to(_out_dtype(probs))


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
    error = _binned_error(*bin_statistics(confidences, hits, n_bins, "equal_mass"), norm)
    return error.to(_out_dtype(probs))


def classwise_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, norm: Norm = "l1"
) -> Tensor:
    """Class-wise ECE: mean over classes c of the binned error of p_c against 1[y = c], over all
    samples (equal-width bins). probs: (N, C). Kull et al. 2019, "Beyond temperature scaling"
    (also "static calibration error", Nixon et al. 2019).
    """
    p, labels = _as_probs_labels(probs, labels)
    errors = [
        _binned_error(*bin_statistics(p[:, c], labels.eq(c), n_bins), norm)
        for c in range(p.shape[1])
    ]
    return torch.stack(errors).mean().to(_out_dtype(probs))


def debiased_l2_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, binning: Binning = "equal_width"
) -> Tensor:
    """Debiased top-label L2 calibration error: sqrt(max(0, sum_b w_b [(acc_b - conf_b)^2 -
    acc_b (1 - acc_b) / (n_b - 1)])) with w_b = n_b / N; bins with n_b < 2 contribute 0, as in
    the authors' ``uncertainty-calibration`` (``unbiased_square_ce``). probs: (N, C).
    Kumar, Liang & Ma 2019, "Verified Uncertainty Calibration" (their library uses equal-mass bins:
    pass ``binning="equal_mass"``).
    """
    confidences, hits = _top_label(probs, labels)
    acc, conf, count = bin_statistics(confidences, hits, n_bins, binning)
    weight = count / count.sum()
    debiased = (acc - conf).square() - acc * (1 - acc) / (count - 1).clamp_min(1)
    squared = (weight * torch.where(count >= 2, debiased, 0.0)).sum()
    return squared.clamp_min(0).sqrt().to(_out_dtype(probs))


def _brier_rows(probs: Tensor, labels: Tensor) -> Tensor:
    """sum_c (p_c - 1[y = c])^2 per sample: validated float64 (N, C), int64 (N,) -> (N,)."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(dim=1)


def _nll_rows(probs: Tensor, labels: Tensor, eps: float) -> Tensor:
    """-log max(p_y, eps) per sample: validated float64 (N, C), int64 (N,) -> (N,)."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    return -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(eps).log()


def brier_score(probs: Tensor, labels: Tensor) -> Tensor:
    """Multi-class Brier score: mean over samples of sum_c (p_c - 1[y = c])^2, in [0, 2].
    probs: (N, C). Brier 1950, "Verification of forecasts expressed in terms of probability".
    """
    p, y = _as_probs_labels(probs, labels)
    return _brier_rows(p, y).mean().to(_out_dtype(probs))


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean -log p_y, with p_y clamped to ``eps`` in (0, 1) so a zero probability gives a large
    finite value. probs: (N, C). The proper scoring rule that temperature scaling minimises
    (Guo et al. 2017).
    """
    p, y = _as_probs_labels(probs, labels)
    return _nll_rows(p, y, eps).mean().to(_out_dtype(probs))

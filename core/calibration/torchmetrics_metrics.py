"""torchmetrics ``Metric`` wrappers of the calibration metrics: accumulate across batches and
processes (states are concatenated on sync), then compute the plain function on everything seen.

Every class validates each batch in ``update`` (as the functions do), returns float32 from
``compute`` (the torchmetrics convention) and raises ValueError from ``compute`` before any
``update``: a metric of no samples is undefined, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from core.calibration import metrics as F

__all__ = [
    "AdaptiveCalibrationError",
    "BrierScore",
    "ClasswiseCalibrationError",
    "DebiasedL2CalibrationError",
    "ExpectedCalibrationError",
    "MaximumCalibrationError",
    "NegativeLogLikelihood",
    "RMSCalibrationError",
]


class _ProbsLabelsMetric(Metric):
    """Stores (N, C) probabilities and (N,) labels per update; ``compute`` applies ``fn``."""

    fn: ClassVar[Callable[..., Tensor]]
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **fn_kwargs: Any) -> None:
        super().__init__()
        self.fn_kwargs = fn_kwargs
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: probs (B, C) softmax outputs, labels (B,) class indices."""
        _, labels = F._as_probs_labels(probs, labels)
        self.probs.append(probs.detach())
        self.labels.append(labels.detach())

    def compute(self) -> Tensor:
        """The metric on every sample seen since the last reset (all processes after sync)."""
        if isinstance(self.probs, list) and not self.probs:
            raise _no_samples(self)
        probs, labels = dim_zero_cat(self.probs), dim_zero_cat(self.labels)
        return type(self).fn(probs, labels, **self.fn_kwargs).float()


class ExpectedCalibrationError(_ProbsLabelsMetric):
    """Top-label equal-width ECE (``n_bins``, ``norm``) over all batches; Guo et al. 2017."""

    fn = staticmethod(F.expected_calibration_error)

    def __init__(self, n_bins: int = 15, norm: F.Norm = "l1") -> None:
        super().__init__(n_bins=n_bins, norm=norm)


class MaximumCalibrationError(_ProbsLabelsMetric):
    """Top-label MCE over all batches; Naeini et al. 2015."""

    fn = staticmethod(F.maximum_calibration_error)

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__(n_bins=n_bins)


class RMSCalibrationError(_ProbsLabelsMetric):
    """Top-label RMS (plug-in L2) calibration error over all batches."""

    fn = staticmethod(F.rms_calibration_error)

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__(n_bins=n_bins)


class AdaptiveCalibrationError(_ProbsLabelsMetric):
    """Top-label equal-mass ECE over all batches; Nixon et al. 2019."""

    fn = staticmethod(F.adaptive_calibration_error)

    def __init__(self, n_bins: int = 15, norm: F.Norm = "l1") -> None:
        super().__init__(n_bins=n_bins, norm=norm)


class ClasswiseCalibrationError(_ProbsLabelsMetric):
    """Class-wise ECE over all batches; Kull et al. 2019."""

    fn = staticmethod(F.classwise_calibration_error)

    def __init__(self, n_bins: int = 15, norm: F.Norm = "l1") -> None:
        super().__init__(n_bins=n_bins, norm=norm)


class DebiasedL2CalibrationError(_ProbsLabelsMetric):
    """Debiased top-label L2 calibration error over all batches; Kumar et al. 2019."""

    fn = staticmethod(F.debiased_l2_calibration_error)

    def __init__(self, n_bins: int = 15, binning: F.Binning = "equal_width") -> None:
        super().__init__(n_bins=n_bins, binning=binning)


class _SumMetric(Metric):
    """Mean of a per-sample score: keeps a float64 running sum and count (no per-sample storage)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _rows(self, probs: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: probs (B, C) softmax outputs, labels (B,) class indices."""
        probs, labels = F._as_probs_labels(probs.detach(), labels)
        self.total += self._rows(probs, labels).sum()
        self.count += labels.shape[0]

    def compute(self) -> Tensor:
        """Mean over every sample seen since the last reset."""
        if self.count == 0:
            raise _no_samples(self)
        return (self.total / self.count).float()


def _no_samples(metric: Metric) -> ValueError:
    name = type(metric).__name__
    return ValueError(f"{name}.compute(): no samples seen; call update(probs, labels) first")


class BrierScore(_SumMetric):
    """Multi-class Brier score over all batches; Brier 1950."""

    def _rows(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F._brier_rows(probs, labels)


class NegativeLogLikelihood(_SumMetric):
    """Mean NLL over all batches (probabilities clamped at ``eps``, default 1e-12)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        F._nll_rows(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long), eps)
        self.eps = eps

    def _rows(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F._nll_rows(probs, labels, self.eps)

"""torchmetrics ``Metric`` wrappers of the calibration metrics: accumulate across batches and
processes (states are concatenated on sync), then compute the plain function on everything seen.
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
        F._check_probs_labels(probs, labels)
        self.probs.append(probs.detach())
        self.labels.append(labels.detach())

    def compute(self) -> Tensor:
        """The metric on every sample seen since the last reset (all processes after sync)."""
        return type(self).fn(dim_zero_cat(self.probs), dim_zero_cat(self.labels), **self.fn_kwargs)


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
    """Mean of a per-sample score: keeps a running sum and count (no per-sample storage)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _batch_mean(self, probs: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: probs (B, C) softmax outputs, labels (B,) class indices."""
        self.total += self._batch_mean(probs.detach(), labels).double() * labels.shape[0]
        self.count += labels.shape[0]

    def compute(self) -> Tensor:
        """Mean over every sample seen since the last reset."""
        return (self.total / self.count).float()


class BrierScore(_SumMetric):
    """Multi-class Brier score over all batches; Brier 1950."""

    def _batch_mean(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F.brier_score(probs, labels)


class NegativeLogLikelihood(_SumMetric):
    """Mean NLL over all batches (probabilities clamped at 1e-12)."""

    def _batch_mean(self, probs: Tensor, labels: Tensor) -> Tensor:
        return F.negative_log_likelihood(probs, labels)

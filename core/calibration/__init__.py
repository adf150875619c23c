"""Calibration: metrics (functions + torchmetrics classes), post-hoc calibrators (fit/transform,
registered in ``CALIBRATORS``) and the reliability diagram (``core.calibration.plots``)."""

from core.calibration.ca import CACalibrator, correctness_aware_loss, make_views
from core.calibration.calibrators import (
    CALIBRATORS,
    Calibrator,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
)
from core.calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    classwise_calibration_error,
    debiased_l2_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    rms_calibration_error,
)
from core.calibration.torchmetrics_metrics import (
    AdaptiveCalibrationError,
    BrierScore,
    ClasswiseCalibrationError,
    DebiasedL2CalibrationError,
    ExpectedCalibrationError,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    RMSCalibrationError,
)

__all__ = [
    "CALIBRATORS",
    "AdaptiveCalibrationError",
    "BrierScore",
    "CACalibrator",
    "Calibrator",
    "ClasswiseCalibrationError",
    "DebiasedL2CalibrationError",
    "ExpectedCalibrationError",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "MaximumCalibrationError",
    "NegativeLogLikelihood",
    "RMSCalibrationError",
    "TemperatureScaling",
    "VectorScaling",
    "adaptive_calibration_error",
    "brier_score",
    "classwise_calibration_error",
    "correctness_aware_loss",
    "debiased_l2_calibration_error",
    "expected_calibration_error",
    "make_views",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "rms_calibration_error",
]

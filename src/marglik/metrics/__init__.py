"""Evaluation metrics for predictive distributions.

All functions take tensors (array-likes are converted with :func:`torch.as_tensor`) and return
0-dim tensors (use ``.item()`` for a Python float) unless stated otherwise. Inputs are validated:
shape mismatches, NaNs, probabilities that do not sum to one and non-positive variances raise
:class:`ValueError` with a message that says what is wrong.

Classification metrics (:mod:`marglik.metrics.classification`) take predicted class probabilities
``probs`` of shape ``(N, C)`` and integer targets ``y`` of shape ``(N,)``. Regression metrics
(:mod:`marglik.metrics.regression`) take the predictive mean, the predictive variance (including
observation noise) and the targets, all of shape ``(N,)`` or ``(N, C)``; a ``(N,)`` tensor and a
``(N, 1)`` tensor are treated as the same shape. The input checks live in
:mod:`marglik.metrics._checks`.
"""

from marglik.metrics._checks import PROB_SUM_TOL
from marglik.metrics.classification import (
    CalibrationBins,
    accuracy,
    brier,
    calibration_bins,
    confidence,
    ece,
    entropy,
    nll,
    ood_auroc,
)
from marglik.metrics.regression import (
    DEFAULT_CALIBRATION_LEVELS,
    gaussian_nll,
    interval_coverage,
    regression_calibration_error,
    rmse,
)

__all__ = [
    "DEFAULT_CALIBRATION_LEVELS",
    "PROB_SUM_TOL",
    "CalibrationBins",
    "accuracy",
    "brier",
    "calibration_bins",
    "confidence",
    "ece",
    "entropy",
    "gaussian_nll",
    "interval_coverage",
    "nll",
    "ood_auroc",
    "regression_calibration_error",
    "rmse",
]

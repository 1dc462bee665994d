"""Regression metrics: RMSE, Gaussian NLL, interval coverage and calibration error.

Every function takes the predictive mean, (where needed) the predictive variance including
observation noise, and the targets, all of shape ``(N,)`` or ``(N, C)``; a ``(N,)`` tensor and a
``(N, 1)`` tensor are treated as the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from marglik.metrics._checks import _check_regression

__all__ = [
    "DEFAULT_CALIBRATION_LEVELS",
    "gaussian_nll",
    "interval_coverage",
    "regression_calibration_error",
    "rmse",
]

#: Default nominal levels of :func:`regression_calibration_error`: 0.05, 0.10, ..., 0.95.
DEFAULT_CALIBRATION_LEVELS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))


def rmse(mean: Tensor, y: Tensor) -> Tensor:
    """Root mean squared error over all entries.

    Args:
        mean: Predictive mean, shape ``(N,)`` or ``(N, C)``.
        y: Targets, same shape as ``mean``.

    Returns:
        0-dim tensor.
    """
    m, _, t = _check_regression(mean, None, y)
    return torch.sqrt(((m - t) ** 2).mean())


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood of the targets, averaged over all entries.

    ``(1/M) sum 0.5 log(2 pi var) + (y - mean)^2 / (2 var)`` (the full NLL, constant included).

    Args:
        mean: Predictive mean, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variance including observation noise, same shape, strictly positive.
        y: Targets, same shape.

    Returns:
        0-dim tensor.
    """
    m, v, t = _check_regression(mean, var, y)
    return (0.5 * torch.log(2 * math.pi * v) + (t - m) ** 2 / (2 * v)).mean()


def _check_levels(levels: Sequence[float]) -> Tensor:
    lv = torch.as_tensor(list(levels), dtype=torch.float64)
    if lv.ndim != 1 or lv.numel() == 0:
        raise ValueError("levels must be a non-empty sequence of numbers")
    if bool(torch.isnan(lv).any()) or bool(((lv <= 0) | (lv >= 1)).any()):
        raise ValueError(f"levels must lie strictly between 0 and 1, got {list(levels)}")
    return lv


def interval_coverage(
    mean: Tensor, var: Tensor, y: Tensor, levels: Sequence[float] = (0.5, 0.9, 0.95)
) -> Tensor:
    """Observed fraction of targets inside the central Gaussian predictive intervals.

    For nominal level ``q`` the interval is ``mean +- z_q sqrt(var)`` with
    ``z_q = Phi^{-1}((1 + q) / 2)``. A calibrated predictive gives coverage close to ``q``;
    lower coverage means over-confident, higher means under-confident.

    Args:
        mean: Predictive mean, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variance including observation noise, same shape, strictly positive.
        y: Targets, same shape.
        levels: Nominal coverage levels in ``(0, 1)``.

    Returns:
        Tensor of shape ``(len(levels),)`` with the observed coverage for each level (in order).
    """
    lv = _check_levels(levels)
    m, v, t = _check_regression(mean, var, y)
    z = torch.special.ndtri((1 + lv) / 2)  # (L,)
    dist = ((t - m).abs() / v.sqrt()).double().reshape(-1)  # standardised |residual|, (M,)
    inside = dist[None, :] <= z[:, None]  # (L, M)
    return inside.double().mean(dim=1).to(m.dtype)


def regression_calibration_error(
    mean: Tensor, var: Tensor, y: Tensor, levels: Sequence[float] | None = None
) -> Tensor:
    """Mean absolute gap between observed and nominal coverage of central intervals.

    ``(1/L) sum_q |coverage(q) - q|`` over ``levels`` (default 0.05, 0.10, ..., 0.95), with
    coverage from :func:`interval_coverage`. 0 is perfectly calibrated.

    Args:
        mean: Predictive mean, shape ``(N,)`` or ``(N, C)``.
        var: Predictive variance including observation noise, same shape, strictly positive.
        y: Targets, same shape.
        levels: Nominal levels in ``(0, 1)``; defaults to :data:`DEFAULT_CALIBRATION_LEVELS`.

    Returns:
        0-dim tensor in ``[0, 1)``.
    """
    lv = _check_levels(DEFAULT_CALIBRATION_LEVELS if levels is None else levels)
    cov = interval_coverage(mean, var, y, lv.tolist())
    return (cov.double() - lv).abs().mean().to(cov.dtype)

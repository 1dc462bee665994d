"""Evaluation metrics for predictive distributions.

All functions take tensors (array-likes are converted with :func:`torch.as_tensor`) and return
0-dim tensors (use ``.item()`` for a Python float) unless stated otherwise. Inputs are validated:
shape mismatches, NaNs, probabilities that do not sum to one and non-positive variances raise
:class:`ValueError` with a message that says what is wrong.

Classification metrics take predicted class probabilities ``probs`` of shape ``(N, C)`` and
integer targets ``y`` of shape ``(N,)``. Regression metrics take the predictive mean, the predictive
variance (including observation noise) and the targets, all of shape ``(N,)`` or ``(N, C)``; a
``(N,)`` tensor and a ``(N, 1)`` tensor are treated as the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
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

#: Tolerance on ``|sum_c p_c - 1|`` for every row of ``probs``.
PROB_SUM_TOL = 1e-3

#: Default nominal levels of :func:`regression_calibration_error`: 0.05, 0.10, ..., 0.95.
DEFAULT_CALIBRATION_LEVELS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(x, name: str) -> Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} could not be converted to a tensor: {e}") from e
    return t


def _check_no_nan(t: Tensor, name: str) -> None:
    if t.is_floating_point() or t.is_complex():
        n_nan = int(torch.isnan(t).sum())
        if n_nan:
            raise ValueError(f"{name} contains {n_nan} NaN value(s)")


def _check_probs(probs, name: str = "probs") -> Tensor:
    p = _as_tensor(probs, name)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got shape {tuple(p.shape)}")
    if p.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if p.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        p = p.to(torch.get_default_dtype())
    _check_no_nan(p, name)
    if bool((p < -PROB_SUM_TOL).any()) or bool((p > 1 + PROB_SUM_TOL).any()):
        raise ValueError(
            f"{name} must lie in [0, 1]; got values in [{float(p.min()):.4g}, {float(p.max()):.4g}]"
            " (pass probabilities, not logits)"
        )
    sums = p.sum(dim=1)
    dev = (sums - 1).abs()
    bad = dev > PROB_SUM_TOL
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} rows must sum to 1 (within {PROB_SUM_TOL:g}); {int(bad.sum())} row(s) do not, "
            f"e.g. row {i} sums to {float(sums[i]):.6g} (pass probabilities, not logits)"
        )
    return p


def _check_targets(y, n: int, n_classes: int, name: str = "y") -> Tensor:
    t = _as_tensor(y, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but probs has {n} rows")
    if t.is_floating_point():
        _check_no_nan(t, name)
        if not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes - 1}] for {n_classes} classes; "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _check_classification(probs, y) -> tuple[Tensor, Tensor]:
    p = _check_probs(probs)
    t = _check_targets(y, p.shape[0], p.shape[1])
    return p, t


def _check_scores(s, name: str) -> Tensor:
    t = _as_tensor(s, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not t.is_floating_point():
        t = t.double()
    _check_no_nan(t, name)
    return t


def _align(a: Tensor, shape: torch.Size, name: str, ref: str) -> Tensor:
    """Reshape ``(N,)`` <-> ``(N, 1)`` to ``shape``; otherwise shapes must match exactly."""
    if a.shape == shape:
        return a
    if a.numel() == math.prod(shape) and a.ndim in (1, 2) and len(shape) in (1, 2):
        squeezed_a = a.shape if a.ndim == 1 else (a.shape[0],) if a.shape[1] == 1 else None
        squeezed_s = shape if len(shape) == 1 else (shape[0],) if shape[1] == 1 else None
        if squeezed_a is not None and squeezed_a == squeezed_s:
            return a.reshape(shape)
    raise ValueError(f"{name} has shape {tuple(a.shape)} but {ref} has shape {tuple(shape)}")


def _check_regression(mean, var, y) -> tuple[Tensor, Tensor, Tensor]:
    m = _as_tensor(mean, "mean")
    if m.ndim not in (1, 2):
        raise ValueError(f"mean must have shape (N,) or (N, C), got shape {tuple(m.shape)}")
    if m.numel() == 0:
        raise ValueError("mean is empty")
    if not m.is_floating_point():
        m = m.to(torch.get_default_dtype())
    t = _align(_as_tensor(y, "y"), m.shape, "y", "mean").to(m.dtype)
    _check_no_nan(m, "mean")
    _check_no_nan(t, "y")
    v = None
    if var is not None:
        v = _align(_as_tensor(var, "var"), m.shape, "var", "mean").to(m.dtype)
        _check_no_nan(v, "var")
        n_bad = int((v <= 0).sum())
        if n_bad:
            raise ValueError(
                f"var must be strictly positive; {n_bad} value(s) are <= 0 "
                f"(min {float(v.min()):.4g}); pass variances, including the observation noise"
            )
    return m, v, t  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def nll(probs: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean negative log-likelihood (cross-entropy) of the targets under predicted probabilities.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``; rows sum to one.
        y: Integer class targets, shape ``(N,)``, values in ``[0, C)``.
        eps: Probabilities are clamped to at least ``eps`` before the log so that a zero
            probability gives a large finite value instead of ``inf``.

    Returns:
        0-dim tensor ``-(1/N) sum_n log p_n[y_n]``.
    """
    p, t = _check_classification(probs, y)
    p_true = p.gather(1, t[:, None]).squeeze(1)
    return -torch.log(p_true.clamp_min(eps)).mean()


def accuracy(probs: Tensor, y: Tensor) -> Tensor:
    """Fraction of samples whose arg-max class equals the target.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.
        y: Integer class targets, shape ``(N,)``.

    Returns:
        0-dim tensor in ``[0, 1]``.
    """
    p, t = _check_classification(probs, y)
    return (p.argmax(dim=1) == t).to(p.dtype).mean()


class CalibrationBins(NamedTuple):
    """Per-bin statistics of a reliability diagram (see :func:`calibration_bins`).

    Attributes:
        confidence: Mean max-probability of the samples in each bin, shape ``(n_bins,)``;
            0 for empty bins.
        accuracy: Fraction of correct predictions in each bin, shape ``(n_bins,)``; 0 for empty
            bins.
        count: Number of samples in each bin, shape ``(n_bins,)``, integer dtype.
        edges: Bin edges, shape ``(n_bins + 1,)``, from 0 to 1.
    """

    confidence: Tensor
    accuracy: Tensor
    count: Tensor
    edges: Tensor


def calibration_bins(probs: Tensor, y: Tensor, n_bins: int = 15) -> CalibrationBins:
    """Bin predictions by confidence into equal-width bins on ``[0, 1]``.

    Bin ``b`` holds the samples whose confidence (max probability) lies in
    ``(b / n_bins, (b + 1) / n_bins]``; a confidence of exactly 0 goes to the first bin.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.
        y: Integer class targets, shape ``(N,)``.
        n_bins: Number of bins (>= 1).

    Returns:
        :class:`CalibrationBins` with per-bin confidence, accuracy and count (each
        ``(n_bins,)``) and the bin edges ``(n_bins + 1,)``.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, t = _check_classification(probs, y)
    conf, pred = p.max(dim=1)
    correct = (pred == t).double()
    conf64 = conf.double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False: index b such that edges[b] < conf <= edges[b + 1].
    idx = torch.bucketize(conf64, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf64)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    denom = count.clamp_min(1).double()
    return CalibrationBins(
        confidence=(conf_sum / denom).to(p.dtype),
        accuracy=(acc_sum / denom).to(p.dtype),
        count=count,
        edges=edges.to(p.dtype),
    )


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` with the bins of :func:`calibration_bins`.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.
        y: Integer class targets, shape ``(N,)``.
        n_bins: Number of equal-width bins on ``[0, 1]``.

    Returns:
        0-dim tensor in ``[0, 1]``.
    """
    bins = calibration_bins(probs, y, n_bins)
    w = bins.count.to(bins.accuracy.dtype)
    return (w * (bins.accuracy - bins.confidence).abs()).sum() / w.sum()


def brier(probs: Tensor, y: Tensor) -> Tensor:
    """Multi-class Brier score ``(1/N) sum_n sum_c (p_nc - onehot(y_n)_c)^2``.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.
        y: Integer class targets, shape ``(N,)``.

    Returns:
        0-dim tensor in ``[0, 2]``.
    """
    p, t = _check_classification(probs, y)
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(dim=1).mean()


def confidence(probs: Tensor) -> Tensor:
    """Maximum predicted probability per sample (an in-distribution score for :func:`ood_auroc`).

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.

    Returns:
        Tensor of shape ``(N,)``.
    """
    return _check_probs(probs).max(dim=1).values


def entropy(probs: Tensor) -> Tensor:
    """Predictive entropy ``-sum_c p_c log p_c`` per sample (nats; ``0 log 0 = 0``).

    High entropy means uncertain; for :func:`ood_auroc` use ``-entropy(probs)`` as the
    in-distribution score.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.

    Returns:
        Tensor of shape ``(N,)``, values in ``[0, log C]``.
    """
    p = _check_probs(probs).clamp(0.0, 1.0)
    return -torch.xlogy(p, p).sum(dim=1)


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the ROC curve for separating in- from out-of-distribution samples.

    Higher scores must mean "more in-distribution" (e.g. :func:`confidence` or ``-entropy``).
    Computed from the Mann-Whitney U statistic with mid-ranks, which equals
    ``P(s_in > s_out) + 0.5 P(s_in == s_out)`` over all in/out pairs.

    Args:
        scores_in: Scores of in-distribution samples, shape ``(N_in,)``.
        scores_out: Scores of out-of-distribution samples, shape ``(N_out,)``.

    Returns:
        0-dim float64 tensor in ``[0, 1]``; 0.5 means no separation.
    """
    s_in = _check_scores(scores_in, "scores_in").double()
    s_out = _check_scores(scores_out, "scores_out").double()
    n_in, n_out = s_in.numel(), s_out.numel()
    s = torch.cat([s_in, s_out])
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    # 1-based mid-rank of each distinct value: last rank of the tie group minus (count - 1) / 2.
    last = torch.cumsum(counts, 0).double()
    mid_rank = last - (counts.double() - 1) / 2
    ranks = mid_rank[inverse]
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return u / (n_in * n_out)


# --------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------


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

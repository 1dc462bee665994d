"""Classification metrics: NLL, accuracy, calibration (ECE, bins), Brier, OOD scores.

Every function takes predicted class probabilities ``probs`` of shape ``(N, C)`` (rows sum to one)
and, where needed, integer targets ``y`` of shape ``(N,)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from marglik.metrics._checks import _check_classification, _check_probs, _check_scores

__all__ = [
    "CalibrationBins",
    "accuracy",
    "brier",
    "calibration_bins",
    "confidence",
    "ece",
    "entropy",
    "nll",
    "ood_auroc",
]


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

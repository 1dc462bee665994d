"""Cause–effect benchmark metrics: (weighted) accuracy and the area under the decision-rate curve.

AUDRC (Immer et al., ICML 2023, §5): rank the pairs by decreasing confidence; the accuracy over the
k most confident pairs, acc_k, is the accuracy at decision rate k/n; AUDRC is its mean over k. A
method whose confidence is informative scores above its plain accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(pred: Sequence, truth: Sequence, weights: Sequence[float] | None = None) -> float:
    """Fraction (or weight fraction) of pairs with ``pred[i] == truth[i]``.

    Args:
        pred, truth: equal-length sequences of directions (any comparable labels, e.g. "x->y").
        weights: non-negative pair weights (the Tübingen benchmark weights pairs from the same
            source dataset by 1/count); None means all 1.
    """
    correct = np.array([p == t for p, t in zip(pred, truth, strict=True)], dtype=np.float64)
    w = _weights(weights, len(correct))
    return float(np.sum(w * correct) / np.sum(w))


def audrc(
    confidences: Sequence[float], correct: Sequence[bool], weights: Sequence[float] | None = None
) -> float:
    """Area under the decision-rate curve: mean of running accuracies over confidence-ranked pairs.

    Pairs are sorted by decreasing confidence (a stable sort: ties keep their input order). With
    ranked correctness c_(k) and weights w_(k), the running accuracy is
    acc_k = Σ_{j≤k} w_(j) c_(j) / Σ_{j≤k} w_(j). Unweighted, AUDRC = 1/n Σ_k acc_k; weighted, each
    acc_k counts with its weight, AUDRC = Σ_k w_(k) acc_k / Σ_k w_(k) (the decision rate advances by
    w_(k)/Σw at pair k), which reduces to the mean for equal weights.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    if conf.shape != c.shape or conf.ndim != 1:
        raise ValueError(f"confidences {conf.shape} and correct {c.shape} must be equal-length 1-D")
    w = _weights(weights, len(c))
    order = np.argsort(-conf, kind="stable")
    c, w = c[order], w[order]
    seen = np.cumsum(w)
    running = np.divide(np.cumsum(w * c), seen, out=np.zeros_like(seen), where=seen > 0)
    return float(np.sum(w * running) / np.sum(w))


def _weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if n == 0:
        raise ValueError("no pairs to score")
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum")
    return w

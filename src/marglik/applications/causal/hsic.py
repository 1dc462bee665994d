"""Hilbert–Schmidt independence criterion with Gaussian kernels (Gretton et al., 2005; 2008).

The biased empirical estimate used by LOCI_H (Immer et al., ICML 2023, §4.2):

    HSIC(a, b) = 1/n² tr(K H L H),   H = I − 11ᵀ/n,

with K_ij = exp(−‖a_i − a_j‖² / (2 s_a²)) and bandwidth s_a the median heuristic (median of the
pairwise distances ‖a_i − a_j‖, i < j; 1 if that median is 0), likewise L for b. It is ≥ 0 and is 0
in the population iff a and b are independent.

``bandwidth="loci"`` uses the authors' variant instead (aleximmer/loci, ``causa/hsic.py``,
``gaussian_grammat``): s² = ½ · median of the non-zero squared distances (so s is the median of the
non-zero distances over √2, and tied points do not shrink it).

Cost is O(n²) time and memory, so above ``max_points`` (2000 by default) the estimate uses a random
subset of that many points drawn without replacement by ``numpy.random.default_rng(seed)``, which
keeps results reproducible for a fixed ``seed``.
"""

from __future__ import annotations

import numpy as np


def median_bandwidth(a: np.ndarray) -> float:
    """Median of the pairwise Euclidean distances of the rows of ``a`` (n,) or (n, d); 1.0 if 0."""
    return _median_from_squared(_squared_distances(a))


BANDWIDTHS = ("median", "loci")


def gaussian_gram(a: np.ndarray, bandwidth: float | str | None = None) -> np.ndarray:
    """Gram matrix exp(−‖a_i − a_j‖² / (2 s²)) of ``a`` (n,) or (n, d).

    ``bandwidth``: a number s, ``"median"`` / None (median heuristic) or ``"loci"`` (see above).
    """
    d2 = _squared_distances(a)
    if bandwidth is None or bandwidth == "median":
        s = _median_from_squared(d2)
    elif bandwidth == "loci":
        nonzero = d2[np.triu_indices(len(d2), k=1)]
        nonzero = nonzero[nonzero > 0]
        s = float(np.sqrt(0.5 * np.median(nonzero))) if len(nonzero) else 1.0
    elif isinstance(bandwidth, str):
        raise ValueError(f"unknown bandwidth {bandwidth!r}: use a number or one of {BANDWIDTHS}")
    else:
        s = bandwidth
    return np.exp(-d2 / (2 * s**2))


def hsic(
    a: np.ndarray,
    b: np.ndarray,
    max_points: int = 2000,
    seed: int = 0,
    bandwidth: str = "median",
) -> float:
    """Biased HSIC estimate 1/n² tr(KHLH) of samples ``a``, ``b`` ((n,) or (n, d), same n).

    Args:
        max_points: above this many points, use a seeded random subset of this size.
        seed: seed of the subset's generator.
        bandwidth: ``"median"`` (default) or ``"loci"`` (the authors' heuristic, see above).
    """
    a, b = _as_2d(a), _as_2d(b)
    if len(a) != len(b):
        raise ValueError(f"hsic needs paired samples, got {len(a)} and {len(b)} points")
    if len(a) > max_points:
        keep = np.random.default_rng(seed).choice(len(a), size=max_points, replace=False)
        a, b = a[keep], b[keep]
    K = _centre(gaussian_gram(a, bandwidth))
    L = gaussian_gram(b, bandwidth)
    return float(np.sum(K * L) / len(a) ** 2)  # tr(HKH L) with K, L symmetric


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def _squared_distances(a: np.ndarray) -> np.ndarray:
    a = _as_2d(a)
    sq = np.sum(a**2, 1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * a @ a.T, 0.0)


def _median_from_squared(d2: np.ndarray) -> float:
    if len(d2) < 2:
        return 1.0
    median = float(np.median(np.sqrt(d2[np.triu_indices(len(d2), k=1)])))
    return median if median > 0 else 1.0


def _centre(K: np.ndarray) -> np.ndarray:
    """H K H: subtract row and column means, add back the grand mean."""
    return K - K.mean(0, keepdims=True) - K.mean(1, keepdims=True) + K.mean()

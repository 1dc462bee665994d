"""HSIC: brute-force oracle on tiny data, independence vs dependence, seeded subsampling."""

import itertools

import numpy as np
import pytest

from marglik.applications.causal.hsic import gaussian_gram, hsic, median_bandwidth


def brute_force_hsic(a, b):
    """1/n² Σ K_ij L_ij + 1/n⁴ Σ K_ij Σ L_kl − 2/n³ Σ K_ij L_ik, loops and all (Gretton 2005)."""
    n = len(a)
    pairs = list(itertools.combinations(range(n), 2))
    s_a = np.median([abs(a[i] - a[j]) for i, j in pairs])
    s_b = np.median([abs(b[i] - b[j]) for i, j in pairs])
    K = [[np.exp(-((a[i] - a[j]) ** 2) / (2 * s_a**2)) for j in range(n)] for i in range(n)]
    L = [[np.exp(-((b[i] - b[j]) ** 2) / (2 * s_b**2)) for j in range(n)] for i in range(n)]
    first = sum(K[i][j] * L[i][j] for i in range(n) for j in range(n)) / n**2
    second = sum(map(sum, K)) * sum(map(sum, L)) / n**4
    third = sum(K[i][j] * L[i][k] for i in range(n) for j in range(n) for k in range(n)) / n**3
    return first + second - 2 * third


def test_matches_brute_force_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=9)
    b = a**2 + 0.3 * rng.normal(size=9)
    assert hsic(a, b) == pytest.approx(brute_force_hsic(a, b), rel=1e-10)
    assert hsic(a, b) == pytest.approx(hsic(b, a), rel=1e-10)


def test_independent_near_zero_dependent_clearly_positive():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 400))
    independent = hsic(a, b)
    dependent = hsic(a, a**2 + 0.1 * rng.normal(size=400))
    assert 0 <= independent < 2e-3
    assert dependent > 10 * independent and dependent > 0.02


def test_median_heuristic_and_gram():
    a = np.array([0.0, 1.0, 3.0])  # distances 1, 2, 3: median 2
    assert median_bandwidth(a) == 2.0
    K = gaussian_gram(a)
    assert K[0, 1] == pytest.approx(np.exp(-1 / 8))
    assert median_bandwidth(np.zeros(5)) == 1.0  # degenerate: falls back to 1


def test_subsampling_is_seeded():
    rng = np.random.default_rng(2)
    a = rng.normal(size=2500)
    b = np.sin(a) + rng.normal(size=2500)
    keep = np.random.default_rng(7).choice(2500, size=2000, replace=False)
    assert hsic(a, b, seed=7) == hsic(a[keep], b[keep])
    assert hsic(a, b, seed=7) != hsic(a, b, seed=8)
    assert hsic(a, b, max_points=3000) == hsic(a, b, max_points=5000)  # no subsampling


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="paired"):
        hsic(np.zeros(5), np.zeros(6))

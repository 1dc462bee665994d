"""Shared synthetic location-scale noise pairs for the LOCI tests."""

import numpy as np
import pytest


def lsnm_pair(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, 1), y = f(x) + g(x) N with nonlinear f and heteroscedastic g; x causes y."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    f = np.tanh(2 * x) + 0.5 * x**2
    g = 0.1 + 0.4 / (1 + np.exp(-3 * x))  # noise grows from 0.1 to 0.5 with x
    return x, f + g * rng.normal(size=n)


@pytest.fixture(scope="session")
def pair():
    return lsnm_pair()


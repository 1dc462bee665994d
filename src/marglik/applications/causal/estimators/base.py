"""What the LOCI estimators share: the Gaussian log-density in natural parameters, the base class.

LOCI (Immer et al., ICML 2023) fits p(effect | cause) = N(μ(x), σ²(x)) with natural parameters
η1(x) = μ/σ², η2(x) = −1/(2σ²), in which

    log p(y | x) = η1 y + η2 y² + η1²/(4η2) + ½ log(−2η2) − ½ log 2π

is jointly concave. All arrays are 1-D numpy float64 of length n.
"""

from __future__ import annotations

import math

import numpy as np

from marglik.data.standardize import standardize

__all__ = ["ConditionalGaussian", "gaussian_log_lik", "standardise"]

LOG_2PI = math.log(2 * math.pi)


def standardise(v: np.ndarray) -> np.ndarray:
    """(v − mean) / std of a 1-D array in float64, population std (callers check that std > 0).

    :func:`marglik.data.standardize` on ``v`` as a float64 numpy array: the numbers of
    ``(v - v.mean()) / v.std()`` exactly.
    """
    return standardize(np.asarray(v, dtype=np.float64))


def gaussian_log_lik(eta1: np.ndarray, eta2: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pointwise log N(y; μ, σ²) from natural parameters (all (n,)), as −η2(y − μ)² + ... ."""
    precision = -2 * eta2
    mu = eta1 / precision
    return -0.5 * precision * (y - mu) ** 2 + 0.5 * np.log(precision) - 0.5 * LOG_2PI


class ConditionalGaussian:
    """What every estimator offers once it has natural parameters η1(x), η2(x) (each (n,)).

    Subclasses implement ``fit(x, y)`` (returning ``self``) and ``natural_parameters(x)``; the
    mean/variance, the log-likelihood and the standardised residuals follow from these.
    """

    def fit(self, x: np.ndarray, y: np.ndarray) -> ConditionalGaussian:  # pragma: no cover
        raise NotImplementedError

    def natural_parameters(
        self, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def mean_variance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """μ(x) = −η1/(2η2) and σ²(x) = −1/(2η2), each (n,)."""
        eta1, eta2 = self.natural_parameters(x)
        return -eta1 / (2 * eta2), -1 / (2 * eta2)

    def log_lik(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Pointwise log p(y | x), (n,)."""
        eta1, eta2 = self.natural_parameters(x)
        return gaussian_log_lik(eta1, eta2, np.asarray(y, dtype=np.float64))

    def residuals(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Standardised residuals (y − μ(x)) / σ(x), (n,) — the noise estimate LOCI_H tests."""
        mu, var = self.mean_variance(x)
        return (np.asarray(y, dtype=np.float64) - mu) / np.sqrt(var)

"""Posteriors: the interface, the prior, and the weight-space Laplace approximation.

- :mod:`~marglik.posterior.base`: :class:`Posterior`, what every posterior offers (fit, evidence,
  functional moments, function samples, state); predictives and evidence optimisation use only it.
- :mod:`~marglik.posterior.prior`: :class:`Prior`, the Gaussian weight prior with a scalar,
  per-group or per-parameter precision.
- :mod:`~marglik.posterior.laplace`: :class:`Laplace`, N(θ*, (H/T + P0)⁻¹) over all weights, the
  last layer or a subnetwork, with :mod:`~marglik.posterior.glm` (its linearised predictive
  moments), :mod:`~marglik.posterior.samples` (outputs under sampled weights) and
  :mod:`~marglik.posterior.state` (saving and loading).
"""

from marglik.posterior.base import Posterior
from marglik.posterior.laplace import Laplace
from marglik.posterior.prior import Prior

__all__ = ["Laplace", "Posterior", "Prior"]

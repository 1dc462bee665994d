"""Posteriors: the interface, the prior, and the weight-space Laplace approximation.

- :mod:`~marglik.posterior.base`: :class:`Posterior`, what every posterior offers (fit, evidence,
  functional moments, function samples, state); predictives and evidence optimisation use only it.
- :mod:`~marglik.posterior.prior`: :class:`Prior`, the Gaussian weight prior with a scalar,
  per-group or per-parameter precision.
- :mod:`~marglik.posterior.laplace`: :class:`Laplace`, N(θ*, (H/T + P0)⁻¹) over all weights, the
  last layer or a subnetwork, with :mod:`~marglik.posterior.glm` (its linearised predictive
  moments), :mod:`~marglik.posterior.samples` (outputs under sampled weights) and
  :mod:`~marglik.posterior.state` (saving and loading).
- :mod:`~marglik.posterior.functional`: :class:`FunctionalLaplace`, the same GGN posterior as a
  GP over the outputs with the prior NTK (exact, subset of data or Nyström), with
  :mod:`~marglik.posterior.function_space` (its linear algebra),
  :mod:`~marglik.posterior.kernel_data` (its passes over the data) and
  :mod:`~marglik.posterior.functional_state` (saving and loading).
"""

from marglik.posterior.base import Posterior
from marglik.posterior.functional import FunctionalLaplace
from marglik.posterior.laplace import Laplace
from marglik.posterior.prior import Prior

__all__ = ["FunctionalLaplace", "Laplace", "Posterior", "Prior"]

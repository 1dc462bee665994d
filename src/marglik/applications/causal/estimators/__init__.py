"""Conditional Gaussian estimators p(y | x) = N(μ(x), σ²(x)) in natural parameters for LOCI.

Both estimators follow Immer et al. (ICML 2023), §4: the location-scale noise model Y = f(X) + g(X)N
is fitted as a Gaussian whose natural parameters η1(x) = μ/σ², η2(x) = −1/(2σ²) are functions of x,

    log p(y | x) = η1 y + η2 y² + η1²/(4η2) + ½ log(−2η2) − ½ log 2π,

which is jointly concave in (η1, η2). Inputs are 1-D arrays (n,); callers standardise them (see
:func:`standardise`). Each estimator is an object with state (the fitted weights) and the same small
surface: ``fit(x, y)``, ``natural_parameters(x)``, ``mean_variance(x)``, ``log_lik(x, y)``,
``residuals(x, y)``. One module per estimator:

- :mod:`~marglik.applications.causal.estimators.base` — :class:`ConditionalGaussian` (the shared
  surface), :func:`gaussian_log_lik`, :func:`standardise`.
- :mod:`~marglik.applications.causal.estimators.spline` — :class:`SplineEstimator`: the convex
  estimator, linear in B-spline features, solved by projected Newton; its ridge (prior precision)
  is chosen per fit by the Laplace evidence (:func:`homoscedastic_spline_evidence` for the
  homoscedastic variant).
- :mod:`~marglik.applications.causal.estimators.neural` — :class:`NeuralEstimator`: an MLP
  1→100 tanh→2 with the :class:`~marglik.likelihoods.NaturalGaussian` head, trained by full-batch
  Adam (:func:`fit_jointly`, :func:`train_mlps`, :func:`mlp_nll_grads`) or by the evidence.
- :mod:`~marglik.applications.causal.estimators.reference` — :class:`ReferenceNeuralEstimator`: the
  authors' network and training (docs/causal.md §1), batched over many pairs
  (:func:`fit_reference_batch`).
- :mod:`~marglik.applications.causal.estimators.selection` — :class:`EvidenceSplineEstimator`: the
  spline with knots and ridge chosen by the Laplace evidence.

:func:`make_estimator` builds any of them by name.
"""

from __future__ import annotations

from marglik.applications.causal.estimators.base import (
    ConditionalGaussian,
    gaussian_log_lik,
    standardise,
)
from marglik.applications.causal.estimators.neural import (
    NeuralEstimator,
    fit_jointly,
    mlp_nll_grads,
    train_mlps,
)
from marglik.applications.causal.estimators.reference import (
    ReferenceNeuralEstimator,
    fit_reference_batch,
)
from marglik.applications.causal.estimators.selection import KNOTS_GRID, EvidenceSplineEstimator
from marglik.applications.causal.estimators.spline import (
    RIDGE_GRID,
    SplineEstimator,
    homoscedastic_spline_evidence,
)

__all__ = [
    "KNOTS_GRID",
    "RIDGE_GRID",
    "EvidenceSplineEstimator",
    "ReferenceNeuralEstimator",
    "fit_reference_batch",
    "ConditionalGaussian",
    "NeuralEstimator",
    "SplineEstimator",
    "fit_jointly",
    "gaussian_log_lik",
    "homoscedastic_spline_evidence",
    "make_estimator",
    "mlp_nll_grads",
    "standardise",
    "train_mlps",
]


ESTIMATORS = ("spline", "nn", "spline-ev")


def make_estimator(
    name: str, homoscedastic: bool = False, seed: int = 0, reference: bool = False, **options
) -> ConditionalGaussian:
    """Estimator by name: ``"spline"`` (:class:`SplineEstimator`), ``"nn"`` (uses ``seed``) or
    ``"spline-ev"`` (:class:`EvidenceSplineEstimator`).

    ``reference=True`` gives the authors' settings (docs/causal.md §1): for ``"nn"`` a
    :class:`ReferenceNeuralEstimator` (its own seed, 711, unless ``options`` give one), for
    ``"spline"`` the floor 1e-7 (the ridge 1e-5/n is set by the caller, who knows n).
    ``options`` are further keyword arguments of the estimator class.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}: use one of {ESTIMATORS}")
    if reference and (homoscedastic or name == "spline-ev"):
        raise ValueError("reference=True is the heteroscedastic 'spline' or 'nn' estimator only")
    if name == "spline":
        if reference:
            options = {"floor": 1e-7, **options}
        return SplineEstimator(homoscedastic=homoscedastic, **options)
    if name == "spline-ev":
        if homoscedastic:
            raise ValueError("'spline-ev' is heteroscedastic only")
        return EvidenceSplineEstimator(**options)
    if reference:
        return ReferenceNeuralEstimator(**options)
    return NeuralEstimator(homoscedastic=homoscedastic, seed=seed, **options)

"""Laplace neural additive models (LA-NAM; Bouchiat, Immer, Yèche, Rätsch & Fortuin, AABI 2023).

f(x) = b + Σ_d f_d(x_d) (+ Σ_(i,j) f_ij(x_i, x_j) after the second stage), one small MLP per
feature evaluated as one batched block network, a prior precision per subnetwork learned online by
the Laplace evidence (implicit feature selection), shape functions with credible bands from the
linearised posterior restricted to each subnetwork, and pair selection by posterior mutual
information. One concept per module:

- :mod:`~marglik.applications.additive.blocks` — the batched block network (:class:`BlockMLP`);
- :mod:`~marglik.applications.additive.model` — the additive model (:class:`AdditiveNet`);
- :mod:`~marglik.applications.additive.fit` — training by the evidence (:func:`fit_additive`,
  :func:`fit_interactions`);
- :mod:`~marglik.applications.additive.shapes` — shape functions and bands
  (:func:`shape_functions`, :func:`group_moments`);
- :mod:`~marglik.applications.additive.interactions` — pair ranking
  (:func:`pair_mutual_information`);
- :mod:`~marglik.applications.additive.plots` — shape-function plots (:func:`plot_shape_functions`);
- :mod:`~marglik.applications.additive.estimators` — scikit-learn estimators
  (:class:`LaplaceAdditiveRegressor`, :class:`LaplaceAdditiveClassifier`; need scikit-learn,
  imported only when used).

See ``docs/additive.md``.
"""

from __future__ import annotations

from typing import Any

from marglik.applications.additive.blocks import BlockLinear, BlockMLP
from marglik.applications.additive.fit import AdditiveFit, fit_additive, fit_interactions
from marglik.applications.additive.interactions import pair_mutual_information, top_pairs
from marglik.applications.additive.model import AdditiveNet
from marglik.applications.additive.plots import plot_shape_functions
from marglik.applications.additive.shapes import ShapeFunctions, group_moments, shape_functions

__all__ = [
    "AdditiveFit",
    "AdditiveNet",
    "BlockLinear",
    "BlockMLP",
    "LaplaceAdditiveClassifier",
    "LaplaceAdditiveRegressor",
    "ShapeFunctions",
    "fit_additive",
    "fit_interactions",
    "group_moments",
    "pair_mutual_information",
    "plot_shape_functions",
    "shape_functions",
    "top_pairs",
]

_ESTIMATORS = ("LaplaceAdditiveClassifier", "LaplaceAdditiveRegressor")


def __getattr__(name: str) -> Any:
    """The estimators are imported on first use (they need scikit-learn)."""
    if name in _ESTIMATORS:
        from marglik.applications.additive import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

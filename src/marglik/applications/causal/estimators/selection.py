"""The spline estimator with its knots and ridge chosen by the Laplace evidence (docs/causal.md §2).

:class:`EvidenceSplineEstimator` fits :class:`~.spline.SplineEstimator` (which already picks its
ridge by the evidence) once per number of knots in ``knots_grid`` and keeps the fit of largest
Laplace log evidence per point,

    log Z ≈ Σ_i log p(y_i | w*) − ½ δ ‖w*‖² + ½ P log δ − ½ log det(Jᵀ Λ_η J + δ I)

(MacKay, 1992; the spline docstring has the details). x, y: 1-D float64 arrays (n,), standardised.
"""

from __future__ import annotations

import numpy as np

from marglik.applications.causal.estimators.base import ConditionalGaussian
from marglik.applications.causal.estimators.spline import SplineEstimator

__all__ = ["KNOTS_GRID", "EvidenceSplineEstimator"]

#: numbers of knots among which :class:`EvidenceSplineEstimator` chooses (docs/causal.md §2)
KNOTS_GRID = (5, 10, 25)


class EvidenceSplineEstimator(ConditionalGaussian):
    """Spline conditional Gaussian whose knots (and ridge) maximise the Laplace evidence.

    After ``fit``: ``chosen_`` (the fitted :class:`SplineEstimator`), ``n_knots_``, ``ridge_``,
    ``log_evidence_`` (per point) and ``knots_path_`` = (knots, best log evidence per point).

    Args:
        knots_grid: candidate numbers of knots; degree and the other options go to every
            :class:`SplineEstimator` (``ridge`` among them would fix the ridge).
    """

    def __init__(self, knots_grid: tuple[int, ...] = KNOTS_GRID, degree: int = 5, **options):
        if not knots_grid or min(knots_grid) < 2:
            raise ValueError(f"knots_grid needs numbers of knots ≥ 2, got {knots_grid}")
        if options.get("homoscedastic"):
            raise ValueError("EvidenceSplineEstimator is heteroscedastic only")
        self.knots_grid, self.degree, self.options = tuple(knots_grid), degree, options

    def fit(self, x: np.ndarray, y: np.ndarray) -> EvidenceSplineEstimator:
        """Fit every candidate to cause ``x`` (n,) and effect ``y`` (n,); keep the best evidence."""
        fits = [
            SplineEstimator(n_knots=k, degree=self.degree, **self.options).fit(x, y)
            for k in self.knots_grid
        ]
        evidence = np.array([f.log_evidence_ for f in fits])
        best = int(np.argmax(evidence))
        self.chosen_ = fits[best]
        self.n_knots_ = self.knots_grid[best]
        self.ridge_ = self.chosen_.ridge_
        self.log_evidence_ = float(evidence[best])
        self.knots_path_ = (np.array(self.knots_grid), evidence)
        return self

    def natural_parameters(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.chosen_.natural_parameters(x)

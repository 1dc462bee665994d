"""Cause–effect direction in location-scale noise models with LOCI (Immer et al., ICML 2023).

One concept per module:

- :mod:`~marglik.applications.causal.estimators` — conditional Gaussians p(effect | cause) in
  natural parameters (convex spline estimator, neural estimator; one module each).
- :mod:`~marglik.applications.causal.hsic` — the HSIC independence measure (Gaussian kernels,
  median heuristic).
- :mod:`~marglik.applications.causal.loci` — decision rules LOCI_M / LOCI_H / LOCI_E: :func:`loci`,
  :func:`loci_many` (many pairs as one batched fit), :func:`loci_batch` (worker processes);
  ``reference=True`` gives the authors' settings (docs/causal.md).
- :mod:`~marglik.applications.causal.marginal` — the evidence of the cause's marginal (LOCI_E).
- :mod:`~marglik.applications.causal.metrics` — accuracy and AUDRC.
- :mod:`~marglik.applications.causal.data` — loaders for the benchmark file layouts (no data ships
  here).

Pairs are 1-D arrays x, y of length n. Needs the ``causal`` extra (scikit-learn, scipy).
"""

from marglik.applications.causal.loci import CausalResult, loci, loci_batch, loci_many
from marglik.applications.causal.metrics import accuracy, audrc

__all__ = ["CausalResult", "loci", "loci_batch", "loci_many", "accuracy", "audrc"]

"""Cause–effect direction in location-scale noise models with LOCI (Immer et al., ICML 2023).

One concept per module:

- :mod:`~marglik.applications.causal.estimators` — conditional Gaussians p(effect | cause) in
  natural parameters (convex spline estimator, neural estimator; one module each).
- :mod:`~marglik.applications.causal.hsic` — the HSIC independence measure (Gaussian kernels,
  median heuristic).
- :mod:`~marglik.applications.causal.loci` — decision rules LOCI_M / LOCI_H: :func:`loci`,
  :func:`loci_batch`.
- :mod:`~marglik.applications.causal.metrics` — accuracy and AUDRC.
- :mod:`~marglik.applications.causal.data` — loaders for the benchmark file layouts (no data ships
  here).

Pairs are 1-D arrays x, y of length n. Needs the ``causal`` extra (scikit-learn, scipy).
"""

from marglik.applications.causal.loci import CausalResult, loci, loci_batch
from marglik.applications.causal.metrics import accuracy, audrc

__all__ = ["CausalResult", "loci", "loci_batch", "accuracy", "audrc"]

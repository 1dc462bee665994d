"""Cause–effect direction in location-scale noise models with LOCI (Immer et al., ICML 2023).

One concept per module:

- :mod:`~marglik.causal.estimators` — conditional Gaussians p(effect | cause) in natural parameters
  (convex spline estimator, neural estimator).
- :mod:`~marglik.causal.hsic` — the HSIC independence measure (Gaussian kernels, median heuristic).
- :mod:`~marglik.causal.loci` — decision rules LOCI_M / LOCI_H: :func:`loci`, :func:`loci_batch`.
- :mod:`~marglik.causal.metrics` — accuracy and AUDRC.
- :mod:`~marglik.causal.data` — loaders for the benchmark file layouts (no data ships here).

Needs the ``causal`` extra (scikit-learn, scipy).
"""

from marglik.causal.loci import CausalResult, loci, loci_batch
from marglik.causal.metrics import accuracy, audrc

__all__ = ["CausalResult", "loci", "loci_batch", "accuracy", "audrc"]

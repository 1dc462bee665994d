"""The curvature engine: how the loss bends for a model, a parameter subset and a likelihood.

- :mod:`~marglik.curvature.registry`: which module types get Kronecker factors and closed-form
  diagonals (:func:`register_layer` adds a type without touching the engine);
  :mod:`~marglik.curvature.builtin_layers` registers Linear, Conv1d/2d, GroupedLinear and
  MultiheadAttention;
- :mod:`~marglik.curvature.layers`: hooks that collect layer inputs and output gradients, and the
  one parameter → layer map;
- :mod:`~marglik.curvature.kfac`: the factor maths (KFAC-expand / reduce, exact diagonals);
- :mod:`~marglik.curvature.accumulators`: one accumulator per structure (full, diag, kron,
  lowrank);
- :mod:`~marglik.curvature.engine`: :func:`~marglik.curvature.engine.fit_curvature`, the pass
  over a data loader;
- :mod:`~marglik.curvature.columns`, :mod:`~marglik.curvature.per_sample`,
  :mod:`~marglik.curvature.lanczos`, :mod:`~marglik.curvature.subsets`,
  :mod:`~marglik.curvature.runtime`: output columns, per-sample Jacobians, Lanczos, parameter
  subsets, and model-mode handling;
- :mod:`~marglik.curvature.batches`: what a batch is ((x, y) pairs, dicts, tuples of inputs).
"""

from marglik.curvature import builtin_layers  # noqa: F401  (registers the built-in layer types)
from marglik.curvature.registry import (
    CompositeType,
    LayerType,
    LinearPart,
    register_layer,
    registered_layer,
    unregister_layer,
)

__all__ = [
    "CompositeType",
    "LayerType",
    "LinearPart",
    "register_layer",
    "registered_layer",
    "unregister_layer",
]

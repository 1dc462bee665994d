"""Layers that models are built from: learned augmentations and invariant (averaged) models.

- :mod:`~marglik.layers.augmentation`: :class:`AffineAugmentation` (S affine copies, learnable
  extents η), :class:`AugmentedModel` (the network averaged over the copies) and the
  :class:`Augmentation` protocol for other differentiable augmentations (LILA, NeurIPS 2022);
- :mod:`~marglik.layers.baselines`: no augmentation and a fixed augmentation in the same API;
- :mod:`~marglik.layers.equivariance`: soft-equivariant layers ½(FC + Conv) with the paths as
  children ``fc`` and ``conv`` (:class:`SoftEquivariantConv2d`, ``...Conv1d``, ``...Linear``),
  the factored FC path and :class:`GroupedLinear` (layer-wise equivariance, NeurIPS 2023);
- :mod:`~marglik.layers.balance`: one prior group per path and the learned balance per layer.

The package imports only torch: it sits below the curvature engine, which sees an
:class:`AugmentedModel` through its ``copies_per_input`` attribute (``marglik.curvature.copies``).
"""

from marglik.layers.augmentation import (
    GENERATOR_NAMES,
    AffineAugmentation,
    Augmentation,
    AugmentedModel,
    affine_matrices,
    fixed_nodes,
    lie_algebra,
    warp,
)
from marglik.layers.balance import PathBalance, equivariance_balance, equivariance_prior_groups
from marglik.layers.baselines import FULL_EXTENT, fixed_augmentation, no_augmentation
from marglik.layers.equivariance import (
    FC_KINDS,
    INITS,
    PADDING_MODES,
    DenseFC,
    FactoredFC,
    GroupedLinear,
    SoftEquivariant,
    SoftEquivariantConv1d,
    SoftEquivariantConv2d,
    SoftEquivariantLinear,
)

__all__ = [
    "FC_KINDS",
    "FULL_EXTENT",
    "GENERATOR_NAMES",
    "INITS",
    "PADDING_MODES",
    "AffineAugmentation",
    "Augmentation",
    "AugmentedModel",
    "DenseFC",
    "FactoredFC",
    "GroupedLinear",
    "PathBalance",
    "SoftEquivariant",
    "SoftEquivariantConv1d",
    "SoftEquivariantConv2d",
    "SoftEquivariantLinear",
    "affine_matrices",
    "equivariance_balance",
    "equivariance_prior_groups",
    "fixed_augmentation",
    "fixed_nodes",
    "lie_algebra",
    "no_augmentation",
    "warp",
]

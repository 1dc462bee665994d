"""Layers that models are built from: learned augmentations and invariant (averaged) models.

- :mod:`~marglik.layers.augmentation`: :class:`AffineAugmentation` (S affine copies, learnable
  extents η), :class:`AugmentedModel` (the network averaged over the copies) and the
  :class:`Augmentation` protocol for other differentiable augmentations (LILA, NeurIPS 2022);
- :mod:`~marglik.layers.baselines`: no augmentation and a fixed augmentation in the same API.

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
from marglik.layers.baselines import FULL_EXTENT, fixed_augmentation, no_augmentation

__all__ = [
    "FULL_EXTENT",
    "GENERATOR_NAMES",
    "AffineAugmentation",
    "Augmentation",
    "AugmentedModel",
    "affine_matrices",
    "fixed_augmentation",
    "fixed_nodes",
    "lie_algebra",
    "no_augmentation",
    "warp",
]

"""Baselines in the API of the learned invariance (LILA, NeurIPS 2022, §5 baselines).

- :func:`no_augmentation`: the plain network as an :class:`AugmentedModel` (S = 1, η = 0 and
  frozen), exactly the network's outputs;
- :func:`fixed_augmentation`: a fixed, hand-chosen extent (e.g. full rotation, η = π), frozen;
- Augerino (Benton et al., NeurIPS 2020): an :class:`AugmentedModel` with learnable η trained by
  the training loss minus a regulariser that rewards wide augmentations,
  :func:`marglik.training.augerino.augerino_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from marglik.layers.augmentation import GENERATOR_NAMES, AffineAugmentation, AugmentedModel

#: "full" extents for :func:`fixed_augmentation`: full rotation, translations by up to half the
#: image, scales and shear up to a factor e^{±log 2}
FULL_EXTENT = {"translate_x": 0.5, "translate_y": 0.5, "rotate": math.pi,
               "scale_x": math.log(2), "scale_y": math.log(2), "shear": math.log(2)}


def no_augmentation(net: nn.Module) -> AugmentedModel:
    """The network itself in the augmented API: S = 1, η = 0 frozen (outputs exactly net(x))."""
    augmentation = AffineAugmentation(GENERATOR_NAMES, 0.0)
    augmentation.eta.requires_grad_(False)
    return AugmentedModel(net, augmentation, 1)


def fixed_augmentation(net: nn.Module, generators: Sequence[str] = ("rotate",),
                       extent: float | Sequence[float] | None = None,
                       n_samples: int = 16) -> AugmentedModel:
    """A fixed augmentation (η frozen): ``extent`` per generator, default :data:`FULL_EXTENT`
    (full rotation for the default generators)."""
    augmentation = AffineAugmentation(generators, 0.0)
    if extent is None:
        extent = [FULL_EXTENT[g] for g in augmentation.generators]
    augmentation = AffineAugmentation(augmentation.generators, extent)
    augmentation.eta.requires_grad_(False)
    return AugmentedModel(net, augmentation, n_samples)

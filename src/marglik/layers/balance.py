"""Per-path prior groups of soft-equivariant layers, and how convolutional each layer became.

Layer-wise equivariance (van der Ouderaa, Immer & van der Wilk, NeurIPS 2023) gives the two paths
of every layer ½(fc(x) + conv(x)) (:class:`~marglik.layers.equivariance.SoftEquivariant`) their
own prior N(0, δ_fc⁻¹ I) and N(0, δ_conv⁻¹ I) and learns both by the Laplace evidence. Here:

- :func:`equivariance_prior_groups`: the ``prior_groups`` for :class:`marglik.Laplace` /
  ``marglik_training(prior_structure="layerwise", laplace_kwargs={"prior_groups": ...})``: one
  group per path per soft-equivariant layer, every other parameter tensor its own group;
- :func:`equivariance_balance`: after training, each layer's learned δ_fc, δ_conv and its
  *convolutional share* c = δ_fc / (δ_fc + δ_conv) = σ²_conv / (σ²_fc + σ²_conv), the conv path's
  share of the prior variance per weight: c → 1 when the evidence switches the FC path off,
  c → 0 when it switches the convolution off, ½ when both paths keep the same prior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from marglik.layers.equivariance import SoftEquivariant

__all__ = ["PathBalance", "equivariance_balance", "equivariance_prior_groups"]


def equivariance_prior_groups(model: nn.Module) -> list[list[str]]:
    """Prior groups: per soft-equivariant layer one group per path, other tensors alone.

    Args:
        model: a network containing :class:`SoftEquivariant` layers (nested at any depth).

    Returns:
        Parameter-name groups in ``model.named_parameters()`` order of their first tensor,
        covering exactly the parameters with ``requires_grad`` (what ``subset_of_weights="all"``
        puts in the posterior). A path without trainable parameters has no group.

    Raises:
        ValueError: if the model has no soft-equivariant layer.
    """
    path_of: dict[str, str] = {}  # parameter name -> "<layer>.<path>"
    layers = _layers(model)
    for name, layer in layers.items():
        for path, members in layer.path_parameters().items():
            for member in members:
                path_of[_join(name, member)] = _join(name, path)
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(path_of.get(name, name), []).append(name)
    return list(groups.values())


@dataclass(frozen=True)
class PathBalance:
    """The learned prior of one soft-equivariant layer.

    Attributes:
        delta_fc, delta_conv: prior precisions of the FC and the convolutional path.
        convolutional: δ_fc / (δ_fc + δ_conv) in (0, 1): 1 = FC path switched off.
    """

    delta_fc: float
    delta_conv: float
    convolutional: float


def equivariance_balance(
    model: nn.Module,
    prior_precision: Tensor,
    groups: Sequence[Sequence[str]] | None = None,
) -> dict[str, PathBalance]:
    """How convolutional each soft-equivariant layer became under the learned prior.

    Args:
        model: the trained network.
        prior_precision: δ, one value per group of ``groups`` (e.g. ``la.prior_precision``
            after ``marglik_training(prior_structure="layerwise")``), shape (G,).
        groups: the prior groups δ refers to (default: ``equivariance_prior_groups(model)``,
            what the posterior was given).

    Returns:
        Per layer name (``model.named_modules()`` order) its :class:`PathBalance`.

    Raises:
        ValueError: if δ does not have one value per group, or a path's parameters do not form
            exactly one group.
    """
    groups = equivariance_prior_groups(model) if groups is None else [list(g) for g in groups]
    delta = torch.as_tensor(prior_precision).detach()
    if delta.ndim != 1 or delta.numel() != len(groups):
        raise ValueError(
            f"prior_precision must have one value per prior group ({len(groups)}), "
            f"got shape {tuple(delta.shape)}"
        )
    index = {frozenset(g): i for i, g in enumerate(groups)}
    out = {}
    for name, layer in _layers(model).items():
        values = []
        for path, members in layer.path_parameters().items():
            key = frozenset(_join(name, m) for m in members)
            if key not in index:
                raise ValueError(
                    f"the parameters of {_join(name, path)!r} are not one prior group; build "
                    "the groups with equivariance_prior_groups(model)"
                )
            values.append(float(delta[index[key]]))
        d_fc, d_conv = values
        out[name] = PathBalance(d_fc, d_conv, d_fc / (d_fc + d_conv))
    return out


def _layers(model: nn.Module) -> dict[str, SoftEquivariant]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SoftEquivariant)}
    if not layers:
        raise ValueError("the model has no SoftEquivariant layer (marglik.layers.equivariance)")
    return layers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

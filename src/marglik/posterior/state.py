"""Saving and loading a weight-space :class:`~marglik.posterior.Laplace` as plain tensors.

The state holds only tensors, numbers, strings and lists, so it round-trips through
``torch.save`` / ``torch.load(weights_only=True)``. Format ``"marglik.Laplace/1"``; the optional
keys ``"prior_groups"`` (absent: one group per parameter tensor), ``"subset_of_weights"`` and
``"last_layer_name"`` (absent: only the parameter names, shapes and indices are checked) were
added later.

Loading refuses, naming what differs, any mismatch of the settings (likelihood, structure,
curvature, KFAC approximation), of the subset specification (``subset_of_weights``, the last
layer's name when both know it, a subnetwork's parameter names and selected entries), of the
parameter names and shapes (against the posterior and the model) and of the size of the saved
curvature and mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from marglik.curvature.subsets import (
    ParameterSubset,
    module_parameter_names,
    own_parameter_names,
)
from marglik.posterior.prior import Prior
from marglik.structures import block_from_state_dict

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace

FORMAT = "marglik.Laplace/1"


def _settings(la: Laplace) -> dict:
    return {
        "likelihood": type(la.likelihood).__name__,
        "hessian_structure": la.hessian_structure,
        "curvature": la.curvature,
        "kfac_approx": la.kfac_approx,
    }


def laplace_state(la: Laplace) -> dict:
    """The fitted posterior ``la`` as a dictionary of plain values."""
    return {
        "format": FORMAT,
        **_settings(la),
        "subset": la.subset.state(),
        "subset_of_weights": la.subset_of_weights,
        "last_layer_name": getattr(la, "last_layer_name", None),
        "mean": la.mean,
        "tangent": la.tangent,
        "prior_precision": la.prior.precision,
        "prior_mean": la.prior.mean,
        "prior_groups": la.prior.groups,
        "temperature": la.temperature,
        "sigma_noise": la.sigma_noise,
        "sigma_fit": la._sigma_fit,
        "n_data": la.n_data,
        "statistics": dict(la.statistics),
        "H": la.H.state_dict(),
    }


def load_laplace_state(la: Laplace, state: dict) -> None:
    """Restore ``state`` into ``la`` after checking it matches ``la``'s settings and model.

    Tensors move to the device of the model, whichever device they were saved on.
    """
    subset = saved_subset(la, state, FORMAT, _settings(la))
    H = block_from_state_dict(state["H"])
    sizes = {"the curvature": H.size, "the mean": state["mean"].numel()}
    if state.get("tangent") is not None:
        sizes["the tangent"] = state["tangent"].numel()
    for what, size in sizes.items():
        if size != subset.size:
            raise ValueError(
                f"state_dict is inconsistent: {what} covers {size} parameters, its subset "
                f"{subset.size}"
            )
    la.prior = Prior(state["prior_precision"], state["prior_mean"], state.get("prior_groups"))
    la._set_subset(subset)
    device = next(la.model.parameters()).device  # tensors follow the model, as in nn.Module
    la.mean = state["mean"].to(device)
    la.tangent = None if state.get("tangent") is None else state["tangent"].to(device)
    la.temperature = state["temperature"]
    if state["sigma_noise"] is not None:
        la.sigma_noise = state["sigma_noise"]
    la._sigma_fit = state["sigma_fit"]
    la.n_data = state["n_data"]
    la.statistics = {k: v.to(device) for k, v in state["statistics"].items()}
    la.H = H.to(device)
    if state.get("last_layer_name") is not None and la.subset_of_weights == "last_layer":
        la.last_layer_name = state["last_layer_name"]


def saved_subset(la: Any, state: dict, fmt: str, settings: dict) -> ParameterSubset:
    """The parameter subset of a posterior's ``state`` after checking it against ``la``: its
    ``format`` is ``fmt``, it was saved with the same ``settings`` and subset specification,
    and its parameters exist in ``la.model`` with their shapes (shared by every posterior's
    ``load_state_dict``)."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"not a {fmt.split('/')[0]} state_dict")
    for key, value in settings.items():
        if state[key] != value:
            raise ValueError(
                f"state_dict was saved with {key}={state[key]!r}, this posterior has {value!r}"
            )
    _check_subset_specification(la, state)
    names = state["subset"]["names"]
    params = dict(la.model.named_parameters())
    for name, shape in zip(names, state["subset"]["shapes"]):
        if name not in params or list(params[name].shape) != list(shape):
            raise ValueError(
                f"state_dict does not match the model: parameter {name!r} with shape "
                f"{tuple(shape)} is missing or has another shape"
            )
    subset = ParameterSubset(
        names, [torch.Size(s) for s in state["subset"]["shapes"]], state["subset"]["index"]
    )
    if la.subset is not None:
        _check_same_subset(la.subset, subset)
    elif state.get("last_layer_name") is not None:  # last layer not found yet: the saved one
        _check_last_layer(la, state["last_layer_name"], names)
    return subset


def _check_subset_specification(la: Laplace, state: dict) -> None:
    """The saved ``subset_of_weights`` and last-layer name against the posterior's own."""
    saved = state.get("subset_of_weights")
    if saved is not None and saved != la.subset_of_weights:
        raise ValueError(
            f"state_dict was saved with subset_of_weights={saved!r}, this posterior has "
            f"{la.subset_of_weights!r}"
        )
    mine = getattr(la, "last_layer_name", None)
    theirs = state.get("last_layer_name")
    if la.subset_of_weights == "last_layer" and None not in (mine, theirs) and mine != theirs:
        raise ValueError(
            f"state_dict was saved with last layer {theirs!r}, this posterior has {mine!r}"
        )


def _check_same_subset(mine: ParameterSubset, saved: ParameterSubset) -> None:
    """Names, shapes and selected entries of the saved subset against the posterior's."""
    if mine.names != saved.names:
        raise ValueError(f"state_dict covers parameters {saved.names}, this posterior {mine.names}")
    for name, a, b in zip(mine.names, mine.shapes, saved.shapes):
        if list(a) != list(b):
            raise ValueError(
                f"state_dict has parameter {name!r} with shape {tuple(b)}, this posterior "
                f"{tuple(a)}"
            )
    if (mine.index is None) != (saved.index is None) or (
        mine.index is not None
        and not torch.equal(mine.index.cpu().long(), saved.index.cpu().long())
    ):
        count = "whole tensors" if saved.index is None else f"{saved.index.numel()} entries"
        here = "whole tensors" if mine.index is None else f"{mine.index.numel()} entries"
        raise ValueError(
            f"state_dict selects other entries of the subnetwork ({count}) than this posterior "
            f"({here})"
        )


def _check_last_layer(la: Laplace, name: str, names: list[str]) -> None:
    """A last-layer posterior that has not found its last layer: the saved one must exist and
    hold exactly the saved parameters (its own, or its subtree's when it was named)."""
    try:
        own = own_parameter_names(la.model, name)
    except AttributeError:
        raise ValueError(
            f"state_dict was saved with last layer {name!r}, which this model does not have"
        ) from None
    if names not in (own, module_parameter_names(la.model, [name])):
        raise ValueError(
            f"state_dict covers parameters {names}, the last layer {name!r} of this model has "
            f"{own}"
        )

"""Saving and loading a weight-space :class:`~marglik.posterior.Laplace` as plain tensors.

The state holds only tensors, numbers, strings and lists, so it round-trips through
``torch.save`` / ``torch.load(weights_only=True)``. Format ``"marglik.Laplace/1"``; the optional
key ``"prior_groups"`` was added later (absent: one group per parameter tensor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from marglik.curvature.subsets import ParameterSubset
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
        "mean": la.mean,
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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a marglik.Laplace state_dict")
    for key, value in _settings(la).items():
        if state[key] != value:
            raise ValueError(
                f"state_dict was saved with {key}={state[key]!r}, this posterior has {value!r}"
            )
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
    if la.subset is not None and (la.subset.names != subset.names):
        raise ValueError(
            f"state_dict covers parameters {names}, this posterior {la.subset.names}"
        )
    la.prior = Prior(state["prior_precision"], state["prior_mean"], state.get("prior_groups"))
    la._set_subset(subset)
    device = next(la.model.parameters()).device  # tensors follow the model, as in nn.Module
    la.mean = state["mean"].to(device)
    la.temperature = state["temperature"]
    if state["sigma_noise"] is not None:
        la.sigma_noise = state["sigma_noise"]
    la._sigma_fit = state["sigma_fit"]
    la.n_data = state["n_data"]
    la.statistics = {k: v.to(device) for k, v in state["statistics"].items()}
    la.H = block_from_state_dict(state["H"]).to(device)

"""Saving and loading a :class:`~marglik.posterior.functional.FunctionalLaplace` as plain tensors.

Format ``"marglik.FunctionalLaplace/1"``: settings (likelihood, mode, subset size and method),
the parameter subset, θ*, the prior, T, σ, the data-fit statistics, and the kernel state — the
Jacobians at the kernel points, the factors of Λ, the per-group kernels and (Nyström) the
cross-kernels — so that a loaded posterior needs no data. Loading refuses, naming it, any
mismatch of the settings or of the parameters against the model, and moves the tensors to the
model's device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from marglik.posterior.prior import Prior
from marglik.posterior.state import saved_subset

if TYPE_CHECKING:
    from marglik.posterior.functional import FunctionalLaplace

__all__ = ["FORMAT", "functional_state", "load_functional_state"]

FORMAT = "marglik.FunctionalLaplace/1"
_KERNEL_STATE = ("jacobians", "factors", "gram", "cross", "indices")


def _settings(la: FunctionalLaplace) -> dict:
    return {
        "likelihood": type(la.likelihood).__name__,
        "mode": la.mode,
        "n_subset": la.n_subset,
        "subset_method": la.subset_method,
    }


def functional_state(la: FunctionalLaplace) -> dict:
    """The fitted posterior ``la`` as a dictionary of plain values."""
    return {
        "format": FORMAT,
        **_settings(la),
        "subset": la.subset.state(),
        "subset_of_weights": la.subset_of_weights,
        "last_layer_name": la.last_layer_name,
        "mean": la.mean,
        "prior_precision": la.prior.precision,
        "prior_mean": la.prior.mean,
        "prior_groups": la.prior.groups,
        "temperature": la.temperature,
        "sigma_noise": la.sigma_noise,
        "n_data": la.n_data,
        "statistics": {k: v.detach() for k, v in la.statistics.items()},
        "out_shape": list(la._out_shape),
        "jacobians": la._J.detach(),
        "factors": None if la._W is None else la._W.detach(),
        "gram": la._gram.detach(),
        "cross": None if la._cross is None else la._cross.detach(),
        "indices": la.indices,
    }


def load_functional_state(la: FunctionalLaplace, state: dict) -> None:
    """Restore ``state`` into ``la`` after checking that it matches ``la``'s settings and model."""
    subset = saved_subset(la, state, FORMAT, _settings(la))
    if state["jacobians"].shape[-1] != subset.size or state["mean"].numel() != subset.size:
        raise ValueError(f"state_dict is inconsistent: its Jacobians or mean do not cover the "
                         f"{subset.size} parameters of its subset")
    la.prior = Prior(state["prior_precision"], state["prior_mean"], state.get("prior_groups"))
    la._set_subset(subset)
    device = next(la.model.parameters()).device
    la.mean = state["mean"].to(device)
    la.temperature = state["temperature"]
    if state["sigma_noise"] is not None:
        la.sigma_noise = state["sigma_noise"]
    la.n_data = state["n_data"]
    la.statistics = {k: v.to(device) for k, v in state["statistics"].items()}
    la._out_shape = torch.Size(state["out_shape"])
    moved = {k: None if state[k] is None else state[k].to(device) for k in _KERNEL_STATE}
    la._J, la._W, la._gram = moved["jacobians"], moved["factors"], moved["gram"]
    la._cross, la.indices = moved["cross"], moved["indices"]
    if state.get("last_layer_name") is not None and la.subset_of_weights == "last_layer":
        la.last_layer_name = state["last_layer_name"]

"""Which parameters the posterior covers: all, last layer, a subnetwork, or the trainable ones.

A :class:`ParameterSubset` names parameter tensors in ``model.named_parameters()`` order and,
for subnetworks given as a mask or indices, the selected entries of their flattened concatenation.
The posterior's parameter vector θ is that concatenation (restricted to ``index``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from marglik.curvature.batches import call_model
from marglik.curvature.runtime import eval_mode


@dataclass
class ParameterSubset:
    """A selection of a model's parameters.

    Attributes:
        names: selected parameter tensors, in ``named_parameters()`` order.
        shapes: their shapes.
        index: optional flat indices (into the concatenation of ``names``) of the selected
            entries; ``None`` selects whole tensors.
    """

    names: list[str]
    shapes: list[torch.Size]
    index: Tensor | None = None

    @property
    def numel_per_tensor(self) -> list[int]:
        """Number of selected entries per tensor (used to expand layer-wise priors)."""
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        if self.index is None:
            return sizes
        edges = torch.tensor([0, *sizes]).cumsum(0)
        return torch.histogram(self.index.double(), bins=edges.double()).hist.long().tolist()

    @property
    def size(self) -> int:
        """Number of parameters P in the posterior."""
        return sum(self.numel_per_tensor)

    def parameters(self, model: nn.Module) -> dict[str, Tensor]:
        """The selected parameter tensors of ``model`` by name."""
        params = dict(model.named_parameters())
        return {n: params[n] for n in self.names}

    def vector(self, model: nn.Module) -> Tensor:
        """θ, the selected parameters flattened: (P,). Detached copy."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.parameters(model).values()])
        return flat if self.index is None else flat[self.index]

    def assign(self, model: nn.Module, theta: Tensor) -> None:
        """Write θ (P,) back into the model's parameters (in place, no autograd)."""
        with torch.no_grad():
            params = self.parameters(model)
            if self.index is not None:
                flat = torch.cat([p.reshape(-1) for p in params.values()])
                flat[self.index] = theta.to(flat)
                theta = flat
            offset = 0
            for p in params.values():
                p.copy_(theta[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()

    def state(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "index": self.index,
        }


def select_subset(
    model: nn.Module,
    subset_of_weights: str,
    subnetwork: list[str] | Tensor | None = None,
    last_layer_name: str | None = None,
    example_input: Tensor | None = None,
) -> ParameterSubset:
    """Resolve a subset specification into a :class:`ParameterSubset`.

    Args:
        model: the network.
        subset_of_weights: ``"all"`` (the parameters with ``requires_grad=True``, as in
            laplace-torch ≥ 0.2; every parameter when none requires grad), ``"last_layer"``
            (the own parameters of the last module other than the model itself that runs in the
            forward pass and owns parameters, see :func:`find_last_layer`; or the parameters of
            the module ``last_layer_name``), ``"subnetwork"`` (``subnetwork`` = module or
            parameter names, a boolean mask over all parameters flattened, or flat indices) or
            ``"requires_grad"`` (parameters with ``requires_grad=True``, e.g. LoRA adapters).
        example_input: a batch used to find the last layer by running the model once.
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters")
    shapes = {n: p.shape for n, p in named}

    def by_names(names: list[str], index: Tensor | None = None) -> ParameterSubset:
        if not names:
            raise ValueError(f"subset_of_weights={subset_of_weights!r} selects no parameters")
        return ParameterSubset(names, [shapes[n] for n in names], index)

    if subset_of_weights == "all":  # frozen weights are not weights of the posterior
        trainable = [n for n, p in named if p.requires_grad]
        return by_names(trainable or [n for n, _ in named])
    if subset_of_weights == "requires_grad":
        return by_names([n for n, p in named if p.requires_grad])
    if subset_of_weights == "last_layer":
        if last_layer_name is not None:
            return by_names(module_parameter_names(model, [last_layer_name]))
        return by_names(own_parameter_names(model, find_last_layer(model, example_input)))
    if subset_of_weights == "subnetwork":
        if subnetwork is None:
            raise ValueError(
                "subset_of_weights='subnetwork' needs subnetwork= module names, a mask or indices"
            )
        if isinstance(subnetwork, (list, tuple)) and all(isinstance(s, str) for s in subnetwork):
            return by_names(module_parameter_names(model, list(subnetwork)))
        total = sum(p.numel() for _, p in named)
        index = torch.as_tensor(subnetwork)
        if index.dtype == torch.bool:
            if index.shape != (total,):
                raise ValueError(
                    f"subnetwork mask must have shape ({total},), got {tuple(index.shape)}"
                )
            index = index.nonzero().squeeze(1)
        index = index.long().reshape(-1).unique()
        if index.numel() == 0 or index.min() < 0 or index.max() >= total:
            raise ValueError(f"subnetwork indices must be non-empty and lie in [0, {total - 1}]")
        return by_names([n for n, _ in named], index)
    raise ValueError(
        f"unknown subset_of_weights {subset_of_weights!r}: use 'all', 'last_layer', "
        "'subnetwork' or 'requires_grad'"
    )


def module_parameter_names(model: nn.Module, module_names: list[str]) -> list[str]:
    """Parameter names (in model order) that belong to the named modules or are named directly."""
    modules = dict(model.named_modules())
    params = [n for n, _ in model.named_parameters()]
    exact = {m for m in module_names if m not in modules and m in params}
    missing = [m for m in module_names if m not in modules and m not in exact]
    if missing:
        raise ValueError(f"no module named {missing} in the model (nor a parameter)")
    prefixes = [m + "." if m else "" for m in module_names if m in modules]
    return [n for n in params if n in exact or any(n.startswith(p) for p in prefixes)]


def own_parameter_names(model: nn.Module, module_name: str) -> list[str]:
    """Full names of the parameters the named module owns itself (not its submodules')."""
    module = model.get_submodule(module_name)
    prefix = module_name + "." if module_name else ""
    return [prefix + n for n, _ in module.named_parameters(recurse=False)]


def find_last_layer(model: nn.Module, example_input: Tensor | None) -> str:
    """Name of the last module that runs in a forward pass and owns parameters itself.

    The model itself is never taken, nor a module whose own parameters are every parameter of
    the model: either would make the "last layer" the whole network. Parameters owned by the
    top-level module (a learned temperature, say) are left out with a warning naming them. The
    forward pass runs in eval mode with the model's state restored afterwards.
    """
    if example_input is None:
        raise ValueError("finding the last layer needs data: call fit() or give last_layer_name=")
    all_names = {n for n, _ in model.named_parameters()}
    root_owned = [n for n, _ in model.named_parameters(recurse=False)]
    candidates = {
        name: module
        for name, module in model.named_modules()
        if module is not model
        and (own := own_parameter_names(model, name))
        and set(own) != all_names
    }
    if not candidates:
        owner = "the model itself" if root_owned else "a single module"
        raise ValueError(
            f"cannot find a last layer: the parameters belong to {owner}, so the last layer "
            "would be the whole model; use subset_of_weights='all', or give last_layer_name= "
            "or a subnetwork"
        )
    called: list[str] = []
    with eval_mode(model), torch.no_grad():
        handles = [
            module.register_forward_hook(lambda m, i, o, name=name: called.append(name))
            for name, module in candidates.items()
        ]
        try:
            call_model(model, example_input)
        finally:
            for h in handles:
                h.remove()
    if not called:
        raise ValueError("no module with parameters ran in the forward pass")
    if root_owned:
        warnings.warn(
            f"parameters {root_owned} belong to the model itself, not to a layer: they are "
            f"left out of the last layer {called[-1]!r} (give last_layer_name= or "
            "subset_of_weights='subnetwork' to include them)",
            stacklevel=3,  # find_last_layer < Laplace.fit < the caller
        )
    return called[-1]

"""Which parameters the posterior covers: all, last layer, a subnetwork, or the trainable ones.

A :class:`ParameterSubset` names parameter tensors in ``model.named_parameters()`` order and,
for subnetworks given as a mask or indices, the selected entries of their flattened concatenation.
The posterior's parameter vector θ is that concatenation (restricted to ``index``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
        subset_of_weights: ``"all"`` (every parameter), ``"last_layer"`` (the parameters of the
            last module that runs in the forward pass, or of ``last_layer_name``),
            ``"subnetwork"`` (``subnetwork`` = module or parameter names, a boolean mask over
            all parameters flattened, or flat indices) or ``"requires_grad"`` (parameters with
            ``requires_grad=True``, e.g. LoRA adapters).
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

    if subset_of_weights == "all":
        return by_names([n for n, _ in named])
    if subset_of_weights == "requires_grad":
        return by_names([n for n, p in named if p.requires_grad])
    if subset_of_weights == "last_layer":
        name = (
            last_layer_name
            if last_layer_name is not None
            else find_last_layer(model, example_input)
        )
        return by_names(module_parameter_names(model, [name]))
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


def find_last_layer(model: nn.Module, example_input: Tensor | None) -> str:
    """Name of the last module with its own parameters that runs in a forward pass."""
    if example_input is None:
        raise ValueError("finding the last layer needs data: call fit() or give last_layer_name=")
    called: list[str] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: called.append(name))
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    if not called:
        raise ValueError("no module with parameters ran in the forward pass")
    return called[-1]

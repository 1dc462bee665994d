"""Layer registry: which module types have Kronecker-factored / closed-form layer curvature.

A registered layer computes, for every input n, at R shared positions r (tokens, conv patches,
graph nodes; R = 1 without weight sharing),

    out_{n,r} = W a_{n,r} (+ b),    W (D_out, D_in),  a_{n,r} (D_in),  b (D_out),

with the weight parameter stored as W after flattening its trailing dims row-major (shape
(D_out, *rest) with prod(rest) = D_in). Given the layer's forward arguments and the gradients
b_{k,n,r} = ∂(U_k · f_n)/∂out_{n,r} of each backpropagated output column k, everything the
curvature engine and the layer-wise predictive need is generic in (a, b)
(:mod:`marglik.curvature.kfac`):

- per-sample gradients  ∂/∂W = Σ_r b_{k,n,r} a_{n,r}ᵀ,  ∂/∂b = Σ_r b_{k,n,r};
- KFAC factors  G ⊗ A  with A from a and G from b, KFAC-expand or KFAC-reduce for weight
  sharing (Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural
  Network Architectures", NeurIPS 2023);
- the exact GGN diagonal and the layer-wise GLM predictive J Σ Jᵀ.

So a module type only has to say how to form a (N, R, D_in) from its forward arguments and how
to lay out gradients w.r.t. its output as (K, N, R, D_out). ``nn.Linear`` (any leading dims:
the middle ones are positions) and ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero
padding (unfolded patches) are registered here; other types register with
:func:`register_layer` without touching the engine::

    register_layer(MyBilinear, LayerType(
        inputs=lambda m, args: torch.einsum("ni,nj->nij", *args).flatten(1)[:, None],
        output_grads=lambda m, g: g[:, :, None],
    ))

Lookups go through the module's MRO: the entry of the most specific registered class decides,
and if its ``applies`` is False the module is unsupported (its parameters then take the generic
``torch.func`` path: exact full/diagonal curvature, diagonal blocks under KFAC). Lookups happen
once per fit or predictive plan, never per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


def always(module: nn.Module) -> bool:
    """Default :attr:`LayerType.applies`: every instance of the type is supported."""
    return True


@dataclass(frozen=True)
class LayerType:
    """How one module type maps to ``out = a Wᵀ (+ b)`` at R shared positions.

    Attributes:
        inputs: ``(module, args) -> a`` with ``args`` the tuple of positional forward arguments
            (detached or not, as the caller needs) and ``a`` of shape (N, R, D_in), N the batch
            size. May be several arguments, e.g. a = x1 ⊗ x2 for a bilinear layer; keyword
            arguments are not seen (forward hooks get the positional ones).
        output_grads: ``(module, g) -> b`` with ``g`` gradients w.r.t. the layer output, one
            per column, (K, N, *out.shape[1:]), and ``b`` of shape (K, N, R, D_out), positions in
            the same order as in ``inputs``.
        applies: whether a given instance fits the form (e.g. conv ``groups == 1``).
        weight: attribute name of W, a parameter of shape (D_out, ...) with D_in trailing entries.
        bias: attribute name of the bias (D_out,), or None if the type has none.
    """

    inputs: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    output_grads: Callable[[nn.Module, Tensor], Tensor]
    applies: Callable[[nn.Module], bool] = always
    weight: str = "weight"
    bias: str | None = "bias"


_REGISTRY: dict[type[nn.Module], LayerType] = {}


def register_layer(module_type: type[nn.Module], layer_type: LayerType) -> LayerType | None:
    """Register (or override) how ``module_type`` and its subclasses are factored.

    Overriding replaces the entry for exactly this class (e.g. ``nn.Linear``); a subclass can
    get its own entry, which takes precedence for it. Takes effect for fits and predictives
    started afterwards.

    Returns:
        The entry this one replaced (None if there was none), to restore it later.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(layer_type, LayerType):
        raise TypeError(f"layer_type must be a LayerType, got {type(layer_type).__name__}")
    previous = _REGISTRY.get(module_type)
    _REGISTRY[module_type] = layer_type
    return previous


def unregister_layer(module_type: type[nn.Module]) -> LayerType | None:
    """Remove the entry for exactly ``module_type``; returns it (None if there was none)."""
    return _REGISTRY.pop(module_type, None)


@contextmanager
def registered_layer(module_type: type[nn.Module], layer_type: LayerType) -> Iterator[None]:
    """Register ``layer_type`` for the duration of a ``with`` block, then restore the registry."""
    previous = register_layer(module_type, layer_type)
    try:
        yield
    finally:
        if previous is None:
            unregister_layer(module_type)
        else:
            register_layer(module_type, previous)


def layer_type(module: nn.Module) -> LayerType | None:
    """The entry of the most specific registered class in ``type(module).__mro__``, if it
    applies to this instance; None for an unsupported module."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None:
            return entry if entry.applies(module) else None
    return None


# ------------------------------------------------------------------------------ built-in types
def _linear_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """x (N, *positions, D_in) -> (N, R, D_in)."""
    x = args[0]
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """(K, N, *positions, D_out) -> (K, N, R, D_out)."""
    K, N = g.shape[:2]
    return g.reshape(K, N, -1, g.shape[-1])


def _conv_applies(module: nn.Module) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros"


def _unfold(x: Tensor, kernel, stride, dilation, padding) -> Tensor:
    """2-d patches of x (N, C_in, H, W): (N, R, C_in·prod(kernel)), R the output positions."""
    if isinstance(padding, str):  # "valid" or "same" (stride 1), padded as torch does
        pads = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = 0 if padding == "valid" else d * (k - 1)
            pads += [total // 2, total - total // 2]
        x, padding = F.pad(x, pads), 0
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


def _conv1d_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """x (N, C_in, L) -> patches (N, L_out, C_in·k), as a (k, 1) 2-d convolution."""
    padding = module.padding if isinstance(module.padding, str) else (*module.padding, 0)
    return _unfold(
        args[0].unsqueeze(-1),
        (*module.kernel_size, 1),
        (*module.stride, 1),
        (*module.dilation, 1),
        padding,
    )


def _conv2d_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """x (N, C_in, H, W) -> patches (N, H_out·W_out, C_in·k_h·k_w)."""
    return _unfold(args[0], module.kernel_size, module.stride, module.dilation, module.padding)


def _conv_output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """(K, N, C_out, *spatial) -> (K, N, R, C_out)."""
    K, N = g.shape[:2]
    return g.reshape(K, N, g.shape[2], -1).transpose(2, 3)


LINEAR = LayerType(_linear_inputs, _linear_output_grads)
CONV1D = LayerType(_conv1d_inputs, _conv_output_grads, _conv_applies)
CONV2D = LayerType(_conv2d_inputs, _conv_output_grads, _conv_applies)

register_layer(nn.Linear, LINEAR)
register_layer(nn.Conv1d, CONV1D)
register_layer(nn.Conv2d, CONV2D)

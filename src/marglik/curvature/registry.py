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
the middle ones are positions), ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and any
``padding_mode`` (unfolded patches of the input padded as the module pads it) and
:class:`marglik.layers.GroupedLinear` (G maps as one map at G positions with block-sparse
inputs) are registered by :mod:`marglik.curvature.builtin_layers`, and
``nn.MultiheadAttention`` as a :class:`CompositeType` (below); other types register with
:func:`register_layer` without touching the engine::

    register_layer(MyBilinear, LayerType(
        inputs=lambda m, args: torch.einsum("ni,nj->nij", *args).flatten(1)[:, None],
        output_grads=lambda m, g: g[:, :, None],
    ))

A module whose parameters act as several linear maps *inside* its forward, through functional
calls no hook can see (``nn.MultiheadAttention``: the packed ``in_proj_weight`` and
``out_proj.weight`` are passed to a functional attention), registers a :class:`CompositeType`:
a list of :class:`LinearPart` (weight and bias of each linear map) and an explicit forward that
computes the same outputs with every linear map made through a callback
``linear(part, x, weight, bias, rows)``. While a fit or a layer-wise predictive records, the
module's forward is replaced by that explicit forward (and restored exactly afterwards), so each
part is recorded like a Linear layer: a (N, R, D_in) and output gradients (K, N, R, D_out).
``nn.MultiheadAttention`` is registered this way (see
:func:`marglik.curvature.builtin_layers.mha_forward` for the KFAC definition of its projections).

Lookups go through the module's MRO: the entry of the most specific registered class decides,
and if its ``applies`` is False the module is unsupported (its parameters then take the generic
``torch.func`` path: exact full/diagonal curvature, diagonal blocks under KFAC). Lookups happen
once per fit or predictive plan, never per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

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
        input_sums: optional ``(module, args, approx) -> statistics`` of one call, where an
            identity cheaper than forming ``inputs`` exists: Σ_{n,r} a aᵀ (D_in, D_in) for
            ``"expand"``, Σ_r a (N, D_in) for ``"reduce"`` (convolutions:
            :mod:`marglik.curvature.conv`). None: computed from ``inputs``.
        feature_dim: the dimension of the layer's output that holds its D_out features (-1:
            the last; 1 for channels-first convolutions). KFAC warns when such an output is the
            model's output as it is, since the likelihood takes the *last* dimension as outputs.
    """

    inputs: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    output_grads: Callable[[nn.Module, Tensor], Tensor]
    applies: Callable[[nn.Module], bool] = always
    weight: str = "weight"
    bias: str | None = "bias"
    input_sums: Callable[[nn.Module, tuple[Tensor, ...], str], Tensor] | None = None
    feature_dim: int = -1


class LinearCall(Protocol):
    """The callback a :class:`CompositeType` forward makes every linear map through."""

    def __call__(self, part: str, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                 rows: tuple[int, int] | None = None) -> Tensor:
        """``F.linear(x, weight, bias)`` for x (N, *positions, D_in), batch first.

        ``rows``: the map uses only rows ``[lo, hi)`` of the part's weight (``weight`` is that
        slice); its output gradients are zero-padded to the part's full D_out.
        """


@dataclass(frozen=True)
class LinearPart:
    """One linear map of a :class:`CompositeType`, out = x Wᵀ (+ b) at R positions.

    Attributes:
        name: name of the part (the recorded layer is called ``<module name>.<name>``).
        weight: path of W (D_out, D_in) relative to the module (``"in_proj_weight"``,
            ``"out_proj.weight"``).
        bias: path of its bias (D_out,), or None.
    """

    name: str
    weight: str
    bias: str | None = None


@dataclass(frozen=True)
class CompositeType:
    """A module type with several linear maps applied functionally inside its forward.

    Attributes:
        parts: ``module -> [LinearPart, ...]``: the linear maps of this instance. Parameters
            named by a part belong to it, also when they sit in a submodule (e.g. the unused
            ``out_proj`` Linear of ``nn.MultiheadAttention``): that submodule is then not a
            layer of its own.
        forward: ``(module, linear, *args, **kwargs) -> output``: the module's forward with
            every linear map of a part computed as ``linear(part_name, x, W, b, rows)``
            (:class:`LinearCall`); it must give the module's outputs exactly.
        applies: whether a given instance fits (else its parameters take the generic path).
    """

    parts: Callable[[nn.Module], list[LinearPart]]
    forward: Callable[..., Any]
    applies: Callable[[nn.Module], bool] = always


_REGISTRY: dict[type[nn.Module], LayerType | CompositeType] = {}


def register_layer(
    module_type: type[nn.Module], layer_type: LayerType | CompositeType
) -> LayerType | CompositeType | None:
    """Register (or override) how ``module_type`` and its subclasses are factored.

    Overriding replaces the entry for exactly this class (e.g. ``nn.Linear``); a subclass can
    get its own entry, which takes precedence for it. Takes effect for fits and predictives
    started afterwards.

    Returns:
        The entry this one replaced (None if there was none), to restore it later.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(layer_type, (LayerType, CompositeType)):
        raise TypeError(
            f"layer_type must be a LayerType or CompositeType, got {type(layer_type).__name__}"
        )
    previous = _REGISTRY.get(module_type)
    _REGISTRY[module_type] = layer_type
    return previous


def unregister_layer(module_type: type[nn.Module]) -> LayerType | CompositeType | None:
    """Remove the entry for exactly ``module_type``; returns it (None if there was none)."""
    return _REGISTRY.pop(module_type, None)


@contextmanager
def registered_layer(
    module_type: type[nn.Module], layer_type: LayerType | CompositeType
) -> Iterator[None]:
    """Register ``layer_type`` for the duration of a ``with`` block, then restore the registry."""
    previous = register_layer(module_type, layer_type)
    try:
        yield
    finally:
        if previous is None:
            unregister_layer(module_type)
        else:
            register_layer(module_type, previous)


def layer_type(module: nn.Module) -> LayerType | CompositeType | None:
    """The entry of the most specific registered class in ``type(module).__mro__``, if it
    applies to this instance; None for an unsupported module."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None:
            return entry if entry.applies(module) else None
    return None

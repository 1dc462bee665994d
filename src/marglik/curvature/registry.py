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
inputs) are registered here, and ``nn.MultiheadAttention`` as a
:class:`CompositeType` (below); other types register with :func:`register_layer` without
touching the engine::

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
``nn.MultiheadAttention`` is registered this way (see :func:`mha_forward` for the KFAC
definition of its projections).

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.curvature.conv import conv_patch_sums, explicit_padding, patch_gram, unfold
from marglik.layers.equivariance import GroupedLinear


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
    return module.groups == 1


def _padded(module: nn.Module, x: Tensor, geometry: tuple) -> tuple[Tensor, tuple]:
    """x and the geometry the patches take: for ``padding_mode`` "circular", "reflect" or
    "replicate" the input padded as the module pads it (``F.pad``, as ``nn.Conv2d.forward``
    does) and no further (zero) padding; "zeros" unchanged."""
    if module.padding_mode == "zeros":
        return x, geometry
    kernel, stride, dilation, (top, bottom, left, right) = geometry
    x = F.pad(x, (left, right, top, bottom), mode=module.padding_mode)
    return x, (kernel, stride, dilation, (0, 0, 0, 0))


def _conv2d_geometry(module: nn.Module) -> tuple[tuple, tuple, tuple, tuple]:
    """(kernel, stride, dilation, (top, bottom, left, right) padding) of a Conv2d."""
    kernel, dilation = tuple(module.kernel_size), tuple(module.dilation)
    pads = explicit_padding(module.padding, kernel, dilation)
    return kernel, tuple(module.stride), dilation, pads


def _conv1d_geometry(module: nn.Module) -> tuple[tuple, tuple, tuple, tuple]:
    """A Conv1d as a (k, 1) Conv2d on inputs (N, C_in, L, 1)."""
    kernel, dilation = (*module.kernel_size, 1), (*module.dilation, 1)
    padding = module.padding if isinstance(module.padding, str) else (*module.padding, 0)
    return kernel, (*module.stride, 1), dilation, explicit_padding(padding, kernel, dilation)


def _conv2d_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """x (N, C_in, H, W) -> patches (N, H_out·W_out, C_in·k_h·k_w)."""
    x, geometry = _padded(module, args[0], _conv2d_geometry(module))
    return unfold(x, *geometry).transpose(1, 2)


def _conv1d_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """x (N, C_in, L) -> patches (N, L_out, C_in·k), as a (k, 1) 2-d convolution."""
    x, geometry = _padded(module, args[0].unsqueeze(-1), _conv1d_geometry(module))
    return unfold(x, *geometry).transpose(1, 2)


def _conv_input_sums(x: Tensor, geometry: tuple, approx: str) -> Tensor:
    if approx == "expand":
        return patch_gram(x, *geometry)
    return conv_patch_sums(x, *geometry)


def _conv2d_input_sums(module: nn.Module, args: tuple[Tensor, ...], approx: str) -> Tensor:
    """KFAC input statistics of a Conv2d without unfolding every patch (conv.py)."""
    return _conv_input_sums(*_padded(module, args[0], _conv2d_geometry(module)), approx)


def _conv1d_input_sums(module: nn.Module, args: tuple[Tensor, ...], approx: str) -> Tensor:
    x = args[0].unsqueeze(-1)
    return _conv_input_sums(*_padded(module, x, _conv1d_geometry(module)), approx)


def _conv_output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """(K, N, C_out, *spatial) -> (K, N, R, C_out)."""
    K, N = g.shape[:2]
    return g.reshape(K, N, g.shape[2], -1).transpose(2, 3)


LINEAR = LayerType(_linear_inputs, _linear_output_grads)
CONV1D = LayerType(_conv1d_inputs, _conv_output_grads, _conv_applies,
                   input_sums=_conv1d_input_sums, feature_dim=1)
CONV2D = LayerType(_conv2d_inputs, _conv_output_grads, _conv_applies,
                   input_sums=_conv2d_input_sums, feature_dim=1)

register_layer(nn.Linear, LINEAR)
register_layer(nn.Conv1d, CONV1D)
register_layer(nn.Conv2d, CONV2D)


# ------------------------------------------------------------------- grouped linear maps
def _grouped_inputs(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """x (N, G, D_in) -> a (N, G, G·D_in), a_{n,g} = e_g ⊗ x_{n,g} (block-sparse)."""
    x = args[0]
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.einsum("ngi,gh->nghi", x, eye).flatten(2)


def _grouped_input_sums(module: nn.Module, args: tuple[Tensor, ...], approx: str) -> Tensor:
    """expand: Σ_{n,g} a aᵀ = blockdiag_g(Σ_n x_g x_gᵀ); reduce: Σ_g a_{n,g} = vec(x_n)."""
    x = args[0]
    if approx != "expand":
        return x.flatten(1)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    blocks = torch.einsum("ngi,ngj,gh->gihj", x, x, eye)
    return blocks.reshape(x.shape[1] * x.shape[2], -1)


#: ``marglik.layers.GroupedLinear``: G maps W[:, g, :] as one W (D_out, G·D_in) at G positions.
GROUPED_LINEAR = LayerType(_grouped_inputs, _linear_output_grads,
                           input_sums=_grouped_input_sums)

register_layer(GroupedLinear, GROUPED_LINEAR)


# ------------------------------------------------------------------------- multi-head attention
def _mha_parts(module: nn.Module) -> list[LinearPart]:
    bias = "in_proj_bias" if module.in_proj_bias is not None else None
    out_bias = "out_proj.bias" if module.out_proj.bias is not None else None
    if module._qkv_same_embed_dim:
        parts = [LinearPart("in_proj", "in_proj_weight", bias)]
    else:  # the packed bias spans three weights: it takes the generic path
        parts = [LinearPart(f"{p}_proj", f"{p}_proj_weight") for p in "qkv"]
    return [*parts, LinearPart("out_proj", "out_proj.weight", out_bias)]


def mha_forward(
    module: nn.MultiheadAttention,
    linear: LinearCall,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` with its projections made explicit (and hookable).

    The q/k/v projections and the output projection are computed through ``linear`` on
    batch-first tensors (N, L, E); everything in between (heads, masks, ``bias_k``/``bias_v``,
    ``add_zero_attn``, dropout, ``is_causal``, the attention weights) is
    ``F.multi_head_attention_forward`` itself, called with identity projections (x Iᵀ = x
    exactly in floating point) and always on its explicit softmax path (``need_weights=True``;
    the weights are returned only if asked for), which ``torch.func`` batches and which can be
    differentiated twice (CPU flash attention cannot). Outputs equal the module's slow path and
    its fast path (``torch._native_multi_head_attention``) to rounding.

    KFAC of the parts (Eschenhagen et al., NeurIPS 2023; expand or reduce over the tokens):

    - ``in_proj`` (packed ``in_proj_weight`` (3E, E) and ``in_proj_bias``), self-attention
      (``query is key is value``, as in ``nn.TransformerEncoderLayer``): one linear map with 3E
      outputs at the L tokens, a_r = x_r, b_r = ∂/∂(q_r, k_r, v_r) — what a model with an
      explicit ``nn.Linear(E, 3E)`` gets;
    - ``in_proj`` with different query / key / value (cross-attention): the three maps at the
      L query and S key/value tokens, as one map with 3E outputs at L + 2S positions whose
      output gradient is zero outside the map's own rows: A averages x xᵀ over all L + 2S
      inputs, G = blockdiag(G_q, G_k, G_v);
    - ``q_proj``/``k_proj``/``v_proj`` (``kdim``/``vdim`` ≠ E: separate weights, no bias; the
      packed ``in_proj_bias`` takes the generic exact path), each a Linear at its tokens;
    - ``out_proj``: a Linear at the L tokens.

    Per-sample gradients Σ_r b aᵀ, hence exact diagonals, full GGNs and the layer-wise
    predictive, are exact in every case. ``bias_k`` / ``bias_v`` take the generic path.
    """
    m = module
    is_batched = query.dim() == 3
    E = m.embed_dim

    def batch_first(t: Tensor) -> Tensor:  # module layout -> (N, L, E)
        if not is_batched:
            return t.unsqueeze(0)
        return t if m.batch_first else t.transpose(0, 1)

    def seq_first(t: Tensor) -> Tensor:  # (N, L, E) -> F.multi_head_attention_forward layout
        return t.transpose(0, 1) if is_batched else t.squeeze(0)

    if m._qkv_same_embed_dim:
        W, b = m.in_proj_weight, m.in_proj_bias
        if query is key and key is value:
            q, k, v = linear("in_proj", batch_first(query), W, b).chunk(3, -1)
        else:
            Ws = W.chunk(3)
            bs = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = (
                linear("in_proj", batch_first(t), Ws[j], bs[j], (j * E, (j + 1) * E))
                for j, t in enumerate((query, key, value))
            )
    else:
        bs = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
        q, k, v = (
            linear(f"{p}_proj", batch_first(t), getattr(m, f"{p}_proj_weight"), bj)
            for p, t, bj in zip("qkv", (query, key, value), bs)
        )
    eye = torch.eye(E, dtype=q.dtype, device=q.device)
    attn, weights = F.multi_head_attention_forward(
        seq_first(q), seq_first(k), seq_first(v), E, m.num_heads,
        None, None, m.bias_k, m.bias_v, m.add_zero_attn, m.dropout,
        eye, None,
        training=m.training,
        key_padding_mask=key_padding_mask,
        need_weights=True,  # the explicit softmax path: double backward and vmap work
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    attn = attn.transpose(0, 1) if is_batched else attn.unsqueeze(0)  # (N, L, E)
    out = linear("out_proj", attn, m.out_proj.weight, m.out_proj.bias)
    if not need_weights:
        weights = None
    if not is_batched:
        return out.squeeze(0), weights
    return (out if m.batch_first else out.transpose(0, 1)), weights


MULTIHEAD_ATTENTION = CompositeType(_mha_parts, mha_forward)

register_layer(nn.MultiheadAttention, MULTIHEAD_ATTENTION)

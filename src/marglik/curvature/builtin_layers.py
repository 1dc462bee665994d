"""The layer types marglik registers itself (:mod:`marglik.curvature.registry` has the protocol).

- ``nn.Linear`` (any leading dims: the middle ones are positions);
- ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and any ``padding_mode``: unfolded patches of
  the input padded as the module pads it, and KFAC input statistics without unfolding every
  patch (:mod:`marglik.curvature.conv`);
- :class:`marglik.layers.GroupedLinear`: G maps as one map at G positions with block-sparse
  inputs;
- ``nn.MultiheadAttention`` as a :class:`~marglik.curvature.registry.CompositeType` whose
  explicit forward (:func:`mha_forward`) makes every projection through the recording callback.

Importing :mod:`marglik.curvature` registers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.curvature.conv import conv_patch_sums, explicit_padding, patch_gram, unfold
from marglik.curvature.registry import (
    CompositeType,
    LayerType,
    LinearCall,
    LinearPart,
    register_layer,
)
from marglik.layers.equivariance import GroupedLinear


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

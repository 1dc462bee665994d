"""Soft-equivariant layers: ½(fully-connected path + convolutional path), each path its own module.

Layer-wise equivariance learned by the evidence (van der Ouderaa, Immer & van der Wilk, "Learning
Layer-wise Equivariances Automatically using Gradients", NeurIPS 2023) builds every layer as a
residual pathway

    out = ½ (fc(x) + conv(x)),

an unconstrained fully-connected map next to a translation-equivariant convolution, and gives each
path its own prior precision δ_fc, δ_conv learned by the differentiable Laplace evidence
(:mod:`marglik.layers.balance`). Where the data are translation-equivariant the evidence drives δ_fc
up and the FC path off: the layer *becomes* convolutional.

Each path is a child module, ``fc`` and ``conv``, built from types the curvature registry knows
(``nn.Linear``, ``nn.Conv1d`` / ``nn.Conv2d``, :class:`GroupedLinear`), so every path gets its own
exact Kronecker-factored (KFAC) block and its own prior group; nothing new has to be taught to the
curvature engine beyond :class:`GroupedLinear`.

FC paths over images are large (C_out·C_in·(HW)² weights: 615k for one channel at 28×28), so the
paper's factored FC (F-FC) is offered too: per channel pair a rank-one map between input and output
positions,

    W[d, c, y, x] = V[y, d, c] · U[d, c, x]      (C_out·C_in·(X + Y) weights),

built from two :class:`GroupedLinear` maps (``fc.u``, ``fc.v``), each an exact linear map shared
over positions (its groups), so KFAC applies to each factor.

Two choices matter for training image nets of these layers (docs/equivariance.md): the conv path's
``padding_mode="circular"`` (exact cyclic-shift equivariance, as in the paper; with zero padding a
deep conv reads positions from the borders) and ``init="fc_off"`` (the layer starts as a
Kaiming-initialised conv, the FC path at zero output; :data:`INITS`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "FC_KINDS",
    "INITS",
    "PADDING_MODES",
    "DenseFC",
    "FactoredFC",
    "GroupedLinear",
    "SoftEquivariant",
    "SoftEquivariantConv1d",
    "SoftEquivariantConv2d",
    "SoftEquivariantLinear",
]


class GroupedLinear(nn.Module):
    """G independent linear maps, one per group: out[n, g] = W[:, g, :] x[n, g] + b.

    Registered in the curvature registry as a linear map W (D_out, G·D_in) shared over R = G
    positions whose input at position g is the block-sparse a_{n,g} = e_g ⊗ x[n, g]; its KFAC
    factors are then G ⊗ A with A block-diagonal over the groups (expand) — exact in the
    expand setting (every group followed by the same linear map), see
    :mod:`marglik.curvature.registry`.

    Args:
        groups: G.
        in_features: D_in per group.
        out_features: D_out per group.
        bias: a bias (D_out,) shared by all groups.

    Shapes:
        x (N, G, D_in) -> out (N, G, D_out); ``weight`` (D_out, G, D_in).
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        for name, value in (("groups", groups), ("in_features", in_features),
                            ("out_features", out_features)):
            _check_positive(name, value)
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, groups, in_features).uniform_(
            -bound, bound))
        self.bias = (nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
                     if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.groups, self.in_features)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"GroupedLinear expects inputs (N, {expected[0]}, {expected[1]}), "
                f"got {tuple(x.shape)}"
            )
        out = torch.einsum("ngi,ogi->ngo", x, self.weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


class DenseFC(nn.Module):
    """A fully-connected map between feature maps: (N, C_in, *S_in) -> (N, C_out, *S_out).

    Its one child ``linear`` is an ``nn.Linear(C_in·|S_in|, C_out·|S_out|)`` on the flattened map
    (weights W[(d, y), (c, x)], bias per output channel and position).
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], bias: bool = True):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.linear = nn.Linear(math.prod(in_shape), math.prod(out_shape), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_shape, "DenseFC")
        return self.linear(x.flatten(1)).reshape(x.shape[0], *self.out_shape)


class FactoredFC(nn.Module):
    """The factored FC path (F-FC, NeurIPS 2023): a rank-one position map per channel pair.

        out[n, d, y] = Σ_c V[y, d, c] Σ_x U[d, c, x] x[n, c, x] + b[y],

    i.e. W[d, c, y, x] = V[y, d, c] U[d, c, x] with C_out·C_in·(X + Y) weights instead of
    C_out·C_in·X·Y. Children: ``u`` = :class:`GroupedLinear` (groups C_in, X -> C_out; weight U
    (C_out, C_in, X)) and ``v`` = :class:`GroupedLinear` (groups C_out, C_in -> Y; weight V
    (Y, C_out, C_in); the bias b (Y,) is a bias per output position shared over channels).

    Shapes:
        x (N, C_in, *S_in) -> (N, C_out, *S_out), X = |S_in|, Y = |S_out|.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], bias: bool = True):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        c_in, c_out = in_shape[0], out_shape[0]
        self.u = GroupedLinear(c_in, math.prod(in_shape[1:]), c_out, bias=False)
        self.v = GroupedLinear(c_out, c_in, math.prod(out_shape[1:]), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_shape, "FactoredFC")
        h = self.u(x.reshape(x.shape[0], self.in_shape[0], -1))  # (N, C_in, C_out)
        return self.v(h.transpose(1, 2)).reshape(x.shape[0], *self.out_shape)

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight W (C_out·Y, C_in·X), rows (d, y), columns (c, x)."""
        W = torch.einsum("ydc,dcx->dycx", self.v.weight, self.u.weight)
        c_out, y = self.v.groups, self.v.out_features
        return W.reshape(c_out * y, -1)


#: FC path kinds for the soft-equivariant layers.
FC_KINDS = {"dense": DenseFC, "factored": FactoredFC}


class SoftEquivariant(nn.Module):
    """½(fc(x) + conv(x)): the residual-pathway layer of NeurIPS 2023 (van der Ouderaa et al.).

    Args:
        fc: the fully-connected path (any module).
        conv: the convolutional path (any module with the same output shape).

    The paths are the children ``fc`` and ``conv``; :attr:`PATHS` names them, and
    :func:`marglik.layers.balance.equivariance_prior_groups` gives each its own prior group.
    """

    PATHS = ("fc", "conv")

    def __init__(self, fc: nn.Module, conv: nn.Module):
        super().__init__()
        self.fc, self.conv = fc, conv

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (self.fc(x) + self.conv(x))

    def path_parameters(self) -> dict[str, list[str]]:
        """Names (relative to this layer) of the parameters of each path."""
        return {path: [f"{path}.{n}" for n, _ in getattr(self, path).named_parameters()]
                for path in self.PATHS}

    def reset_parameters(self, init: str = "torch") -> None:
        """Re-initialise both paths by the scheme ``init`` (:data:`INITS`)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
        INITS[init](self)


class SoftEquivariantConv2d(SoftEquivariant):
    """½(FC + Conv2d) on images (N, C_in, H, W) -> (N, C_out, H, W) ('same' padding).

    Args:
        in_channels, out_channels: C_in, C_out.
        shape: (H, W) of the feature maps.
        kernel_size: odd size k of the k×k convolution.
        fc: ``"dense"`` (:class:`DenseFC`) or ``"factored"`` (:class:`FactoredFC`).
        bias: biases in both paths.
        padding_mode: ``"zeros"`` or ``"circular"`` (:data:`PADDING_MODES`): circular padding
            makes the conv path exactly equivariant to cyclic shifts (the paper's choice);
            zero padding lets a deep conv read positions near the borders.
        init: ``"torch"`` (PyTorch's module defaults), ``"kaiming"`` or ``"fc_off"``
            (:data:`INITS`).
    """

    def __init__(self, in_channels: int, out_channels: int, shape: tuple[int, int],
                 kernel_size: int = 3, fc: str = "factored", bias: bool = True,
                 padding_mode: str = "zeros", init: str = "torch"):
        shape = _check_spatial(shape, 2)
        _check_channels(in_channels, out_channels, kernel_size)
        super().__init__(
            _fc_path(fc, (in_channels, *shape), (out_channels, *shape), bias),
            _conv_path(2, in_channels, out_channels, kernel_size, bias, padding_mode),
        )
        if init != "torch":  # the modules were just built with PyTorch's defaults
            self.reset_parameters(init)


class SoftEquivariantConv1d(SoftEquivariant):
    """½(FC + Conv1d) on signals (N, C_in, L) -> (N, C_out, L) ('same' padding).

    Args as :class:`SoftEquivariantConv2d` with ``length`` L instead of ``shape``.
    """

    def __init__(self, in_channels: int, out_channels: int, length: int,
                 kernel_size: int = 3, fc: str = "dense", bias: bool = True,
                 padding_mode: str = "zeros", init: str = "torch"):
        (length,) = _check_spatial((length,), 1)
        _check_channels(in_channels, out_channels, kernel_size)
        super().__init__(
            _fc_path(fc, (in_channels, length), (out_channels, length), bias),
            _conv_path(1, in_channels, out_channels, kernel_size, bias, padding_mode),
        )
        if init != "torch":  # the modules were just built with PyTorch's defaults
            self.reset_parameters(init)


class SoftEquivariantLinear(SoftEquivariant):
    """½(Linear + Conv1d) on vectors (N, L) -> (N, L), read as one-channel signals.

    ``fc`` is an ``nn.Linear(L, L)``; ``conv`` an ``nn.Conv1d(1, 1, k, padding=k // 2)`` applied
    to x (N, 1, L): a shared local filter, equivariant to shifts of the vector's entries.
    """

    def __init__(self, features: int, kernel_size: int = 3, bias: bool = True):
        (features,) = _check_spatial((features,), 1)
        _check_channels(1, 1, kernel_size)
        super().__init__(nn.Linear(features, features, bias=bias),
                         nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=bias))
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"SoftEquivariantLinear expects inputs (N, {self.features}), got {tuple(x.shape)}"
            )
        return 0.5 * (self.fc(x) + self.conv(x.unsqueeze(1)).squeeze(1))


# ------------------------------------------------------------------------------ conv paths
#: (conv, circular pad) module types per spatial dimensionality.
_CONVS = {1: (nn.Conv1d, nn.CircularPad1d), 2: (nn.Conv2d, nn.CircularPad2d)}


def _zeros_conv(dims: int, c_in: int, c_out: int, k: int, bias: bool) -> nn.Module:
    return _CONVS[dims][0](c_in, c_out, k, padding=k // 2, bias=bias)


def _circular_conv(dims: int, c_in: int, c_out: int, k: int, bias: bool) -> nn.Module:
    conv, pad = _CONVS[dims]
    # an explicit cyclic pad, then an unpadded conv: the curvature registry sees a plain
    # zero-padding conv (padding 0) on the padded input, so its KFAC factors stay exact
    return nn.Sequential(pad(k // 2), conv(c_in, c_out, k, padding=0, bias=bias))


#: The conv path's padding: ``"zeros"`` (``ConvNd(padding=k // 2)``) or ``"circular"``
#: (``Sequential(CircularPadNd(k // 2), ConvNd(padding=0))``).
PADDING_MODES = {"zeros": _zeros_conv, "circular": _circular_conv}


def _conv_path(dims: int, c_in: int, c_out: int, k: int, bias: bool,
               padding_mode: str) -> nn.Module:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(PADDING_MODES)}, "
                         f"got {padding_mode!r}")
    return PADDING_MODES[padding_mode](dims, c_in, c_out, k, bias)


# ------------------------------------------------------------------------------ inits
def _weights(path: nn.Module) -> list[nn.Module]:
    """The modules of a path that hold a weight, in forward order."""
    return [m for m in path.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]


def _fan_in(module: nn.Module) -> int:
    """Inputs per output of one weight: D_in of a (grouped) linear map, C_in·k of a conv."""
    w = module.weight
    return w.shape[-1] if isinstance(module, GroupedLinear) else w[0].numel()


@torch.no_grad()
def _init_torch(layer: SoftEquivariant) -> None:
    """PyTorch's defaults: U(±1/√fan_in) weights and biases in both paths."""
    for m in _weights(layer.fc) + _weights(layer.conv):
        bound = 1.0 / math.sqrt(_fan_in(m))
        m.weight.uniform_(-bound, bound)
        if m.bias is not None:
            m.bias.uniform_(-bound, bound)


@torch.no_grad()
def _init_kaiming(layer: SoftEquivariant) -> None:
    """The paper's (tychovdo/ella): conv weights Kaiming-uniform for ReLU (variance 2/fan_in),
    every FC weight (``linear``; ``u`` and ``v`` of F-FC) variance 1/fan_in, so the FC path
    keeps the mean square of its input; all biases 0."""
    for m in _weights(layer.conv):
        nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
    for m in _weights(layer.fc):
        bound = math.sqrt(3.0 / _fan_in(m))
        m.weight.uniform_(-bound, bound)
    for m in _weights(layer.fc) + _weights(layer.conv):
        if m.bias is not None:
            m.bias.zero_()


@torch.no_grad()
def _init_fc_off(layer: SoftEquivariant) -> None:
    """The layer starts as the Kaiming-initialised convolution it replaces: the FC path's
    *last* weight (``v`` of F-FC, the dense ``linear``) at 0, so the FC path is a zero residual
    branch whose gradient (through F-FC's random U, or the input) is nonzero and the data and
    the evidence decide whether it is switched on; the conv weights Kaiming-uniform ×2
    (variance 8/fan_in), so that ½ conv(x) has the Kaiming scale (with ``"kaiming"`` every
    layer halves the signal, which slows training); other FC weights and all biases as
    ``"kaiming"``."""
    _init_kaiming(layer)
    _weights(layer.fc)[-1].weight.zero_()
    for m in _weights(layer.conv):
        m.weight.mul_(2.0)


#: Initialisations of a :class:`SoftEquivariant` layer (``reset_parameters(init)``):
#: ``"torch"``, ``"kaiming"``, ``"fc_off"``.
INITS = {"torch": _init_torch, "kaiming": _init_kaiming, "fc_off": _init_fc_off}


# ------------------------------------------------------------------------------ checks
def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_spatial(shape, dims: int) -> tuple[int, ...]:
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if len(shape) != dims:
        raise ValueError(f"shape must have {dims} entries, got {shape!r}")
    for s in shape:
        _check_positive("each spatial size", s)
    return shape


def _check_channels(in_channels: int, out_channels: int, kernel_size: int) -> None:
    _check_positive("in_channels", in_channels)
    _check_positive("out_channels", out_channels)
    _check_positive("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")


def _fc_path(kind: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
             bias: bool) -> nn.Module:
    if kind not in FC_KINDS:
        raise ValueError(f"fc must be one of {sorted(FC_KINDS)}, got {kind!r}")
    return FC_KINDS[kind](in_shape, out_shape, bias)


def _check_input(x: Tensor, shape: tuple[int, ...], name: str) -> None:
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name} expects inputs (N, {', '.join(map(str, shape))}), "
                         f"got {tuple(x.shape)}")

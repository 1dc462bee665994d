"""G small MLPs evaluated as one batched block network (the subnetworks of a neural additive model).

A neural additive model (Agarwal et al., NeurIPS 2021; Laplace version: Bouchiat, Immer, Yèche,
Rätsch & Fortuin, "Laplace-Approximated Neural Additive Models", AABI 2023) has one small MLP per
feature (or per feature pair). Here the G subnetworks, all of the same widths, run as one network:
layer l of every subnetwork g is

    h^{l+1}[n, g] = φ(W_g^l h^l[n, g] + b_g^l),     W_g^l (D_{l+1}, D_l),  b_g^l (D_{l+1},),

computed for all g at once by one ``einsum`` over the stacked weights (G, D_{l+1}, D_l); there is
no Python loop over subnetworks in the maths. Every subnetwork keeps *its own parameter tensors*
(``layers.<l>.weight.<g>``, ``layers.<l>.bias.<g>``), so it can be one prior group of
:class:`~marglik.posterior.Prior` (one prior precision per subnetwork learned by the evidence:
implicit feature selection). The tensors are stacked by one ``torch.stack`` per layer and call.

Curvature: :class:`BlockLinear` is registered with the curvature layer registry as a
:class:`~marglik.curvature.registry.CompositeType` whose G parts are its G linear maps
(``weight.<g>``, ``bias.<g>``), so ``"kron"`` gives one Kronecker block G_g ⊗ A_g per subnetwork
and layer (and a dense block for each bias), the structure of Bouchiat et al. — block-diagonal
over subnetworks and layers, each block Kronecker-factored (Martens & Grosse, ICML 2015). The
registered forward, used only while a fit records, calls the G maps one after another; training
and prediction use the batched ``einsum``. ``"full"`` (exact full GGN) and ``"diag"`` (exact GGN
diagonal) take the engine's per-sample ``torch.func`` path. ``"kron"`` is the default of the
additive model: the diagonal's log-determinant over-counts the Occam factor (Hadamard's
inequality, log det P ≤ Σ_i log P_ii), which over-regularises the subnetworks
(``benchmarks/RESULTS-additive.md``, diagnosis).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from marglik.curvature.registry import CompositeType, LinearCall, LinearPart, register_layer

__all__ = ["ACTIVATIONS", "BlockLinear", "BlockMLP"]

#: Activations between layers, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
                                            "silu": nn.SiLU}


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class BlockLinear(nn.Module):
    """G independent linear maps with their own weights and biases, applied in one einsum.

        out[n, g] = W_g x[n, g] + b_g

    Args:
        groups: G.
        in_features, out_features: D_in, D_out of every map.

    Shapes:
        x (N, G, D_in) -> out (N, G, D_out); ``weight[g]`` (D_out, D_in), ``bias[g]`` (D_out,).
        Initialisation as ``nn.Linear`` (uniform ±1/√D_in).
    """

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.groups = _check_positive_int("groups", groups)
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        bound = 1.0 / math.sqrt(in_features)
        w = torch.empty(groups, out_features, in_features).uniform_(-bound, bound)
        b = torch.empty(groups, out_features).uniform_(-bound, bound)
        self.weight = nn.ParameterList([nn.Parameter(t.clone()) for t in w.unbind(0)])
        self.bias = nn.ParameterList([nn.Parameter(t.clone()) for t in b.unbind(0)])

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The weights (G, D_out, D_in) and biases (G, D_out) as two stacked tensors."""
        return torch.stack(tuple(self.weight)), torch.stack(tuple(self.bias))

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.groups, self.in_features)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"BlockLinear expects inputs (N, {expected[0]}, {expected[1]}), "
                             f"got {tuple(x.shape)}")
        W, b = self.stacked()
        return torch.einsum("ngi,goi->ngo", x, W) + b

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}")


class BlockMLP(nn.Module):
    """G MLPs ``in_features → hidden … → out_features`` as one batched network.

    Args:
        groups: G, the number of subnetworks.
        in_features: inputs of each subnetwork (1 for a feature, 2 for a feature pair).
        hidden: hidden widths, e.g. ``(32, 32)``; may be empty (G linear maps).
        out_features: outputs of each subnetwork (C).
        activation: a name in :data:`ACTIVATIONS`.

    Shapes:
        x (N, G, in_features) -> (N, G, out_features).
    """

    def __init__(self, groups: int, in_features: int = 1, hidden: tuple[int, ...] = (32, 32),
                 out_features: int = 1, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        widths = [in_features, *tuple(hidden), out_features]
        for w in widths:
            _check_positive_int("every width", w)
        self.groups, self.widths, self.activation = groups, widths, activation
        self.layers = nn.ModuleList(BlockLinear(groups, a, b)
                                    for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x

    def group_parameter_names(self, prefix: str = "") -> list[list[str]]:
        """Names of the parameter tensors of each subnetwork, ``[[names of g=0], …]``, with
        ``prefix`` (e.g. ``"features."``) prepended — the prior groups of the subnetworks."""
        return [[f"{prefix}layers.{i}.{kind}.{g}" for i in range(len(self.layers))
                 for kind in ("weight", "bias")] for g in range(self.groups)]

    def last_layer_names(self, prefix: str = "") -> list[str]:
        """Names of the last-layer weight tensors, one per subnetwork, in order."""
        last = len(self.layers) - 1
        return [f"{prefix}layers.{last}.weight.{g}" for g in range(self.groups)]


def _block_linear_parts(module: BlockLinear) -> list[LinearPart]:
    """One linear part per subnetwork g: ``weight.<g>`` (D_out, D_in), ``bias.<g>``."""
    return [LinearPart(f"g{g}", f"weight.{g}", f"bias.{g}") for g in range(module.groups)]


def _block_linear_forward(module: BlockLinear, linear: LinearCall, x: Tensor) -> Tensor:
    """:meth:`BlockLinear.forward` with every map made through ``linear`` (recording only):
    x (N, G, D_in) -> (N, G, D_out); the G calls are the G Kronecker blocks of a fit."""
    expected = (module.groups, module.in_features)
    if x.dim() != 3 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"BlockLinear expects inputs (N, {expected[0]}, {expected[1]}), "
                         f"got {tuple(x.shape)}")
    return torch.stack([linear(f"g{g}", x[:, g], w, b)
                        for g, (w, b) in enumerate(zip(module.weight, module.bias))], 1)


register_layer(BlockLinear, CompositeType(parts=_block_linear_parts,
                                          forward=_block_linear_forward))

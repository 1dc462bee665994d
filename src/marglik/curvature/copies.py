"""Networks run on S copies of every input and averaged: how the layer hooks see them.

A model that averages a network over S augmented copies of each input (LILA, Immer, van der
Ouderaa et al., NeurIPS 2022; :class:`marglik.layers.AugmentedModel`),

    f(x_n) = 1/S Σ_s g(x_{n,s}),

runs g on a batch of N·S rows, the copies of input n in rows n·S … n·S + S − 1. A module
declares this with an integer attribute ``copies_per_input`` (= S); nested declarations
multiply. A registered layer inside it that sees N·S rows (checked on the first batch, with a
per-sample gradient check, :func:`marglik.curvature.silent.inconsistent_layers`) is recorded
with the copies as extra shared positions: a (N·S, R, D_in) → (N, S·R, D_in) and
b (K, N·S, R, D_out) → (K, N, S·R, D_out), so per-sample gradients Σ_{s,r} b aᵀ — hence the
diagonal, the full GGN and the layer-wise predictive — are exact. A layer inside it that sees
N rows (e.g. in the augmentation) is an ordinary layer.

KFAC over the copies (Eschenhagen et al., NeurIPS 2023, §3; methods.md §3, §5), with b the
gradients of the averaged output (they carry the 1/S):

- reduce: ā = mean_{s,r} a, b̃ = Σ_{s,r} b — the average is a reduction before the loss, so
  this is exact for deep linear networks (the reduce setting);
- expand: A = 1/(N·S·R) Σ a aᵀ, G = S · Σ_{k,n,s,r} b bᵀ. Dropping the cross terms between
  copies, Σ_{s,s'} (b_s ⊗ a_s)(b_s' ⊗ a_s')ᵀ ≈ S Σ_s (b_s ⊗ a_s)(b_s ⊗ a_s)ᵀ, treats the S
  copies as S data points of weight 1/S (the augmented samples as data, as LILA's KFAC): the
  factor S makes it exact when the copies coincide (η = 0, or S = 1), where it equals the
  plain network's KFAC.
"""

from __future__ import annotations

from torch import Tensor, nn

from marglik.curvature.kfac import Rows

#: the attribute a module declares S with
COPIES_ATTRIBUTE = "copies_per_input"


def declared(module: nn.Module) -> int:
    """S declared by ``module`` (1 if none); must be a positive int."""
    S = getattr(module, COPIES_ATTRIBUTE, 1)
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"{type(module).__name__}.{COPIES_ATTRIBUTE} must be a positive int, "
                         f"got {S!r}")
    return S


def module_copies(model: nn.Module) -> dict[int, int]:
    """id(module) -> product of S over the declaring modules strictly above it (1: none)."""
    names = dict(model.named_modules())
    factors = {name: declared(m) for name, m in names.items()}
    out = {}
    for name, module in names.items():
        S = 1
        for other, factor in factors.items():
            if factor > 1 and other != name and (other == "" or name.startswith(other + ".")):
                S *= factor
        out[id(module)] = S
    return out


def group_inputs(a: Tensor, S: int) -> Tensor:
    """a (N·S, R, D_in) -> (N, S·R, D_in): the copies of an input as its positions."""
    return a if S == 1 else a.reshape(a.shape[0] // S, S * a.shape[1], a.shape[2])


def group_grads(b: Tensor, S: int) -> Tensor:
    """b (K, N·S, R, D_out) -> (K, N, S·R, D_out)."""
    if S == 1:
        return b
    K, NS, R, D = b.shape
    return b.reshape(K, NS // S, S * R, D)


def group_input_sums(stats: Tensor | Rows, approx: str, S: int) -> Tensor | Rows:
    """A layer type's fast input statistics of one call over N·S rows, per input: for
    ``"reduce"`` Σ_r a (N·S, D_in) -> Σ_{s,r} a (N, D_in); ``"expand"`` sums are unchanged."""
    if S == 1 or approx != "reduce":
        return stats
    return stats.reshape(-1, S, stats.shape[-1]).sum(1)


def scale_expand(G: Tensor | Rows, approx: str, S: int) -> Tensor | Rows:
    """G_sum of KFAC-expand over S averaged copies: S · Σ b bᵀ (module docstring)."""
    if S == 1 or approx != "expand":
        return G
    return Rows(G.M * S**0.5) if isinstance(G, Rows) else G * S

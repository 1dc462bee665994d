"""Kronecker factors for layers with weight sharing: KFAC-expand and KFAC-reduce.

Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures", NeurIPS 2023. A layer applied at R shared positions sees inputs a_{n,r} (D_in)
and backpropagated output columns b_{k,n,r} (D_out). The weight block is G ⊗ A (row-major vec of
W, D_out × D_in), the bias block is G alone:

- expand:  A = 1/(N·R) Σ_{n,r} a aᵀ,   G = Σ_{k,n,r} b bᵀ
- reduce:  A = 1/N Σ_n ā āᵀ (ā = mean_r a),   G = Σ_{k,n} b̃ b̃ᵀ (b̃ = Σ_r b)

The 1/R sits in A (as in laplace-torch and curvlinops). Statistics are *summed* over batches
(and ranks) and normalised once at the end, so the result does not depend on the batch size.
For a single linear layer without sharing both equal the exact GGN; for deep linear networks
expand is exact in the expand setting and reduce in the reduce setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KFAC_APPROXIMATIONS = ("expand", "reduce")


def kfac_statistics(a: Tensor, b: Tensor, approx: str = "expand") -> tuple[Tensor, Tensor, int]:
    """Unnormalised factor sums for one batch.

    Args:
        a: layer inputs (N, R, D_in).
        b: output-column gradients (K, N, R, D_out).
        approx: ``"expand"`` or ``"reduce"``.

    Returns:
        (A_sum (D_in, D_in), G_sum (D_out, D_out), count) with A = A_sum / count.
    """
    A, G, count = kfac_factors([input_statistics(a, approx)], [b], approx)
    return as_matrix(A), as_matrix(G), count


@dataclass(frozen=True)
class Rows:
    """Rows M (n, D) standing for their Gram Mᵀ M (D, D), to be formed later: the
    accumulator stacks the rows of several batches and forms one larger, cheaper product
    (:class:`~marglik.curvature.accumulators.Sums`)."""

    M: Tensor


def as_matrix(statistic: Tensor | Rows) -> Tensor:
    """A Gram matrix, formed now if it was given as :class:`Rows`."""
    return gram(statistic.M) if isinstance(statistic, Rows) else statistic


def _total(parts: list[Tensor | Rows]) -> Tensor | Rows:
    """Sum of Gram statistics: stacked rows if all are rows, else matrices."""
    if all(isinstance(p, Rows) for p in parts):
        return Rows(parts[0].M if len(parts) == 1 else torch.cat([p.M for p in parts]))
    return sum(as_matrix(p) for p in parts)


def input_statistics(a: Tensor, approx: str) -> Tensor | Rows:
    """What one call of a layer adds to A: Σ_{n,r} a aᵀ for ``"expand"`` (as the rows a,
    :class:`Rows`), Σ_r a (N, D_in) for ``"reduce"``; a is (N, R, D_in)."""
    if approx == "expand":
        return Rows(a.reshape(-1, a.shape[-1]))
    if approx == "reduce":
        return a.sum(1)
    raise ValueError(f"unknown kfac_approx {approx!r}: use one of {KFAC_APPROXIMATIONS}")


def kfac_factors(
    inputs: list[Tensor | Rows], grads: list[Tensor], approx: str
) -> tuple[Tensor | Rows, Tensor | Rows, int]:
    """(A_sum, G_sum, count) of one batch from the calls of a layer; the sums are matrices
    or :class:`Rows` whose Gram they are.

    Args:
        inputs: per call, :func:`input_statistics` (or a layer type's cheaper identity for it).
        grads: per call, output-column gradients b (K, N, R_c, D_out); a layer called several
            times has R = Σ_c R_c positions.
        approx: ``"expand"`` (A_sum = Σ_{n,r} a aᵀ, count N·R, G = Σ_{k,n,r} b bᵀ) or
            ``"reduce"`` (ā = Σ_r a / R, A_sum = Σ_n ā āᵀ, count N, G = Σ_{k,n} b̃ b̃ᵀ with
            b̃ = Σ_r b).
    """
    N = grads[0].shape[1]
    R = sum(b.shape[2] for b in grads)
    if approx == "expand":
        return _total(inputs), _total([output_gram(b) for b in grads]), N * R
    if approx == "reduce":
        a_bar = sum(inputs) / R
        b_tilde = sum(b.sum(2) for b in grads)
        return Rows(a_bar), Rows(b_tilde.reshape(-1, b_tilde.shape[-1])), N
    raise ValueError(f"unknown kfac_approx {approx!r}: use one of {KFAC_APPROXIMATIONS}")


#: numbers a batched product in :func:`output_gram` may hold at once
MAX_BATCHED = 2**24


def gram(M: Tensor) -> Tensor:
    """Mᵀ M (D, D) of rows M (n, D); M may be a transposed view.

    For large M only the blocks on and above the diagonal of a 2×2 or 4×4 block split are
    multiplied (the rest is their transpose): 5/8 to 3/4 of the products, measured 20–35 %
    faster on CPU (a symmetric rank-k update, which torch does not expose).
    """
    n, D = M.shape
    blocks = 1 if n < 512 or D < 128 or M.requires_grad else (4 if D >= 256 else 2)
    if blocks == 1:
        return M.T @ M
    edges = [D * i // blocks for i in range(blocks + 1)]
    G = M.new_empty(D, D)
    for lo, hi in zip(edges[:-1], edges[1:]):  # block rows, not samples
        row = M[:, lo:hi].T @ M[:, lo:]
        G[lo:hi, lo:] = row
        G[hi:, lo:hi] = row[:, hi - lo :].T
    return G


def output_gram(b: Tensor) -> Tensor | Rows:
    """Σ_{k,n,r} b bᵀ (D_out, D_out) of output-column gradients b (K, N, R, D_out): the rows
    of b (:class:`Rows`) where they are contiguous.

    Gradients of a convolution arrive channels-first, b a transposed view of a contiguous
    g (K, N, D_out, R): there, for many positions (R ≥ D_out), Σ_i g_i g_iᵀ by batched products
    (in chunks) avoids copying b into rows, which costs more than the product on CPU; for few
    positions the small products are slow and the copy into rows is cheap (one thread, 9
    columns, 32 inputs, ResNet-18's last stage, R = 16, D_out = 512: 0.43 s batched, 0.04 s
    as rows; first stage, R = 1024, D_out = 64: 0.06 s against 0.24 s).
    """
    D, R = b.shape[-1], b.shape[2]
    if b.stride(-1) == 1 or R == 1 or R < D:
        return Rows(b.reshape(-1, D))
    g = b.transpose(-1, -2).reshape(-1, D, R)  # (K·N, D_out, R), a view if contiguous
    chunk = max(1, MAX_BATCHED // (D * D))
    G = b.new_zeros(D, D)
    for start in range(0, g.shape[0], chunk):  # chunks bound the memory of the products
        part = g[start : start + chunk]
        G += torch.bmm(part, part.transpose(1, 2)).sum(0)
    return G


def exact_layer_diagonal(a: Tensor, b: Tensor, max_elements: int = 2**26) -> tuple[Tensor, Tensor]:
    """Exact GGN diagonal of a layer's weight (D_out, D_in) and bias (D_out,).

    The per-sample weight gradient of column k is Σ_r b_{k,n,r} a_{n,r}ᵀ; without sharing
    (R = 1) the squared sum factorises into (Σ_k b²)ᵀ a², otherwise it is formed in chunks.
    """
    K, N, R, D_out = b.shape
    bias = b.sum(2).square().sum((0, 1))
    if R == 1:
        return b[:, :, 0].square().sum(0).T @ a[:, 0].square(), bias
    weight = torch.zeros(D_out, a.shape[-1], dtype=a.dtype, device=a.device)
    chunk = max(1, max_elements // (K * R * D_out * a.shape[-1]) or 1)
    for s in range(0, N, chunk):
        g = torch.einsum("knro,nri->knoi", b[:, s : s + chunk], a[s : s + chunk])
        weight += g.square().sum((0, 1))
    return weight, bias


def layer_sample_gradients(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample column gradients of a layer's weight and bias, flattened.

    The gradient of column k for sample n is Σ_r b_{k,n,r} a_{n,r}ᵀ (weight, row-major) and
    Σ_r b_{k,n,r} (bias). Used for a differentiable full curvature (``create_graph``).

    Args:
        a: layer inputs (N, R, D_in).
        b: output-column gradients (K, N, R, D_out).

    Returns:
        (weight (K, N, D_out·D_in), bias (K, N, D_out)).
    """
    weight = torch.einsum("knro,nri->knoi", b, a)
    return weight.reshape(*weight.shape[:2], -1), b.sum(2)

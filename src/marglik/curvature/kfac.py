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
    if approx == "expand":
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return a2.T @ a2, b2.T @ b2, a.shape[0] * a.shape[1]
    if approx == "reduce":
        a_bar, b_tilde = a.mean(1), b.sum(2).reshape(-1, b.shape[-1])
        return a_bar.T @ a_bar, b_tilde.T @ b_tilde, a.shape[0]
    raise ValueError(f"unknown kfac_approx {approx!r}: use one of {KFAC_APPROXIMATIONS}")


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

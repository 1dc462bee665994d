"""The tangent model over rescalings of the network's weight tensors (``tangent_search="scales"``).

With θ* split into its K parameter tensors θ*_k, the tangent model h(x; t) = J(x; θ*) t at
t = Σ_k c_k θ*_k is h = G c, G[..., k] = J θ*_k: K forward-mode passes give it for every scale
vector c, and its mode in c is a K-dimensional convex problem on cached outputs. The span holds
the network's own outputs (a linear last layer: f = J θ*_W + J θ*_b) and, for networks
positively homogeneous in their weights, the Euler ray J θ* = L f. Used by
:func:`marglik.posterior.tangent.optimize_tangent_evidence`; ``docs/calibration.md`` §6.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from marglik.curvature.batches import batches
from marglik.curvature.subsets import ParameterSubset
from marglik.likelihoods import Likelihood
from marglik.posterior.tangent_model import tangent_outputs

__all__ = ["block_mode", "block_outputs"]


def block_outputs(
    model: nn.Module,
    subset: ParameterSubset,
    loader: Iterable,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> tuple[list[tuple[Tensor, Any]], Tensor]:
    """The tangent model along each parameter tensor's own weights: [(G, y)] per batch and ids.

    With θ* split into its K parameter tensors θ*_k (their selected entries), the tangent
    model at t = Σ_k c_k θ*_k is h = G c with G[..., k] = J(x; θ*) θ*_k, so K forward-mode
    passes over ``loader`` give it for every scale c (K,). G (B, ..., K) and the targets are
    kept in memory. The span holds the network's own outputs whenever its last layer is linear
    (f = J θ*_W + J θ*_b for the last weight and bias), and the Euler ray c = (s, …, s) (for a
    network positively homogeneous of degree L in its weights, J θ* = L f).

    Returns:
        ([(G, y)] per batch, block (P,): the tensor k of every entry of θ).
    """
    sizes = torch.tensor(subset.numel_per_tensor)
    theta = subset.vector(model).detach()
    block = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(theta.device)
    block = torch.unique(block, return_inverse=True)[1]  # tensors with no selected entry dropped
    hs = [tangent_outputs(model, subset, torch.where(block == k, theta, 0.0))
          for k in range(int(block.max()) + 1)]
    out = [(torch.stack([h(x).detach() for h in hs], -1), y)
           for x, y in batches(loader, model, dict_key_x, dict_key_y)]
    return out, block


def block_mode(
    likelihood: Likelihood,
    outputs: list[tuple[Tensor, Any]],
    theta: Tensor,
    block: Tensor,
    precision: Tensor,
    prior_mean: Tensor,
    start: Tensor,
    tol: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """c* = argmin_c −Σ_n log p(y_n | G_n c) + ½ (t(c) − μ0)ᵀ P0 (t(c) − μ0), t(c) = c[block] ⊙ θ*.

    The tangent model's mode restricted to rescalings of θ*'s parameter tensors: a K-dimensional
    convex problem on the cached outputs of :func:`block_outputs` (no pass over the data), by
    Newton's method with the exact K × K Hessian and a backtracking line search from ``start``
    (K,) to a gradient below ``tol`` (default 1e-10 in float64, 1e-5 otherwise) times 1 + its
    largest entry at the start.

    Returns:
        (c* (K,), info) with info's ``"objective"`` and ``"gradient"`` (largest entry) at c*.
    """
    if tol is None:
        tol = 1e-10 if start.dtype == torch.float64 else 1e-5
    n_blocks = len(start)

    def block_sum(v: Tensor) -> Tensor:
        return torch.zeros(n_blocks, dtype=v.dtype, device=v.device).index_add_(0, block, v)

    def value(c: Tensor) -> Tensor:
        total = 0.5 * (precision * (c[block] * theta - prior_mean).square()).sum()
        for g, y in outputs:
            total = total - likelihood.log_prob(g @ c.to(g.dtype), y).sum()
        return total

    def derivatives(c: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient (K,) and Hessian (K, K): Σ Gᵀ ∇ + prior, Σ Gᵀ Λ G + prior (exact: h is
        linear in c)."""
        grad = block_sum(precision * (c[block] * theta - prior_mean) * theta)
        hess = torch.diag(block_sum((precision * theta.square()).expand_as(theta)))
        for g, y in outputs:
            h = g @ c.to(g.dtype)
            grad = grad + torch.einsum("...ck,...c->k", g, likelihood.gradient(h, y)).to(c)
            w = torch.einsum("...cr,...ck->...rk", likelihood.hessian_factor(h, y), g)
            hess = hess + torch.einsum("...rk,...rl->kl", w, w).to(c)
        return grad, hess

    c = start.detach().clone()
    size = None
    for _ in range(100):  # damped Newton: convex, K small, the Hessian exact
        grad, hess = derivatives(c)
        size = size if size is not None else 1.0 + float(grad.abs().max())
        if float(grad.abs().max()) <= tol * size:
            break
        step = torch.linalg.lstsq(hess, grad.unsqueeze(-1)).solution.squeeze(-1)
        current, alpha = value(c), 1.0
        while value(c - alpha * step) > current - 1e-4 * alpha * (grad @ step):
            alpha *= 0.5  # backtracking (Armijo)
            if alpha < 1e-10:
                break
        if alpha < 1e-10:
            break
        c = c - alpha * step
    grad, _ = derivatives(c)
    return c, {"objective": float(value(c)), "gradient": float(grad.abs().max())}

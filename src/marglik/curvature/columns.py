"""Output-space columns U_k whose backpropagation gives the curvature: Σ_k J_nᵀ U_k,n U_k,nᵀ J_n.

- ``"ggn"``: columns of a factor V of the output Hessian, Λ = V Vᵀ (exact GGN);
- ``"ef"``: the gradient of the negative log-likelihood (empirical Fisher, one column);
- ``"ggn-mc"``: gradients at targets sampled from the model (Monte Carlo GGN / Fisher).
"""

from __future__ import annotations

import torch
from torch import Tensor

from marglik.likelihoods import Likelihood

CURVATURES = ("ggn", "ef", "ggn-mc")


def output_columns(
    likelihood: Likelihood,
    f: Tensor,
    y: Tensor,
    curvature: str = "ggn",
    split_positions: bool = False,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Columns U of shape (K, N, *S, C) with Σ_k U_k U_kᵀ giving the curvature in output space.

    Args:
        f: detached model outputs (N, *S, C).
        y: targets matching ``f``.
        split_positions: for the exact GGN with shared positions S, give each (position,
            column) pair its own column (R·K columns) so that Λ's block-diagonal structure over
            positions is kept exactly. KFAC uses stacked columns (False).
    """
    if curvature == "ggn":
        V = likelihood.hessian_factor(f, y).movedim(-1, 0)  # (K, N, *S, C)
        R = int(torch.Size(f.shape[1:-1]).numel())
        if not split_positions or R == 1:
            return V
        K, N, C = V.shape[0], f.shape[0], f.shape[-1]
        V = V.reshape(K, N, R, C)
        eye = torch.eye(R, dtype=V.dtype, device=V.device)
        U = eye[:, None, None, :, None] * V[None]  # (R, K, N, R, C)
        return U.reshape(R * K, *f.shape)
    if curvature == "ef":
        return likelihood.gradient(f, y).unsqueeze(0)
    if curvature == "ggn-mc":
        samples = [
            likelihood.gradient(f, likelihood.sample(f, generator)) for _ in range(mc_samples)
        ]
        return torch.stack(samples) / mc_samples**0.5
    raise ValueError(f"unknown curvature {curvature!r}: use one of {CURVATURES}")

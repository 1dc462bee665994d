"""Link approximations: from a Gaussian over logits to class probabilities.

Immer, Korzepa & Bauer, AISTATS 2021 (probit); Hobbhahn, Kristiadi & Hennig, UAI 2022 (Laplace
bridge). Inputs: logit means ``f_mean`` (B, C) and covariances ``f_var`` (B, C, C).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LINKS = ("probit", "bridge", "bridge_norm", "mc")


def probit(f_mean: Tensor, f_var: Tensor, binary: bool = False) -> Tensor:
    """softmax(f / √(1 + π/8 · diag var)) (sigmoid for binary outputs): (B, C)."""
    var = f_var.diagonal(dim1=-2, dim2=-1)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * var)
    return torch.sigmoid(kappa * f_mean) if binary else torch.softmax(kappa * f_mean, -1)


def bridge(f_mean: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """Mean of the Dirichlet matched by the Laplace bridge: (B, C).

    α_c = (1 − 2/C + e^{μ_c} Σ_c' e^{−μ_c'} / C²) / σ²_c with diagonal variances σ²; the normalised
    form first rescales μ and σ² so that the bridge respects the softmax's translation invariance.
    """
    var = f_var.diagonal(dim1=-2, dim2=-1)
    C = f_mean.shape[-1]
    mu = f_mean - f_mean.mean(-1, keepdim=True)  # softmax is invariant to shifts
    if normalize:
        scale = torch.sqrt(var.sum(-1, keepdim=True) / (C / 2))
        mu, var = mu / scale, var / scale**2
    alpha = (1 - 2 / C + mu.exp() * (-mu).exp().sum(-1, keepdim=True) / C**2) / var
    return alpha / alpha.sum(-1, keepdim=True)


def monte_carlo(
    f_mean: Tensor, f_var: Tensor, n_samples: int = 100, binary: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """E[softmax(f)] under f ~ N(f_mean, f_var) by sampling: (B, C)."""
    jitter = 1e-10 * torch.eye(f_mean.shape[-1], dtype=f_var.dtype, device=f_var.device)
    L = torch.linalg.cholesky(f_var + jitter)
    eps = torch.randn(n_samples, *f_mean.shape, 1, generator=generator, dtype=f_mean.dtype,
                      device=f_mean.device)
    f = f_mean + (L @ eps).squeeze(-1)
    return (torch.sigmoid(f) if binary else torch.softmax(f, -1)).mean(0)

"""The GLM (linearised) predictive f(x) ~ N(f(x; θ*), J(x) Σ J(x)ᵀ).

Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via local
linearization", AISTATS 2021. Inputs are processed in chunks so memory stays bounded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.curvature.per_sample import per_sample_column_grads

if TYPE_CHECKING:
    from marglik.posterior import Laplace


def jacobians(la: Laplace, x: Tensor) -> tuple[Tensor, Tensor]:
    """Model outputs f (B, D) and Jacobians J (B, D, P) of the flattened outputs w.r.t. the subset."""
    f = la.model(x)
    B, out_shape = f.shape[0], f.shape[1:]
    D = out_shape.numel()
    U = torch.eye(D, dtype=f.dtype, device=f.device).reshape(D, 1, *out_shape).expand(D, B, *out_shape)
    J = per_sample_column_grads(la.model, la.subset, x, U)  # (D, B, P)
    return f.reshape(B, D), J.transpose(0, 1)


def glm_moments(la: Laplace, x: Tensor, joint: bool = False, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """Mean (B, D) and covariance of the linearised outputs.

    Returns:
        ``joint=False``: per-input covariances (B, D, D); ``joint=True``: the full covariance over
        the batch (B·D, B·D).
    """
    la._require_fit()
    if joint:
        f, J = jacobians(la, x)
        Jf = J.reshape(1, -1, J.shape[-1])
        return f, la.functional_variance(Jf)[0]
    means, covs = [], []
    for start in range(0, x.shape[0], chunk_size):
        f, J = jacobians(la, x[start : start + chunk_size])
        means.append(f)
        covs.append(la.functional_variance(J))
    return torch.cat(means), torch.cat(covs)

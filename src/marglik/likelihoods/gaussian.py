"""Gaussian regression likelihood y ~ N(f, σ²) with σ a scalar or one value per output."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marglik.likelihoods.base import Likelihood


class Gaussian(Likelihood):
    """Homoscedastic Gaussian likelihood p(y | f) = N(y; f, diag(σ²)).

    Args:
        sigma: observation noise σ > 0, a scalar or a tensor of shape (C,).

    The normaliser counts every output element: outputs of shape (N, *S, C) contribute
    N·prod(S)·C·log(σ√(2π)) (docs/architecture.md §4). Λ = diag(1/σ²), so V = diag(1/σ).
    """

    task = "regression"

    def __init__(self, sigma: float | Tensor = 1.0):
        self.sigma = check_sigma(sigma)

    def validate(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f, y = super().validate(f, y)
        if y.shape != f.shape and f.shape == (*y.shape, 1):
            y = y.unsqueeze(-1)
        if y.shape != f.shape:
            raise ValueError(
                f"regression targets of shape {tuple(y.shape)} do not match model outputs of shape "
                f"{tuple(f.shape)}"
            )
        if self.sigma.numel() > 1 and self.sigma.numel() != f.shape[-1]:
            raise ValueError(
                f"sigma has {self.sigma.numel()} values but the model has {f.shape[-1]} outputs"
            )
        return f, y.to(f.dtype)

    def _sigma(self, f: Tensor, sigma: Tensor | None = None) -> Tensor:
        return (self.sigma if sigma is None else sigma).to(f)

    def log_prob(self, f: Tensor, y: Tensor, sigma: Tensor | None = None) -> Tensor:
        f, y = self.validate(f, y)
        s = self._sigma(f, sigma).expand(f.shape[-1:])
        elementwise = -0.5 * ((y - f) / s) ** 2 - torch.log(s * math.sqrt(2 * math.pi))
        return elementwise.reshape(f.shape[0], -1).sum(1)

    def hessian_factor(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        C = f.shape[-1]
        inv = 1 / self._sigma(f).expand(C)
        return torch.diag_embed(inv).expand(*f.shape, C)

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + self._sigma(f) * noise

    def statistics(self, f: Tensor, y: Tensor) -> dict[str, Tensor]:
        f, y = self.validate(f, y)
        residual2 = ((y - f) ** 2).reshape(-1, f.shape[-1])
        count = torch.full_like(residual2[0], residual2.shape[0])
        return {"sse": residual2.sum(0), "count": count}

    def log_lik_from_statistics(
        self, stats: dict[str, Tensor], sigma: Tensor | None = None
    ) -> Tensor:
        s = (self.sigma if sigma is None else sigma).to(stats["sse"])
        return (
            -0.5 * stats["sse"] / s**2 - stats["count"] * torch.log(s * math.sqrt(2 * math.pi))
        ).sum()


def check_sigma(sigma: float | Tensor) -> Tensor:
    """Return σ as a tensor, raising ValueError if it is not positive and finite.

    A Python number becomes a float64 tensor (exact for every float), which the posterior
    casts to its curvature's dtype where it computes: a float64 model keeps σ to rounding
    whatever torch's default dtype is.
    """
    sigma = torch.as_tensor(sigma, dtype=None if torch.is_tensor(sigma) else torch.float64)
    if sigma.ndim > 1 or not torch.isfinite(sigma).all() or (sigma <= 0).any():
        raise ValueError(f"sigma_noise must be a positive finite scalar or vector, got {sigma}")
    return sigma

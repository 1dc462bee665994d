"""Categorical (softmax) classification likelihood."""

from __future__ import annotations

import torch
from torch import Tensor

from marglik.likelihoods.base import Likelihood


class Categorical(Likelihood):
    """p(y | f) = softmax(f)_y over the last output dimension; any leading dims (N, *S, C).

    Λ = diag(p) − p pᵀ, factorised as V = diag(√p) − p √pᵀ (then V Vᵀ = Λ since Σ p = 1).
    """

    task = "classification"

    def validate(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f, y = super().validate(f, y)
        if y.shape != f.shape[:-1]:
            raise ValueError(
                f"class targets of shape {tuple(y.shape)} do not match model outputs of shape "
                f"{tuple(f.shape)}: expected targets of shape {tuple(f.shape[:-1])}"
            )
        if y.is_floating_point():
            if (y != y.round()).any():
                raise ValueError("class targets must be integers")
            y = y.long()
        if y.numel() and (y.min() < 0 or y.max() >= f.shape[-1]):
            raise ValueError(
                f"class targets must lie in [0, {f.shape[-1] - 1}], got values in "
                f"[{int(y.min())}, {int(y.max())}]"
            )
        return f, y

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.validate(f, y)
        logp = torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return logp.reshape(f.shape[0], -1).sum(1)

    def hessian_factor(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        p = torch.softmax(f, -1)
        sqrt_p = p.sqrt()
        return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.validate(f, y)
        return torch.softmax(f, -1) - torch.nn.functional.one_hot(y, f.shape[-1]).to(f)

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p = torch.softmax(f, -1).reshape(-1, f.shape[-1])
        return torch.multinomial(p, 1, generator=generator).reshape(f.shape[:-1])

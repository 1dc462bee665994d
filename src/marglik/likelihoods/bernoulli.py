"""Bernoulli likelihood for binary and multi-label classification with logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marglik.likelihoods.base import Likelihood


class Bernoulli(Likelihood):
    """Independent p(y_c = 1 | f) = sigmoid(f_c) per output element, outputs (N, *S, C).

    Λ = diag(p(1−p)), V = diag(√(p(1−p))).
    """

    task = "binary"

    def validate(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f, y = super().validate(f, y)
        if y.shape != f.shape and f.shape == (*y.shape, 1):
            y = y.unsqueeze(-1)
        if y.shape != f.shape:
            raise ValueError(
                f"binary targets of shape {tuple(y.shape)} do not match model outputs of shape "
                f"{tuple(f.shape)}"
            )
        if ((y != 0) & (y != 1)).any():
            raise ValueError("binary targets must be 0 or 1")
        return f, y.to(f.dtype)

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.validate(f, y)
        ll = -F.binary_cross_entropy_with_logits(f, y, reduction="none")
        return ll.reshape(f.shape[0], -1).sum(1)

    def hessian_factor(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        p = torch.sigmoid(f)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.validate(f, y)
        return torch.sigmoid(f) - y

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(f), generator=generator)

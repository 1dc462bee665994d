"""The likelihood interface: log p(y | f), its output Hessian Λ(f) and a factorisation Λ = V Vᵀ.

Shapes: network outputs ``f`` are ``(N, *S, C)`` — N samples, optional shared positions ``S``
(tokens, pixels) and C outputs per position, channels last: a convolutional model whose outputs
are (N, C, H, W) should move channels to the end for per-pixel likelihoods. Λ acts on the last
dimension, one C×C matrix per (sample, position). The curvature engine only needs
:meth:`Likelihood.hessian_factor`, :meth:`Likelihood.gradient` and :meth:`Likelihood.sample`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Likelihood(ABC):
    """Base class of observation models p(y | f) on network outputs ``f`` of shape (N, *S, C)."""

    #: the task name used by predictives and reports ("regression", "classification", ...)
    task: str = "custom"

    # ---- what every likelihood provides -------------------------------------------------------
    @abstractmethod
    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """Log-likelihood per sample, summed over positions and outputs: (N,)."""

    def validate(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Check shapes and values of outputs ``f`` and targets ``y``; return them (``y`` reshaped).

        Raises:
            ValueError: on mismatched shapes or non-finite values.
        """
        if not torch.isfinite(f).all():
            raise ValueError(
                f"model outputs contain {int((~torch.isfinite(f)).sum())} NaN/inf values"
            )
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError(f"targets contain {int((~torch.isfinite(y)).sum())} NaN/inf values")
        return f, y

    def hessian(self, f: Tensor, y: Tensor) -> Tensor:
        """Output Hessian Λ = −∂²log p(y|f)/∂f² per position: (N, *S, C, C)."""
        V = self.hessian_factor(f, y)
        return V @ V.transpose(-1, -2)

    @abstractmethod
    def hessian_factor(self, f: Tensor, y: Tensor) -> Tensor:
        """A factor V with Λ = V Vᵀ per position: (N, *S, C, K)."""

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Gradient of the negative log-likelihood w.r.t. the outputs: (N, *S, C)."""
        with torch.enable_grad():
            f = f.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(-self.log_prob(f, y).sum(), f)
        return g

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw targets y ~ p(y | f) (used by the Monte Carlo GGN)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot sample targets; use curvature='ggn' or 'ef'"
        )

    # ---- what the evidence needs ---------------------------------------------------------------
    def statistics(self, f: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Sufficient statistics of the data fit, summable over batches and ranks."""
        return {"log_lik": self.log_prob(f, y).sum()}

    def log_lik_from_statistics(
        self, stats: dict[str, Tensor], sigma: Tensor | None = None
    ) -> Tensor:
        """Total log-likelihood of the training data from :meth:`statistics` (0-d)."""
        if sigma is not None:
            raise ValueError(
                f"sigma_noise only applies to regression: {type(self).__name__} has no noise"
            )
        return stats["log_lik"]


def positions(f: Tensor) -> int:
    """Number of shared positions R = prod(S) of outputs f (N, *S, C)."""
    return int(torch.Size(f.shape[1:-1]).numel())

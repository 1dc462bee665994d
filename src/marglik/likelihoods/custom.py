"""A likelihood given only as a log-density; its output Hessian comes from autograd."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from marglik.likelihoods.base import Likelihood


class Custom(Likelihood):
    """Wrap ``log_prob_fn(f, y) -> Tensor`` (per-sample (N,) or any shape summing to it).

    Λ(f, y) = −∂²log p/∂f² per position is computed with ``torch.func`` and factorised by an
    eigendecomposition; negative eigenvalues (non-log-concave likelihoods) are clipped at 0 so the
    GGN stays positive semi-definite.
    """

    def __init__(self, log_prob_fn: Callable[[Tensor, Tensor], Tensor], task: str = "custom"):
        self.log_prob_fn = log_prob_fn
        self.task = task

    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        f, y = self.validate(f, y)
        ll = self.log_prob_fn(f, y)
        return ll.reshape(f.shape[0], -1).sum(1) if ll.ndim else ll.reshape(1)

    def hessian(self, f: Tensor, y: Tensor) -> Tensor:
        C = f.shape[-1]
        lead = f.shape[:-1]
        if y.shape[: len(lead)] != lead:
            raise ValueError(f"targets {tuple(y.shape)} do not match outputs {tuple(f.shape)}")
        f_flat, y_flat = f.reshape(-1, C), y.reshape(lead.numel(), *y.shape[len(lead) :])

        def nll_single(fi: Tensor, yi: Tensor) -> Tensor:
            return -self.log_prob_fn(fi.unsqueeze(0), yi.unsqueeze(0)).sum()

        H = torch.func.vmap(torch.func.hessian(nll_single))(f_flat, y_flat)
        return H.reshape(*f.shape, C)

    def hessian_factor(self, f: Tensor, y: Tensor) -> Tensor:
        evals, evecs = torch.linalg.eigh(self.hessian(f, y))
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)

"""Multi-head self-attention with softmax rows or Dirichlet-distributed rows.

Both modules share the projections and masks and differ only in how a row of logits
s = q kᵀ/√d_h becomes attention weights: :class:`SoftmaxAttention` takes softmax(s);
:class:`DirichletAttention` (Cinquin, Immer, Horn & Fortuin, "Pathologies in priors and inference
for Bayesian transformers", AABI 2022, arXiv 2110.04020) makes every row a random variable
w ~ Dir(α), α = link(s) + floor, sampled with implicit reparameterisation gradients, with a
Dirichlet prior Dir(β·1) and the KL of each row kept for the ELBO (:mod:`.elbo`).

Masks: ``padding_mask`` (N, L), True at padded tokens (torch's ``key_padding_mask`` convention),
removes those keys from every row; ``causal=True`` removes keys after the query. Masked keys get
weight exactly zero, the Dirichlet lives on the remaining positions of each row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from marglik.errors import MarglikError
from marglik.variational.attention.dirichlet import (
    concentration,
    dirichlet_kl,
    masked_mean,
    masked_rsample,
)

__all__ = ["DirichletAttention", "SelfAttention", "SoftmaxAttention", "allowed_keys"]


def allowed_keys(padding_mask: Tensor | None, n: int, length: int, causal: bool,
                 device: torch.device | None = None) -> Tensor:
    """Which keys each query may attend to, shape ``(N, 1, L, L)`` (broadcast over heads).

    Args:
        padding_mask: ``(N, L)`` bool, True at padded tokens, or None.
        n, length: batch size N and sequence length L.
        causal: also forbid keys after the query.

    Every row keeps at least one key (a padded query with none left attends to itself).
    """
    allowed = torch.ones(n, 1, length, length, dtype=torch.bool, device=device)
    if padding_mask is not None:
        if padding_mask.shape != (n, length) or padding_mask.dtype != torch.bool:
            raise MarglikError(
                f"padding_mask must be a bool tensor of shape {(n, length)}, got "
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        # a data-dependent check, skipped under torch.func transforms (vmap cannot run it)
        if not torch._C._are_functorch_transforms_active() and bool(padding_mask.all(-1).any()):
            raise MarglikError("padding_mask pads every token of a sequence: nothing to attend to")
        allowed = allowed & ~padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        # a real query sees itself; a padded query left with no key (left padding) attends to
        # itself, so no row is empty and no NaN reaches the values (its output is ignored)
        eye = torch.eye(length, dtype=torch.bool, device=device)
        allowed = allowed | (~allowed.any(-1, keepdim=True) & eye)
    return allowed


class SelfAttention(nn.Module):
    """Multi-head self-attention y = Σ_h W_o,h (A_h V_h), A_h the attention rows of head h.

    Subclasses define :meth:`weights` (logits and mask → rows). The four projections are
    ``nn.Linear`` layers applied at every token, so the curvature engine records them as
    Kronecker-factored layers.

    Args:
        dim: model width E (divisible by ``heads``).
        heads: number of heads H.
        causal: forbid attention to later tokens.
        dropout: dropout probability on the attention rows (the MC-dropout variant).
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise MarglikError(f"dim ({dim}) must be a positive multiple of heads ({heads})")
        self.dim, self.heads, self.causal = int(dim), int(heads), bool(causal)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.dropout = nn.Dropout(dropout)
        self.last_weights: Tensor | None = None

    def weights(self, logits: Tensor, allowed: Tensor, query_valid: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Attend within each sequence.

        Args:
            x: ``(N, L, E)`` token features.
            padding_mask: ``(N, L)`` bool, True at padded tokens, or None.

        Returns:
            ``(N, L, E)``; rows of padded queries are computed but carry no meaning.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise MarglikError(f"x must have shape (N, L, {self.dim}), got {tuple(x.shape)}")
        n, length, _ = x.shape
        dh = self.dim // self.heads

        def split(t: Tensor) -> Tensor:  # (N, L, E) -> (N, H, L, E/H)
            return t.view(n, length, self.heads, dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (N, H, L, L)
        allowed = allowed_keys(padding_mask, n, length, self.causal, x.device)
        query_valid = (torch.ones(n, length, dtype=torch.bool, device=x.device)
                       if padding_mask is None else ~padding_mask)
        w = self.weights(logits, allowed, query_valid)
        self.last_weights = w.detach()
        y = self.dropout(w) @ v  # (N, H, L, E/H)
        return self.out(y.transpose(1, 2).reshape(n, length, self.dim))


class SoftmaxAttention(SelfAttention):
    """Standard attention: each row softmax(s) over the allowed keys."""

    def weights(self, logits: Tensor, allowed: Tensor, query_valid: Tensor) -> Tensor:
        return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


class DirichletAttention(SelfAttention):
    """Attention rows w ~ Dir(α), α = link(s) + floor, with a symmetric Dirichlet prior.

    In training mode, or when :attr:`sample` is True, every forward draws one reparameterised
    sample of every row (normalised Gammas, implicit gradients); otherwise the rows are their
    mean α/α0. Each forward stores :attr:`kl`, shape ``(N,)``: Σ over heads and non-padded queries
    of KL(Dir(α_row) ‖ Dir(β·1)) over the row's allowed keys, for the ELBO.

    Args:
        dim, heads, causal, dropout: as :class:`SelfAttention`.
        prior_concentration: β > 0 of the prior Dir(β·1) (β = 1: uniform on each row's simplex);
            kept as a buffer (a tensor, differentiable if set to one with ``requires_grad``).
        link: ``"softplus"`` (default) or ``"exp"`` (:func:`~.dirichlet.concentration`).
        floor: lower bound on α.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, dropout: float = 0.0,
                 prior_concentration: float = 1.0, link: str = "softplus", floor: float = 1e-2):
        super().__init__(dim, heads, causal, dropout)
        if not prior_concentration > 0:
            raise MarglikError(f"prior_concentration must be positive, got {prior_concentration}")
        concentration(torch.zeros(1), link, floor)  # checks link and floor now
        self.link, self.floor = link, float(floor)
        self.register_buffer("prior_concentration", torch.tensor(float(prior_concentration)))
        self.sample = False
        self.kl: Tensor | None = None

    def weights(self, logits: Tensor, allowed: Tensor, query_valid: Tensor) -> Tensor:
        alpha = concentration(logits, self.link, self.floor)
        beta = self.prior_concentration.to(alpha.dtype)
        kl_rows = dirichlet_kl(alpha, beta, allowed)  # (N, H, L)
        self.kl = (kl_rows * query_valid[:, None, :].to(kl_rows.dtype)).sum((1, 2))
        if self.training or self.sample:
            return masked_rsample(alpha, allowed)
        return masked_mean(alpha, allowed)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, causal={self.causal}, link={self.link!r}, "
                f"floor={self.floor}, prior_concentration={float(self.prior_concentration)}")

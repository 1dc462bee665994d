"""Dirichlet attention rows: the concentration link, masked sampling and the masked KL.

An attention row over K key positions, some of them masked, is a Dirichlet random variable over
the *allowed* positions only; masked positions carry weight exactly zero. Every function here takes
``allowed``, a boolean tensor broadcastable to the row tensors' shape ``(..., K)`` (True: the
query may attend to that key), and treats each row as a Dirichlet of dimension
``allowed.sum(-1)``, so rows of different lengths are handled in one vectorised call.

Sampling is by normalised Gammas: if g_i ~ Gamma(α_i, 1) independently, then
w = g / Σ_i g_i ~ Dir(α). Setting g_i = 0 at masked positions gives the Dirichlet over the allowed
positions exactly. ``torch._standard_gamma`` carries implicit reparameterisation gradients
(Figurnov, Mohamed & Mnih, NeurIPS 2018): ∂g/∂α = −(∂F(g; α)/∂α) / p(g; α) with F the Gamma CDF,
which is what ``torch.distributions.Dirichlet.rsample`` uses too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marglik.errors import MarglikError

__all__ = ["LINKS", "concentration", "dirichlet_kl", "masked_mean", "masked_rsample"]

LINKS = ("softplus", "exp")


def concentration(logits: Tensor, link: str = "softplus", floor: float = 1e-2) -> Tensor:
    """The Dirichlet concentration α of attention rows from their logits.

    ``"softplus"``: α = softplus(s) + floor; ``"exp"``: α = exp(min(s, 30)) + floor, whose mean
    α/α0 is softmax(s) when the floor is negligible, so its mean attention is softmax attention.

    Args:
        logits: attention logits s = q kᵀ/√d, shape ``(..., K)``.
        link: ``"softplus"`` or ``"exp"``.
        floor: positive lower bound on α (keeps Gamma samples away from underflow).

    Returns:
        α, the shape of ``logits``, every entry ≥ ``floor``.
    """
    if link not in LINKS:
        raise MarglikError(f"unknown concentration link {link!r}: use one of {LINKS}")
    if not floor > 0:
        raise MarglikError(f"the concentration floor must be positive, got {floor}")
    raw = F.softplus(logits) if link == "softplus" else torch.exp(logits.clamp(max=30.0))
    return raw + floor


def _check_rows(alpha: Tensor, allowed: Tensor) -> Tensor:
    if allowed.dtype != torch.bool:
        raise MarglikError(f"allowed must be a boolean mask, got dtype {allowed.dtype}")
    try:
        return allowed.expand_as(alpha)
    except RuntimeError:
        raise MarglikError(
            f"allowed of shape {tuple(allowed.shape)} does not broadcast to the rows' shape "
            f"{tuple(alpha.shape)}"
        ) from None


def _standard_gamma(alpha: Tensor) -> Tensor:
    """Gamma(α, 1) samples with implicit gradients (one name, so tests can fix the noise)."""
    return torch._standard_gamma(alpha)


def masked_rsample(alpha: Tensor, allowed: Tensor) -> Tensor:
    """One reparameterised sample of every row w ~ Dir(α restricted to the allowed positions).

    Args:
        alpha: positive concentrations, shape ``(..., K)`` (values at masked positions ignored).
        allowed: boolean mask broadcastable to ``(..., K)``; every row needs one True.

    Returns:
        w, shape ``(..., K)``: rows sum to one, zeros at masked positions; differentiable in α
        through the implicit Gamma gradients.
    """
    allowed = _check_rows(alpha, allowed)
    safe = torch.where(allowed, alpha, torch.ones_like(alpha))
    # as torch.distributions.Gamma: a sample that underflowed to 0 becomes the smallest normal
    g = _standard_gamma(safe).clamp(min=torch.finfo(alpha.dtype).tiny)
    g = torch.where(allowed, g, torch.zeros_like(g))
    total = g.sum(-1, keepdim=True)
    return g / torch.where(total > 0, total, torch.ones_like(total))


def masked_mean(alpha: Tensor, allowed: Tensor) -> Tensor:
    """The mean E[w] = α/α0 of each row over its allowed positions (zeros where masked).

    Shapes as :func:`masked_rsample`.
    """
    allowed = _check_rows(alpha, allowed)
    a = torch.where(allowed, alpha, torch.zeros_like(alpha))
    total = a.sum(-1, keepdim=True)
    return a / torch.where(total > 0, total, torch.ones_like(total))


def dirichlet_kl(alpha: Tensor, beta: Tensor, allowed: Tensor) -> Tensor:
    """KL(Dir(α) ‖ Dir(β)) of every row, both restricted to its allowed positions.

    KL = ln Γ(α0) − ln Γ(β0) + Σ_i [ln Γ(β_i) − ln Γ(α_i) + (α_i − β_i)(ψ(α_i) − ψ(α0))], the sums
    and α0 = Σ_i α_i, β0 = Σ_i β_i over the allowed positions i only (the standard closed form,
    e.g. ``torch.distributions.kl_divergence`` for two Dirichlets). A row with no allowed position
    has KL 0.

    Args:
        alpha: posterior concentrations, shape ``(..., K)``.
        beta: prior concentrations, broadcastable to ``(..., K)`` (a 0-d tensor: the symmetric
            prior Dir(β·1) over the allowed positions).
        allowed: boolean mask broadcastable to ``(..., K)``.

    Returns:
        KL per row, shape ``(...)``; differentiable in α and β.
    """
    allowed = _check_rows(alpha, allowed)
    beta = torch.as_tensor(beta, dtype=alpha.dtype, device=alpha.device).expand_as(alpha)
    one = torch.ones_like(alpha)
    a, b = torch.where(allowed, alpha, one), torch.where(allowed, beta, one)
    m = allowed.to(alpha.dtype)
    has_any = allowed.any(-1)
    a0 = torch.where(has_any, (a * m).sum(-1), torch.ones_like(has_any, dtype=alpha.dtype))
    b0 = torch.where(has_any, (b * m).sum(-1), torch.ones_like(has_any, dtype=alpha.dtype))
    psi = torch.digamma(a) - torch.digamma(a0)[..., None]
    terms = torch.lgamma(b) - torch.lgamma(a) + (a - b) * psi
    kl = torch.lgamma(a0) - torch.lgamma(b0) + (terms * m).sum(-1)
    return torch.where(has_any, kl, torch.zeros_like(kl))

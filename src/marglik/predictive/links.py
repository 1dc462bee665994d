"""Link approximations: from a Gaussian over logits to class probabilities.

Inputs are logit means ``f_mean`` (..., C) and covariances ``f_var`` (..., C, C) with any
leading batch dimensions; outputs are probabilities (..., C).

- probit: MacKay's approximation of E[softmax(f)] by softmax(μ / √(1 + π/8 · diag Σ)) (for
  softmax outputs its multi-class extension, as in Immer, Korzepa & Bauer, AISTATS 2021);
- Laplace bridge: the Dirichlet whose Laplace approximation in the softmax basis matches the
  Gaussian (Hobbhahn, Kristiadi & Hennig, UAI 2022; MacKay 1998), optionally with the authors'
  variance normalisation;
- Monte Carlo: E[softmax(f)] by sampling f ~ N(μ, Σ).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LINKS = ("probit", "bridge", "bridge_norm", "mc")


def probit(f_mean: Tensor, f_var: Tensor, binary: bool = False) -> Tensor:
    """Probit approximation: softmax(μ / √(1 + π/8 · diag Σ)) (sigmoid per output if ``binary``).

    For softmax outputs the Gaussian is first reduced to the centred logits N(Pμ, PΣP),
    P = I − 11ᵀ/C (:func:`project_to_zero_sum`): softmax is invariant to adding a constant to
    every logit, so variance along 1 does not change the prediction, but the plain probit
    would read it as uncertainty in every class. Measured on sklearn digits (MLP 64-32-32-10,
    evidence-tuned layer-wise prior, 540 test points): last-layer KFAC test NLL 0.269 → 0.136
    (Monte Carlo with 1,000 samples: 0.133), all-weights KFAC 0.431 → 0.298 (MC 0.315).

    Args:
        f_mean: logit means (..., C).
        f_var: logit covariances (..., C, C); only the diagonal is used.
        binary: independent sigmoids (Bernoulli outputs) instead of one softmax.

    Returns:
        probabilities (..., C).
    """
    if not binary:  # softmax(f) = softmax(Pf): drop the common-mode variance first
        f_mean, f_var = project_to_zero_sum(f_mean, f_var)
    var = f_var.diagonal(dim1=-2, dim2=-1)
    kappa = torch.rsqrt(1 + math.pi / 8 * var)
    return torch.sigmoid(kappa * f_mean) if binary else torch.softmax(kappa * f_mean, -1)


def project_to_zero_sum(f_mean: Tensor, f_var: Tensor) -> tuple[Tensor, Tensor]:
    """The Gaussian of the centred logits P f, P = I − 11ᵀ/C: N(P μ, P Σ P).

    softmax(f) = softmax(P f), and P f is exactly MacKay's softmax-basis variable
    log π − mean(log π) that the Laplace bridge is derived in, so this reduction loses nothing
    (unlike conditioning on 1ᵀf = 0, which is not invariant to adding a constant to all logits).

    Args:
        f_mean: (..., C); f_var: (..., C, C).
    """
    return f_mean - f_mean.mean(-1, keepdim=True), centre_covariance(f_var)


def zero_sum_basis(C: int, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> Tensor:
    """An orthonormal basis V (C, C − 1) of the zero-sum logits 1⊥: V Vᵀ = P = I − 11ᵀ/C.

    The covariance of the centred logits is P Σ P = V (Vᵀ Σ V) Vᵀ, so a GLM predictive for
    softmax outputs needs the C − 1 output columns Vᵀ J only (:func:`centre_covariance`).
    """
    if C < 2:
        raise ValueError(f"a zero-sum basis needs at least two classes, got C = {C}")
    P = torch.eye(C, dtype=dtype, device=device) - 1 / C
    return torch.linalg.qr(P[:, : C - 1])[0]


def centre_covariance(f_var: Tensor) -> Tensor:
    """P Σ P (..., C, C) for covariances Σ (..., C, C), P = I − 11ᵀ/C."""
    row = f_var.mean(-1, keepdim=True)
    return f_var - row - row.mT + f_var.mean((-2, -1), keepdim=True)


def bridge_log_alpha(f_mean: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """log α of the Dirichlet that the Laplace bridge matches to N(f_mean, f_var): (..., C).

    Hobbhahn, Kristiadi & Hennig, "Fast predictive uncertainty for classification with Bayesian
    deep networks", UAI 2022 (inverting MacKay's Laplace approximation of a Dirichlet in the
    softmax basis). For the centred Gaussian N(P μ, P Σ P) (:func:`project_to_zero_sum`), with
    σ²_k its diagonal variances,

        α_k = (1 − 2/C + e^{μ_k} Σ_l e^{−μ_l} / C²) / σ²_k.

    The map is an exact inverse: for the Laplace approximation N(μ, Σ) of Dir(α) it returns α,
    and it is invariant to adding a constant to all logits, as E[softmax(f)] is. With
    ``normalize=True`` (the authors' correction, ``bridge_norm``, as in their implementation in
    laplace-torch) μ and σ² are first rescaled by c = mean_k σ²_k / √(C/2): μ ← μ/√c,
    σ² ← σ²/c, which makes the result invariant to (μ, Σ) → (√k μ, k Σ).

    Computed in log space, so tiny variances (α → ∞) stay finite.
    """
    C = f_mean.shape[-1]
    if C < 2:
        raise ValueError("the Laplace bridge needs at least two classes")
    mu, var = project_to_zero_sum(f_mean, f_var)
    var = var.diagonal(dim1=-2, dim2=-1)
    tiny = torch.finfo(var.dtype).tiny
    if normalize:
        c = (var.mean(-1, keepdim=True) / math.sqrt(C / 2)).clamp_min(tiny)
        mu, var = mu / c.sqrt(), var / c
    # e^{μ_k} Σ_l e^{−μ_l} / C² = exp(t_k), t_k = μ_k + logsumexp(−μ) − 2 log C
    t = mu + torch.logsumexp(-mu, -1, keepdim=True) - 2 * math.log(C)
    const = torch.full_like(t, math.log(1 - 2 / C) if C > 2 else -math.inf)
    return torch.logaddexp(const, t) - var.clamp_min(tiny).log()


def bridge(f_mean: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """Mean α / Σα of the Laplace-bridge Dirichlet (see :func:`bridge_log_alpha`): (..., C)."""
    return torch.softmax(bridge_log_alpha(f_mean, f_var, normalize), -1)


def monte_carlo(
    f_mean: Tensor,
    f_var: Tensor,
    n_samples: int = 100,
    binary: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """E[softmax(f)] (or E[sigmoid(f)] per output) under f ~ N(f_mean, f_var), by sampling.

    Softmax: f = μ + L ε with L the Cholesky factor of Σ plus a jitter of machine-epsilon size
    (an eigendecomposition square root where that fails, e.g. for singular Σ). Binary: each
    output only depends on its marginal variance.

    Args:
        f_mean: (..., C); f_var: (..., C, C); n_samples: S.

    Returns:
        probabilities (..., C).
    """
    shape = (n_samples, *f_mean.shape)
    eps = torch.randn(shape, generator=generator, dtype=f_mean.dtype, device=f_mean.device)
    if binary:
        std = f_var.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        return torch.sigmoid(f_mean + std * eps).mean(0)
    root = _sqrt_psd(f_var)
    f = f_mean + (root @ eps.unsqueeze(-1)).squeeze(-1)
    return torch.softmax(f, -1).mean(0)


def _sqrt_psd(cov: Tensor) -> Tensor:
    """A factor L with L Lᵀ ≈ cov for PSD (..., C, C) matrices (Cholesky, else eigh)."""
    C = cov.shape[-1]
    cov = 0.5 * (cov + cov.mT)
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(cov.dtype).tiny)
    eye = torch.eye(C, dtype=cov.dtype, device=cov.device)
    jitter = (torch.finfo(cov.dtype).eps * C * scale)[..., None, None] * eye
    L, info = torch.linalg.cholesky_ex(cov + jitter)
    if not bool((info != 0).any()):
        return L
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)

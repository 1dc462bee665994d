"""Output-space columns U_k whose backpropagation gives the curvature: Σ_k J_nᵀ U_k,n U_k,nᵀ J_n.

Every column costs one backward pass of the batch through the network
(:func:`~marglik.curvature.backprop.backprop_columns`), and the Kronecker factor G of every layer
is a sum over them, so the number of columns K sets the cost of a fit:

- ``"ggn"`` (exact GGN): the columns of a factor V of the output Hessian, Λ = V Vᵀ. Where a
  closed form of smaller rank exists it is used (:data:`LOW_RANK_FACTORS`): the softmax Hessian
  Λ = diag(p) − p pᵀ has rank C − 1 (Λ·1 = 0), so C − 1 columns suffice
  (:func:`softmax_factor`); otherwise the likelihood's own ``hessian_factor`` (K = C).
- ``"ef"`` (empirical Fisher): the gradient of the negative log-likelihood, one column.
- ``"ggn-mc"`` (Monte Carlo Fisher, Martens & Grosse, ICML 2015): m = ``mc_samples`` columns
  g_j = ∇_f −log p(ŷ_j | f) at targets ŷ_j ~ p(y | f) drawn from the model, scaled by 1/√m.
  E[g gᵀ] is the Fisher, which equals the GGN's Λ for the likelihoods here (natural-parameter
  exponential families, and J_hᵀ Λ_η J_h for a reparametrised head): unbiased.
- ``"ggn-sampled"`` (sampled columns of V): m columns u_j = V ξ_j / √m with Rademacher
  ξ_j ∈ {±1}^K, independent per input, position and column. E[ξ ξᵀ] = I, so E[u uᵀ] = V Vᵀ = Λ
  exactly for *every* likelihood with a ``hessian_factor`` (no sampling of targets needed), and
  positions need no splitting (cross-position terms vanish in expectation).

Variance (one input, one column, m = 1; for m columns divide by m, and sum over independent
inputs): for a direction w in output space, with z = Vᵀw,

- ``"ggn-sampled"``: Var[(wᵀu)²] = 2 (‖z‖⁴ − Σ_k z_k⁴) ≤ 2 (wᵀΛw)²; entrywise
  Var[(u uᵀ)_ij] = Λ_ii Λ_jj + Λ_ij² − 2 Σ_k V_ik² V_jk²;
- ``"ggn-mc"``: Var[(wᵀg)²] = E[(wᵀg)⁴] − (wᵀΛw)², for the softmax g = p − e_ŷ:
  Σ_y p_y (wᵀp − w_y)⁴ − (wᵀΛw)², which is large relative to (wᵀΛw)² for classes of small
  probability (a class of probability q contributes about q·w_c⁴ against (q·w_c²)²), where
  ``"ggn-sampled"`` stays within a factor 2.

The curvature H = Σ_n J_nᵀ Λ̂_n J_n then has Var[vᵀHv] = Σ_n Var[(w_nᵀu_n)²] with w_n = J_n v;
a KFAC factor G = Σ b bᵀ inherits the same per-input variances.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from marglik.likelihoods import Likelihood
from marglik.likelihoods.categorical import Categorical

CURVATURES = ("ggn", "ef", "ggn-mc", "ggn-sampled")


def softmax_factor(likelihood: Likelihood, f: Tensor, y: Tensor | None = None) -> Tensor:
    """A factor V (…, C, C − 1) of the softmax Hessian Λ = diag(p) − p pᵀ: V Vᵀ = Λ.

    With q = √p (a unit vector) Λ = diag(q) (I − q qᵀ) diag(q). The Householder reflection
    H = I − v vᵀ / (1 − q_j), v = q − e_j, j = argmax p, maps e_j to q, so
    I − q qᵀ = H (I − e_j e_jᵀ) H = Σ_{c≠j} h_c h_cᵀ and V = diag(q) H without column j.
    1 − q_j is computed as Σ_{c≠j} p_c / (1 + q_j) (no cancellation); where p is one-hot, Λ = 0
    and so is V.

    Args:
        f: logits (N, *S, C), C ≥ 2.

    Returns:
        V of shape (N, *S, C, C − 1).
    """
    p = torch.softmax(f, -1)
    q = p.sqrt()
    C = p.shape[-1]
    j = p.argmax(-1, keepdim=True)  # (…, 1)
    at_j = torch.nn.functional.one_hot(j[..., 0], C).bool()
    q_j = q.gather(-1, j)
    rest = p.masked_fill(at_j, 0).sum(-1, keepdim=True)  # Σ_{c≠j} p_c = (1 − q_j)(1 + q_j)
    scale = torch.where(rest > 0, (1 + q_j) / rest.clamp_min(torch.finfo(p.dtype).tiny), 0.0)
    v = torch.where(at_j, q - 1, q)  # q − e_j
    idx = torch.arange(C - 1, device=f.device).expand(*p.shape[:-1], C - 1)
    idx = idx + (idx >= j).long()  # the columns c ≠ j
    eye_cols = torch.nn.functional.one_hot(idx, C).to(p).transpose(-1, -2)  # (…, C, C − 1)
    H_cols = eye_cols - (scale * v).unsqueeze(-1) * v.gather(-1, idx).unsqueeze(-2)
    return q.unsqueeze(-1) * H_cols


#: likelihood type (exactly, not subclasses, which may change Λ) -> closed-form factor of Λ with
#: fewer columns than the likelihood's own ``hessian_factor``
LOW_RANK_FACTORS: dict[type, Callable[[Likelihood, Tensor, Tensor], Tensor]] = {
    Categorical: softmax_factor,
}


def hessian_factor(likelihood: Likelihood, f: Tensor, y: Tensor) -> Tensor:
    """The factor V (N, *S, C, K) of Λ with the fewest columns available (K ≤ C)."""
    closed_form = LOW_RANK_FACTORS.get(type(likelihood))
    if closed_form is not None and f.shape[-1] >= 2:
        return closed_form(likelihood, f, y)
    return likelihood.hessian_factor(f, y)


def output_columns(
    likelihood: Likelihood,
    f: Tensor,
    y: Tensor,
    curvature: str = "ggn",
    split_positions: bool = False,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Columns U of shape (K, N, *S, C) with Σ_k U_k U_kᵀ giving the curvature in output space.

    Args:
        f: detached model outputs (N, *S, C).
        y: targets matching ``f``.
        split_positions: for the exact GGN with shared positions S, give each (position,
            column) pair its own column (R·K columns) so that Λ's block-diagonal structure over
            positions is kept exactly. KFAC uses stacked columns (False). The sampled
            curvatures need no split (independent draws per position).
        mc_samples: m, the number of columns of ``"ggn-mc"`` and ``"ggn-sampled"``.
        generator: random numbers of ``"ggn-mc"`` and ``"ggn-sampled"``.
    """
    if curvature == "ggn":
        V = hessian_factor(likelihood, f, y).movedim(-1, 0)  # (K, N, *S, C)
        R = int(torch.Size(f.shape[1:-1]).numel())
        if not split_positions or R == 1:
            return V
        K, N, C = V.shape[0], f.shape[0], f.shape[-1]
        V = V.reshape(K, N, R, C)
        eye = torch.eye(R, dtype=V.dtype, device=V.device)
        U = eye[:, None, None, :, None] * V[None]  # (R, K, N, R, C)
        return U.reshape(R * K, *f.shape)
    if curvature == "ef":
        return likelihood.gradient(f, y).unsqueeze(0)
    if curvature == "ggn-mc":
        return mc_fisher_columns(likelihood, f, mc_samples, generator)
    if curvature == "ggn-sampled":
        return sampled_columns(likelihood, f, y, mc_samples, generator)
    raise ValueError(f"unknown curvature {curvature!r}: use one of {CURVATURES}")


def mc_fisher_columns(
    likelihood: Likelihood, f: Tensor, m: int, generator: torch.Generator | None = None
) -> Tensor:
    """m gradients at sampled targets, g_j / √m with ŷ_j ~ p(y | f): (m, N, *S, C).

    All m draws are one batch of m·N inputs (no loop over samples).
    """
    fm = f.repeat(m, *([1] * (f.dim() - 1)))  # (m·N, *S, C)
    g = likelihood.gradient(fm, likelihood.sample(fm, generator))
    return g.reshape(m, *f.shape) / m**0.5


def sampled_columns(
    likelihood: Likelihood,
    f: Tensor,
    y: Tensor,
    m: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """m Rademacher combinations of the columns of V, V ξ_j / √m: (m, N, *S, C).

    E[V ξ ξᵀ Vᵀ] = V Vᵀ = Λ for any factor V. The product V ξ comes from a closed form where
    one is registered (:data:`FACTOR_PRODUCTS`: the softmax's C-column factor), else from the
    smallest factor (:func:`hessian_factor`).
    """
    closed_form = FACTOR_PRODUCTS.get(type(likelihood))
    V = None if closed_form is not None else hessian_factor(likelihood, f, y)  # (N, *S, C, K)
    K = f.shape[-1] if V is None else V.shape[-1]
    device = generator.device if generator is not None else f.device
    signs = torch.randint(0, 2, (m, *f.shape[:-1], K), generator=generator, device=device)
    xi = (2 * signs.to(f.device) - 1).to(f.dtype)
    if V is None:
        return closed_form(likelihood, f, xi) / m**0.5
    return torch.einsum("...ck,m...k->m...c", V, xi) / m**0.5


def softmax_factor_times(likelihood: Likelihood, f: Tensor, xi: Tensor) -> Tensor:
    """V ξ for the softmax factor V = diag(√p) − p √pᵀ (C columns): √p ⊙ ξ − p (√pᵀξ).

    Args:
        f: logits (N, *S, C).
        xi: vectors (m, N, *S, C).
    """
    p = torch.softmax(f, -1)
    q = p.sqrt()
    return q * xi - p * (q * xi).sum(-1, keepdim=True)


#: likelihood type (exactly) -> V ξ for its own ``hessian_factor`` V without forming V
FACTOR_PRODUCTS: dict[type, Callable[[Likelihood, Tensor, Tensor], Tensor]] = {
    Categorical: softmax_factor_times,
}

"""The linear algebra of the function-space (GP / NTK) Laplace posterior: pure functions.

Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via local linearization",
AISTATS 2021 (§3, the GP view of the linearised Laplace); Immer et al., ICML 2023 (the kernel
form of the evidence). With per-sample Jacobians J_n (D × P) of the D flattened outputs, the
prior N(μ0, P0⁻¹), P0 = diag(δ), and factors W_n (D × K) of the output Hessians divided by the
temperature, Λ_n / T = W_n W_nᵀ, the weight-space GGN posterior N(θ*, (Jᵀ W Wᵀ J + P0)⁻¹) is the
posterior of a GP over the outputs with the *NTK under the prior*

    κ(x, x') = J(x) P0⁻¹ J(x')ᵀ = Σ_g J_g(x) J_g(x')ᵀ / δ_g     (D × D blocks),

a sum of per-group kernels for a scalar or group-wise δ (one J_g J_gᵀ per prior group g), so a
hyperparameter step recombines G cached N·D × N·D matrices instead of touching J again. Every
formula below uses W, never Λ⁻¹ (the softmax Λ has rank C − 1):

- evidence (matrix determinant lemma), with A = Wᵀ K W (N·K × N·K):
  log det(P0 + Jᵀ W Wᵀ J) − log det P0 = log det(I + A);
- predictive (Woodbury), K** = κ(x*, x*), K*X = κ(x*, X):
  Cov[f(x*)] = J* Σ J*ᵀ = K** − K*X W (I + A)⁻¹ Wᵀ K_X*;
- Nyström with M inducing inputs Z (Williams & Seeger, NeurIPS 2000), K_XX ≈ K_XZ K_ZZ⁻¹ K_ZX:
  with K_ZZ = L Lᵀ and Φ = Wᵀ K_XZ L⁻ᵀ (N·K × M·D), the log-determinant over all N points is
  log det(I + Φᵀ Φ), an M·D × M·D determinant, and the predictive (deterministic training
  conditional, DTC; Quiñonero-Candela & Rasmussen, JMLR 2005) keeps the exact prior K**:
  Cov[f(x*)] = K** − aᵀ a + bᵀ b with a = L⁻¹ K_Z*, b = chol(I + ΦᵀΦ)⁻¹ a.
  Since K_XZ K_ZZ⁻¹ K_ZX ≼ K_XX, its log-determinant is at most the exact one.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = [
    "cholesky_jittered",
    "group_kernels",
    "log_det_from_cholesky",
    "pathwise_map",
    "pathwise_samples",
    "posterior_covariance",
    "project",
    "same_values",
    "sample_factor",
    "summed_kernel",
]


def sample_factor(V: Tensor) -> Tensor:
    """Per-sample factors (N, D, R·K) of the output Hessian over the D = R·C flattened outputs.

    Args:
        V: the likelihood's factor (N, *S, C, K) (Λ = V Vᵀ per position, R = prod(S) positions).

    Returns:
        W with W_n W_nᵀ = blockdiag over positions of V_{n,r} V_{n,r}ᵀ: (N, R·C, R·K).
    """
    N, C, K = V.shape[0], V.shape[-2], V.shape[-1]
    R = int(torch.Size(V.shape[1:-2]).numel())
    if R == 1:
        return V.reshape(N, C, K)
    V = V.reshape(N, R, C, K)
    eye = torch.eye(R, dtype=V.dtype, device=V.device)
    return (eye[None, :, None, :, None] * V[:, :, :, None, :]).reshape(N, R * C, R * K)


def group_kernels(J1: Tensor, J2: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Per-group kernels J1_g J2_gᵀ over the parameters of each prior group: (G, R1, R2).

    Args:
        J1: Jacobian rows (R1, P); J2: (R2, P).
        groups: group of every parameter (P,), values in [0, n_groups).
    """
    if n_groups == 1:
        return (J1 @ J2.T)[None]
    out = J1.new_zeros(n_groups, J1.shape[0], J2.shape[0])
    groups = groups.to(J1.device)
    for g in range(n_groups):  # a handful of groups; each is one matrix product
        cols = (groups == g).nonzero().squeeze(1)
        if cols.numel():
            out[g] = J1[:, cols] @ J2[:, cols].T
    return out


def summed_kernel(kernels: Tensor, inverse_delta: Tensor) -> Tensor:
    """Σ_g K_g / δ_g for per-group kernels (G, R1, R2) and 1/δ per group (G,): (R1, R2)."""
    return torch.einsum("g,gij->ij", inverse_delta.to(kernels), kernels)


def project(W1: Tensor, K: Tensor, W2: Tensor) -> Tensor:
    """W1ᵀ K W2 for block-diagonal W1 (N1, D, K1), W2 (N2, D, K2) and K (N1·D, N2·D):
    (N1·K1, N2·K2)."""
    n1, d, k1 = W1.shape
    n2, _, k2 = W2.shape
    right = torch.einsum("amd,mdl->aml", K.reshape(n1 * d, n2, d), W2)  # (N1·D, N2, K2)
    out = torch.einsum("ndk,ndml->nkml", W1, right.reshape(n1, d, n2, k2))
    return out.reshape(n1 * k1, n2 * k2)


def project_rows(W: Tensor, K: Tensor) -> Tensor:
    """Wᵀ K for block-diagonal W (N, D, K) and K (N·D, B): (N·K, B)."""
    n, d, k = W.shape
    return torch.einsum("ndk,ndb->nkb", W, K.reshape(n, d, -1)).reshape(n * k, -1)


def log_det_from_cholesky(L: Tensor) -> Tensor:
    """log det(L Lᵀ) of a lower Cholesky factor (0-d)."""
    return 2 * L.diagonal().log().sum()


def identity_plus(A: Tensor) -> Tensor:
    """Lower Cholesky factor of I + A for A ⪰ 0 (always positive definite)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.cholesky(eye + 0.5 * (A + A.T))


def cholesky_jittered(K: Tensor, name: str = "K_ZZ") -> Tensor:
    """Lower Cholesky factor of a positive semi-definite K, adding jitter only if it fails.

    K_ZZ of the Nyström approximation is singular when the M inducing inputs have more outputs
    M·D than the network parameters, or linearly dependent Jacobians. Then ε·mean(diag K)·I is
    added, ε = 10⁻¹⁰ (float64) or 10⁻⁶ (lower precision), ten times more until it factorises
    (at most five times), with a warning naming ε.
    """
    K = 0.5 * (K + K.T)
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:
        return L
    eps = 1e-10 if K.dtype == torch.float64 else 1e-6
    scale = K.diagonal().mean().detach().clamp_min(torch.finfo(K.dtype).tiny)
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(K + eps * scale * eye)
        if int(info) == 0:
            warnings.warn(
                f"{name} is singular (more inducing outputs than independent Jacobian "
                f"directions); added {eps:.0e}·mean(diag)·I to factorise it", stacklevel=3)
            return L
        eps *= 10
    raise ValueError(f"{name} cannot be factorised even with jitter: it has NaN/inf values or "
                     "is far from positive semi-definite")


def pathwise_map(Jt_W: Tensor, inverse_delta: Tensor, L_S: Tensor, xi: Tensor,
                 eps: Tensor) -> Tensor:
    """Weight deviations θ − θ* ~ N(0, (P0 + Jᵀ W Wᵀ J)⁻¹) by conditioning prior draws (Matheron).

    z = P0^{-½} ξ is a draw of the prior; then θ − θ* = z − P0⁻¹ Jᵀ W (I + A)⁻¹ (Wᵀ J z + ε)
    with ε ~ N(0, I) in the N·K output directions (Wilson et al., ICML 2020, pathwise
    conditioning), exactly the Laplace posterior's covariance, at O(S·P·N·K) for S samples.

    Args:
        Jt_W: Jᵀ W, (P, N·K); inverse_delta: 1/δ per parameter (P,) or 0-d.
        L_S: lower Cholesky factor of I + A (N·K, N·K).
        xi: standard normal (S, P); eps: standard normal (S, N·K).

    Returns:
        (S, P).
    """
    z = xi * inverse_delta.sqrt()
    rhs = (z @ Jt_W + eps).T  # (N·K, S)
    solved = torch.cholesky_solve(rhs, L_S)
    return z - (Jt_W @ solved).T * inverse_delta


def blocks(U: Tensor, B: int, joint: bool) -> Tensor:
    """Uᵀ U (B·D, B·D) for ``joint``, else its diagonal D × D blocks (B, D, D); U (r, B·D)."""
    if joint:
        return U.T @ U
    V = U.reshape(U.shape[0], B, -1)
    return torch.einsum("rbd,rbe->bde", V, V)


def posterior_covariance(prior_cov: Tensor, K_ps: Tensor, W: Tensor, L_S: Tensor,
                         L: Tensor | None, B: int, joint: bool) -> Tensor:
    """Cov[f(x*)] of the GP posterior for B test inputs with D outputs each.

    Exact / subset (``L`` None): K** − (L_S⁻¹ Wᵀ K_X*)ᵀ (L_S⁻¹ Wᵀ K_X*). Nyström (``L`` the
    Cholesky factor of K_ZZ, ``K_ps`` = K_Z*): K** − aᵀa + bᵀb with a = L⁻¹ K_Z*,
    b = L_S⁻¹ a (DTC).

    Args:
        prior_cov: K**, (B, D, D) or (B·D, B·D) for ``joint``.
        K_ps: κ between the kernel points and the test inputs, (n·D, B·D).
        W: factors at the kernel points (n, D, K) (unused for Nyström).
        L_S: Cholesky factor of the evidence matrix S.
    """
    if L is None:
        U = torch.linalg.solve_triangular(L_S, project_rows(W, K_ps), upper=False)
        return prior_cov - blocks(U, B, joint)
    a = torch.linalg.solve_triangular(L, K_ps, upper=False)
    b = torch.linalg.solve_triangular(L_S, a, upper=False)
    return prior_cov - blocks(a, B, joint) + blocks(b, B, joint)


def same_values(a: tuple, b: tuple) -> bool:
    """Whether two tuples of tensors / numbers / None hold the same values (a cache key)."""
    for u, v in zip(a, b):
        if torch.is_tensor(u) or torch.is_tensor(v):
            if not (torch.is_tensor(u) and torch.is_tensor(v) and u.shape == v.shape
                    and torch.equal(u, v.to(u))):
                return False
        elif u != v:
            return False
    return True


def pathwise_samples(J: Tensor, W: Tensor, inverse_delta: Tensor, L_S: Tensor, n_samples: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """``n_samples`` draws of θ − θ* (S, P) by :func:`pathwise_map` for Jacobians J (n, D, P),
    factors W (n, D, K), 1/δ (0-d or (P,)) and the Cholesky factor of I + A."""
    P = J.shape[-1]
    Jt_W = torch.einsum("ndp,ndk->pnk", J, W).reshape(P, -1)
    xi = torch.randn(n_samples, P, generator=generator, dtype=J.dtype)
    eps = torch.randn(n_samples, Jt_W.shape[1], generator=generator, dtype=J.dtype)
    return pathwise_map(Jt_W, inverse_delta.expand(P), L_S, xi.to(J.device), eps.to(J.device))

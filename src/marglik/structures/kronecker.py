"""Kronecker-factored (KFAC) curvature block, eigendecomposed once."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from marglik.structures.base import (
    CurvatureBlock,
    check_delta,
    check_eps,
    check_rows,
    check_scale,
    check_square,
    sym_eigh,
)

__all__ = ["Kronecker"]


class Kronecker(CurvatureBlock):
    """Kronecker-factored curvature ``H = G ⊗ A`` (``torch.kron(G, A)``) of one weight matrix.

    ``G`` (``m × m``, output-gradient factor) and ``A`` (``n × n``, input factor) belong to a weight
    ``W`` of shape ``(m, n)`` flattened row-major, so parameter ``W[i, j]`` sits at flat index
    ``i · n + j`` and ``H vec(W) = vec(G W Aᵀ)`` (KFAC, Martens & Grosse 2015; for weight sharing
    see Eschenhagen et al., NeurIPS 2023). A bias block is ``Kronecker(G, ones(1, 1))``.

    Both factors are eigendecomposed once, ``G = Q_G diag(μ) Q_Gᵀ`` and ``A = Q_A diag(λ) Q_Aᵀ``
    (eigenvalues clamped at 0), so ``H`` has eigenvectors ``Q_G ⊗ Q_A`` and eigenvalues
    ``μ_i λ_j``. The prior is added *exactly* in this eigenbasis (not by adding ``√δ`` to each
    factor; Immer et al., ICML 2021):

        log det(scale · H + δ I) = Σ_ij log(scale · μ_i λ_j + δ),
        J P⁻¹ Jᵀ = Σ_ij J̃_{k,ij} J̃_{k',ij} / (scale · μ_i λ_j + δ),   J̃_k = Q_Gᵀ J_k Q_A,

    with ``J_k`` reshaped to ``(m, n)``; no ``p × p`` matrix is formed (except in ``to_dense``).

    The prior precision must be one value for the block: a 0-d tensor, or a ``(p,)`` tensor whose
    entries are all equal (a layer-wise prior expanded to parameters); its first entry is then
    used, so the gradient flows to ``delta[0]``. Per-parameter values raise ``ValueError``.

    The eigendecompositions are cached only when the factors do not require grad.

    Args:
        G: ``(m, m)`` symmetric PSD factor (rows of ``W``).
        A: ``(n, n)`` symmetric PSD factor (columns of ``W``).
    """

    def __init__(self, G: Tensor, A: Tensor) -> None:
        check_square(G, "G")
        check_square(A, "A")
        if G.dtype != A.dtype or G.device != A.device:
            raise ValueError(
                f"G and A must share dtype and device, got {G.dtype}/{G.device} and "
                f"{A.dtype}/{A.device}"
            )
        self.G = G
        self.A = A
        self._eig_cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def m(self) -> int:
        """Rows of the weight (size of ``G``)."""
        return self.G.shape[0]

    @property
    def n(self) -> int:
        """Columns of the weight (size of ``A``)."""
        return self.A.shape[0]

    @property
    def size(self) -> int:
        return self.m * self.n

    @property
    def dtype(self) -> torch.dtype:
        return self.G.dtype

    @property
    def device(self) -> torch.device:
        return self.G.device

    def eig(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cached ``(μ (m,), Q_G (m, m), λ (n,), Q_A (n, n))`` with ``μ, λ ≥ 0``."""
        if self._eig_cache is not None:
            return self._eig_cache
        mu, QG = sym_eigh(self.G)
        lam, QA = sym_eigh(self.A)
        out = (mu, QG, lam, QA)
        if not (self.G.requires_grad or self.A.requires_grad):
            self._eig_cache = out
        return out

    def _prepare_delta(self, delta: Tensor | float) -> Tensor:
        delta = check_delta(delta, self.size, dtype=self.dtype, device=self.device)
        if delta.dim() == 1:
            if not bool(torch.all(delta == delta[0])):
                raise ValueError(
                    "KFAC blocks need one prior precision per block (scalar or layer-wise), "
                    "got per-parameter values"
                )
            delta = delta[..., 0]
        return delta

    def _eigen_precision(self, scale: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Λ (m, n), Q_G, Q_A)`` with ``Λ_ij = scale μ_i λ_j + δ`` the eigenvalues of ``P``."""
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        mu, QG, lam, QA = self.eig()
        return scale * torch.outer(mu, lam) + delta, QG, QA

    def _rotate(self, X: Tensor, QG: Tensor, QA: Tensor) -> Tensor:
        """``(..., p)`` → ``(..., m, n)`` coefficients ``Q_Gᵀ X Q_A`` in the eigenbasis."""
        return QG.mT @ X.reshape(*X.shape[:-1], self.m, self.n) @ QA

    def _unrotate(self, Xt: Tensor, QG: Tensor, QA: Tensor) -> Tensor:
        """``(..., m, n)`` eigen-coefficients → ``(..., p)`` vectors ``vec(Q_G X̃ Q_Aᵀ)``."""
        X = QG @ Xt @ QA.mT
        return X.reshape(*X.shape[:-2], self.size)

    # ------------------------------------------------------------------ posterior operations
    def logdet(self, scale: Tensor, delta: Tensor) -> Tensor:
        Lam, _, _ = self._eigen_precision(scale, delta)
        return torch.log(Lam).sum()

    def inv_quad(self, J: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_rows(J, self.size)
        Lam, QG, QA = self._eigen_precision(scale, delta)
        Jt = self._rotate(J, QG, QA).reshape(J.shape)
        return (Jt / Lam.reshape(-1)) @ Jt.mT

    def solve(self, v: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        self._check_rows(v, "v")
        Lam, QG, QA = self._eigen_precision(scale, delta)
        return self._unrotate(self._rotate(v, QG, QA) / Lam, QG, QA)

    def sample(self, eps: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_eps(eps, self.size)
        Lam, QG, QA = self._eigen_precision(scale, delta)
        # L = (Q_G ⊗ Q_A) diag(Λ^{-1/2}): each row ε (as an m × n matrix) ↦ Q_G (ε / √Λ) Q_Aᵀ.
        E = eps.reshape(eps.shape[0], self.m, self.n)
        return self._unrotate(E * Lam.rsqrt(), QG, QA)

    def covariance_diag(self, scale: Tensor, delta: Tensor) -> Tensor:
        Lam, QG, QA = self._eigen_precision(scale, delta)
        # diag(P⁻¹)[(a, b)] = Σ_ij Q_G[a, i]² Q_A[b, j]² / Λ_ij.
        return (QG.square() @ Lam.reciprocal() @ QA.square().mT).reshape(-1)

    # ------------------------------------------------------------------ curvature only
    def matvec(self, v: Tensor) -> Tensor:
        self._check_rows(v, "v")
        V = v.reshape(*v.shape[:-1], self.m, self.n)
        return (self.G @ V @ self.A.mT).reshape(v.shape)

    def diag(self) -> Tensor:
        return torch.outer(torch.diagonal(self.G), torch.diagonal(self.A)).reshape(-1)

    def to_dense(self) -> Tensor:
        return torch.kron(self.G, self.A)

    # ------------------------------------------------------------------ serialisation, devices
    def state_dict(self) -> dict[str, Tensor]:
        return self._state(G=self.G.detach().clone(), A=self.A.detach().clone())

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> Kronecker:
        cls._check_kind(sd)
        return cls(sd["G"], sd["A"])

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> Kronecker:
        new = Kronecker(fn(self.G), fn(self.A))
        if self._eig_cache is not None:
            new._eig_cache = tuple(fn(t) for t in self._eig_cache)  # type: ignore[assignment]
        return new

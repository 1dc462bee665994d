"""Low-rank curvature block (top eigenpairs, e.g. from Lanczos) plus the diagonal prior."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from marglik.structures.base import CurvatureBlock, check_eps, check_rows, check_scale

__all__ = ["LowRank"]


class LowRank(CurvatureBlock):
    """Low-rank curvature ``H = U diag(s) Uᵀ``, ``U`` (``p × k``) orthonormal columns, ``s ≥ 0``.

    Typically the top-``k`` eigenpairs of the GGN from Lanczos iterations. The posterior precision
    is the low-rank-plus-diagonal matrix ``P = scale · U diag(s) Uᵀ + diag(delta)``. ``U`` is
    assumed orthonormal (not checked, which would cost ``O(p k²)`` per construction).

    Scalar ``delta = δ`` (closed forms in the eigenbasis, ``d = scale · s + δ``):

        log det P = Σ_i log d_i + (p − k) log δ,
        P⁻¹ = (1/δ) (I − U diag(scale · s / d) Uᵀ),
        P^{-1/2} = δ^{-1/2} I + U diag(d^{-1/2} − δ^{-1/2}) Uᵀ.

    Vector ``delta = D`` (``(p,)``): with ``W = D^{-1/2} U (scale · S)^{1/2}`` (``p × k``) and
    ``C = I_k + Wᵀ W``, the matrix determinant lemma and Woodbury give

        log det P = Σ log D + log det C,    P⁻¹ = D^{-1/2} (I − W C⁻¹ Wᵀ) D^{-1/2}.

    Samples use the symmetric square root ``L = D^{-1/2} (I + W Wᵀ)^{-1/2}``; with the thin QR
    ``W = Q R`` and ``R Rᵀ = V M Vᵀ`` it reads
    ``L = D^{-1/2} (I + Q V ((1 + M)^{-1/2} − 1) Vᵀ Qᵀ)``; it is evaluated from the ``k × k``
    eigendecomposition of ``Wᵀ W`` (same ``M``) without the QR.

    All operations cost ``O(p k²)`` or less; no ``p × p`` matrix is formed (except in ``to_dense``).

    Args:
        U: ``(p, k)`` orthonormal eigenvectors.
        s: ``(k,)`` non-negative eigenvalues.
    """

    def __init__(self, U: Tensor, s: Tensor) -> None:
        if not isinstance(U, Tensor) or U.dim() != 2 or not U.is_floating_point():
            shape = tuple(U.shape) if isinstance(U, Tensor) else type(U).__name__
            raise ValueError(f"U must be a floating (p, k) matrix, got {shape}")
        if not isinstance(s, Tensor) or s.shape != (U.shape[1],):
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"s must have shape ({U.shape[1]},) to match U {tuple(U.shape)}, got {shape}"
            )
        if U.shape[1] > U.shape[0]:
            raise ValueError(f"rank k={U.shape[1]} exceeds the block size p={U.shape[0]}")
        if not bool(torch.all(s >= 0)):
            raise ValueError(
                "low-rank eigenvalues s must be non-negative, got minimum "
                f"{float(s.detach().min())}"
            )
        self.U = U
        self.s = s

    @property
    def rank(self) -> int:
        """Number of eigenpairs ``k``."""
        return self.U.shape[1]

    @property
    def size(self) -> int:
        return self.U.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    def _woodbury(self, scale: Tensor, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For a ``(p,)`` delta ``D``: ``D^{-1/2}`` (p,), ``W0 = D^{-1/2} U S^{1/2}`` (p, k) and
        the lower Cholesky factor of ``C = I_k + scale · W0ᵀ W0`` (k, k); ``W = √scale · W0``.

        ``scale`` stays outside the square root so that its gradient is finite at ``s_i = 0``.
        """
        dinv_sqrt = D.rsqrt()
        W0 = dinv_sqrt[:, None] * self.U * torch.sqrt(self.s)
        C = torch.eye(self.rank, dtype=W0.dtype, device=W0.device) + scale * (W0.mT @ W0)
        return dinv_sqrt, W0, torch.linalg.cholesky(C)

    # ------------------------------------------------------------------ posterior operations
    def logdet(self, scale: Tensor, delta: Tensor) -> Tensor:
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        if delta.dim() == 0:
            d = scale * self.s + delta
            return torch.log(d).sum() + (self.size - self.rank) * torch.log(delta)
        _, _, LC = self._woodbury(scale, delta)
        return torch.log(delta).sum() + 2.0 * torch.log(torch.diagonal(LC)).sum()

    def inv_quad(self, J: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_rows(J, self.size)
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        if delta.dim() == 0:
            # P⁻¹ = U diag(1/d) Uᵀ + (I − U Uᵀ)/δ; the residual J − J U Uᵀ is formed explicitly,
            # which avoids the cancellation in J Jᵀ − J U diag(scale s/d) Uᵀ Jᵀ when δ ≪ scale · s.
            d = scale * self.s + delta
            JU = J @ self.U
            Jperp = J - JU @ self.U.mT
            return (JU / d) @ JU.mT + (Jperp @ Jperp.mT) / delta
        dinv_sqrt, W0, LC = self._woodbury(scale, delta)
        Jt = J * dinv_sqrt
        JW = Jt @ W0
        # X = J̃ W0 L_C⁻ᵀ, so scale · X Xᵀ = J̃ W C⁻¹ Wᵀ J̃ᵀ.
        X = torch.linalg.solve_triangular(LC.mT, JW.reshape(-1, self.rank), upper=True, left=False)
        X = X.reshape(JW.shape)
        return Jt @ Jt.mT - scale * (X @ X.mT)

    def solve(self, v: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        self._check_rows(v, "v")
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        if delta.dim() == 0:
            d = scale * self.s + delta
            vU = v @ self.U
            return (vU / d) @ self.U.mT + (v - vU @ self.U.mT) / delta
        dinv_sqrt, W0, LC = self._woodbury(scale, delta)
        u = v * dinv_sqrt
        Wu = (u @ W0).reshape(-1, self.rank).mT
        CWu = torch.cholesky_solve(Wu, LC, upper=False).mT.reshape(*v.shape[:-1], self.rank)
        return (u - scale * (CWu @ W0.mT)) * dinv_sqrt

    def sample(self, eps: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_eps(eps, self.size)
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        if delta.dim() == 0:
            # L = δ^{-1/2} I + U diag(d^{-1/2} − δ^{-1/2}) Uᵀ is symmetric: rows ε ↦ L ε = ε L.
            d = scale * self.s + delta
            coef = d.rsqrt() - delta.rsqrt()
            return eps * delta.rsqrt() + ((eps @ self.U) * coef) @ self.U.mT
        # Symmetric square root L = D^{-1/2} (I + W Wᵀ)^{-1/2}. With W = Q R (thin QR) and
        # R Rᵀ = V M Vᵀ this is D^{-1/2} (I + QV ((1 + M)^{-1/2} − 1) VᵀQᵀ). We evaluate the same
        # matrix without the QR: Wᵀ W = Rᵀ R shares M, and with Wᵀ W = Y M Yᵀ,
        # QV (·) VᵀQᵀ = W Y diag(f(M)) Yᵀ Wᵀ, f(m) = ((1 + m)^{-1/2} − 1) / m
        #             = −1 / (√(1 + m) (1 + √(1 + m)))   (finite at m = 0: rank deficiency is fine).
        dinv_sqrt, W0, _ = self._woodbury(scale, delta)
        M, Y = torch.linalg.eigh(scale * (W0.mT @ W0))
        root = torch.sqrt(1.0 + M.clamp(min=0))
        f = -1.0 / (root * (1.0 + root))
        WY = W0 @ Y
        # Rows ε ↦ L ε = D^{-1/2} B ε with B symmetric, i.e. (ε B) ⊙ D^{-1/2} (broadcast on
        # columns).
        return (eps + scale * (((eps @ WY) * f) @ WY.mT)) * dinv_sqrt

    def covariance_diag(self, scale: Tensor, delta: Tensor) -> Tensor:
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        if delta.dim() == 0:
            d = scale * self.s + delta
            U2 = self.U.square()
            return (U2 / d).sum(-1) + (1.0 - U2.sum(-1)) / delta
        dinv_sqrt, W0, LC = self._woodbury(scale, delta)
        X = torch.linalg.solve_triangular(LC.mT, W0, upper=True, left=False)
        return (1.0 - scale * X.square().sum(-1)) * dinv_sqrt.square()

    # ------------------------------------------------------------------ curvature only
    def matvec(self, v: Tensor) -> Tensor:
        self._check_rows(v, "v")
        return ((v @ self.U) * self.s) @ self.U.mT

    def diag(self) -> Tensor:
        return (self.U.square() * self.s).sum(-1)

    def to_dense(self) -> Tensor:
        return (self.U * self.s) @ self.U.mT

    # ------------------------------------------------------------------ serialisation, devices
    def state_dict(self) -> dict[str, Tensor]:
        return self._state(U=self.U.detach().clone(), s=self.s.detach().clone())

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> LowRank:
        cls._check_kind(sd)
        return cls(sd["U"], sd["s"])

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> LowRank:
        return LowRank(fn(self.U), fn(self.s))

"""Layer-wise GLM predictive, part two: J Σ Jᵀ against each kind of posterior block.

The recorded layers (:mod:`marglik.posterior.layerwise`) give, per input, the Jacobian of output c
w.r.t. a layer's weight W (D_out × D_in, row-major) and bias applied at R shared positions,

    J_c^W = Σ_r g_{c,r} a_rᵀ,    J_c^b = Σ_r g_{c,r}.

**Kronecker blocks.** With P = s · G ⊗ A + δ, G = Q_G diag(μ) Q_Gᵀ, A = Q_A diag(λ) Q_Aᵀ, and
g̃ = Q_Gᵀ g, ã = Q_Aᵀ a (docs/architecture.md §5; the prior is added exactly in the eigenbasis),

    Cov[f_c, f_c'] = Σ_ij J̃_{c,ij} J̃_{c',ij} / (s μ_i λ_j + δ),    J̃_c = Σ_r g̃_{c,r} ã_rᵀ,

and without weight sharing (R = 1) the sum collapses to a rank-one form,

    Cov[f_c, f_c'] = g̃_cᵀ diag(K ã²) g̃_c',    K_ij = 1 / (s μ_i λ_j + δ),

which costs O(C²·D_out + D_out·D_in) per input instead of O(C·D_out·D_in). **Diagonal blocks**
(P = s · h + δ elementwise) give the same forms without the rotation.

**Dense blocks** (KFAC bias blocks, G alone, or a ``"full"`` posterior over any tensors). By
default the block's cached Cholesky factor C of P_b = C Cᵀ (:meth:`~marglik.structures.Dense.
cholesky`, p³/3 flops once per value of (s, δ)) and one triangular solve per chunk of inputs,

    J P_b⁻¹ Jᵀ = Xᵀ X,    X = C⁻¹ Jᵀ    (O(p²) per output row, the whole chunk in one solve),

with J (N·D, p) formed tensor by tensor from the recorded (a, g). Where the block already holds
its eigendecomposition H_b = Q diag(λ) Qᵀ (or δ / s require grad, so that one eigenbasis serves
every step), J Q is multiplied tensor by tensor instead, J^W Q = g (aᵀ Q) for a weight without
sharing, which saves the factor D·D_in/(D_in + D) of forming J first, and
J P_b⁻¹ Jᵀ = (J Q) diag(1/(s λ + δ)) (J Q)ᵀ. A per-parameter δ always takes the Cholesky path.

The contraction per block type is looked up in :data:`CONTRACTIONS`. Everything is batched over
the inputs of a chunk (einsum / batched matmul / one triangular solve); there is no Python loop
over inputs, output columns or parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.posterior.layerwise import (
    BlockSlot,
    Fallback,
    LayerData,
    LayerwisePlan,
    RecordedData,
    TensorSlot,
)
from marglik.structures import Dense, Diagonal, Kronecker

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace


@dataclass
class Chunk:
    """What one chunk of N inputs with D outputs each recorded: its Jacobians, tensor by tensor."""

    plan: LayerwisePlan
    data: RecordedData
    J_other: Tensor | None  # (N, D, P_other): tensors without a registered layer
    N: int
    D: int
    like: Tensor  # 0-d, the posterior's dtype and device

    def recorded(self, t: TensorSlot) -> LayerData | None:
        """The recorded (a, g) of the tensor's layer; None for other tensors and fallbacks."""
        ld = self.data.get(t.layer.name) if t.layer is not None else None
        return ld if isinstance(ld, LayerData) else None

    def jacobian(self, t: TensorSlot) -> Tensor:
        """Materialised Jacobian (N, D, numel) of one parameter tensor."""
        if t.layer is None:
            lo, hi = self.plan.other_offsets[t.name]
            return self.J_other[..., lo:hi]
        ld = self.data.get(t.layer.name)
        if isinstance(ld, Fallback):
            return ld.J[t.name]
        if ld is None:  # not reached: every planned layer is recorded or falls back
            return self.like.new_zeros(self.N, self.D, t.stop - t.start)
        if t.role == "bias":
            return ld.g.sum(2).transpose(0, 1)
        return torch.einsum("dnri,nrj->ndij", ld.g, ld.a).reshape(self.N, self.D, -1)

    def block_jacobian(self, bs: BlockSlot) -> Tensor:
        """Materialised Jacobian (N, D, p_b) of the tensors one block covers."""
        return torch.cat([self.jacobian(t) for t in bs.tensors], -1)


def functional_covariance(la: Laplace, plan: LayerwisePlan, data: RecordedData,
                          J_other: Tensor | None, N: int, D: int, joint: bool) -> Tensor:
    """J Σ Jᵀ per input (N, D, D), or over the whole batch (N·D, N·D) with ``joint=True``."""
    scale, delta = la._precision_args()
    like = torch.zeros((), dtype=la.H.dtype, device=la.H.device)
    chunk = Chunk(plan, data, J_other, N, D, like)
    out = like.new_zeros(N * D, N * D) if joint else like.new_zeros(N, D, D)
    for bs in plan.blocks:
        d = delta if delta.ndim == 0 else delta[bs.start : bs.stop]
        if joint:
            J = chunk.block_jacobian(bs).reshape(1, N * D, -1)
            if isinstance(bs.block, Dense):
                out = out + _dense_inv_quad(bs.block, J, lambda Q, J=J: J @ Q, scale, d)[0]
            else:
                out = out + bs.block.inv_quad(J, scale, d)[0]
        else:
            out = out + CONTRACTIONS[type(bs.block)](bs, chunk, scale, d)
    return out


# ---------------------------------------------------------------------------------- Kronecker
#: numbers of a layer's per-input Jacobians formed at once (blocks of weight rows)
MAX_JACOBIAN_BLOCK = 2**22


def _weight_quad(ld: LayerData, K: Tensor, QG: Tensor | None = None,
                 QA: Tensor | None = None) -> Tensor:
    """Σ_ij J̃_{c,ij} J̃_{c',ij} K_ij for J̃_c = Q_Gᵀ (Σ_r g_{c,r} a_rᵀ) Q_A: (N, D, D).

    Args:
        ld: recorded a (N, R, n) and g (D, N, R, m) of one layer (unrotated).
        K: weights (m, n); K ≥ 0 for a prior δ > 0.
        QG, QA: eigenbases (m, m) and (n, n) of the Kronecker factors, or None (identity, for
            diagonal blocks).

    Without sharing (R = 1) the rank-one form g̃_cᵀ diag(K ã²) g̃_c' (O(D²m + mn) per input).
    With few positions, the position-pair form (:func:`pairs_first`, :func:`_pair_quad`).
    Otherwise the Jacobians are formed batched over the chunk's inputs and the D outputs, one
    product (N, D·rows, R) @ (N, R, n) per block of weight rows of at most
    :data:`MAX_JACOBIAN_BLOCK` numbers (memory bounded by the block, not by N·D·m·n), and
    Cov = Σ_i X_i X_iᵀ with X_i = J̃_{·,i·} ⊙ √K_i. The A-side rotation goes where it is
    cheaper (:func:`rotate_inputs_first`): on the inputs once, ã = a Q_A (R·n² per input), or
    on each block of Jacobians, (g̃ᵀ a) Q_A (D·m·n² per input); the G side likewise
    (:func:`rotate_gradients_first`): g̃ = g Q_G (D·R·m² per input), or Q_Gᵀ J (D·m²·n per
    input) where all m rows fit one block.
    """
    g, a = ld.g, ld.a
    D, N, R, m = g.shape
    n = a.shape[-1]
    # Q_G on the formed Jacobians (D·m²·n per input) where that is cheaper than on g (D·R·m²)
    # and all m rows fit one block (the rotation mixes rows)
    g_late = (QG is not None and R > 1 and not pairs_first(D, R)
              and not rotate_gradients_first(R, n) and N * D * m * n <= MAX_JACOBIAN_BLOCK)
    if QG is not None and not g_late:
        g = g @ QG  # one (D·N·R, m) @ (m, m) product
    if R == 1:  # rank one: g_cᵀ diag(K a²) g_c'
        a0 = a[:, 0] if QA is None else a[:, 0] @ QA
        g0 = g[:, :, 0]  # (D, N, m)
        w = a0.square() @ K.mT  # (N, m)
        return torch.einsum("dni,eni->nde", g0 * w, g0)
    if pairs_first(D, R):
        return _pair_quad(a if QA is None else a @ QA, g, K)
    late = QA is not None and not rotate_inputs_first(D, R, m, n)
    if QA is not None and not late:
        a = a @ QA  # (N·R, n) @ (n, n)
    gt = g.permute(1, 0, 3, 2)  # (N, D, m, R), a view
    rows = m if g_late else max(1, min(m, MAX_JACOBIAN_BLOCK // max(1, N * D * max(n, R))))
    root = K.sqrt() if bool((K >= 0).all()) else None
    out = a.new_zeros(N, D, D)
    for lo in range(0, m, rows):  # blocks of weight rows, not inputs or columns
        hi = min(m, lo + rows)
        J = torch.bmm(gt[:, :, lo:hi].reshape(N, D * (hi - lo), R), a)  # (N, D·rows, n)
        if late:
            J = J @ QA
        if g_late:  # Q_Gᵀ J_c for every (input, output): (N·D, m, m) @ (N·D, m, n)
            J = torch.matmul(QG.mT, J.view(N * D, m, n))
        J = J.view(N, D, hi - lo, n)
        if root is not None:
            X = J.mul_(root[lo:hi]).view(N, D, -1)
            out = out.baddbmm(X, X.mT)
        else:  # a negative entry (not from a positive prior): both factors
            J = J.reshape(N, D, -1)
            out = out.baddbmm(J * K[lo:hi].reshape(-1), J.mT)
    return out


def pairs_first(D: int, R: int) -> bool:
    """Whether the position-pair form (:func:`_pair_quad`, m·n·R(R+1)/2 per input, one
    compute-bound product) costs no more than forming and contracting the Jacobians
    (m·n·(D·R + D²) per input, memory-bound for few positions): R(R+1)/2 ≤ D·R + D².
    For D = 10 outputs this holds for R ≤ 26 (a ResNet-18's 4×4 layers)."""
    return R * (R + 1) // 2 <= D * R + D * D


def _pair_quad(a: Tensor, g: Tensor, K: Tensor) -> Tensor:
    """Σ_ij K_ij J_{c,ij} J_{c',ij} over pairs of positions instead of Jacobians: (N, D, D).

    With J_c = Σ_r g_{c,r} a_rᵀ (a (N, R, n), g (D, N, R, m), both already rotated) and
    M_{i,rs} = Σ_j K_ij a_rj a_sj (symmetric in r, s),

        Cov[c, c'] = Σ_i Σ_{r,s} g_{c,r,i} M_{i,rs} g_{c',s,i}
                   = sym(Σ_i Σ_{r≤s} w_rs g_{c,r,i} M_{i,rs} g_{c',s,i}),   w_rs = 2 − [r = s],

    sym(Y) = (Y + Yᵀ)/2. M for all pairs r ≤ s is one product (N·T, n) @ (n, m) with
    T = R(R+1)/2, in blocks of pairs of at most :data:`MAX_JACOBIAN_BLOCK` numbers.
    """
    D, N, R, m = g.shape
    n = a.shape[-1]
    r, s = torch.triu_indices(R, R, device=a.device)
    w = (2 - (r == s).to(a.dtype))[:, None]  # (T, 1)
    gt = g.transpose(0, 1)  # (N, D, R, m)
    step = max(1, MAX_JACOBIAN_BLOCK // max(1, N * max(n, D * m)))
    out = a.new_zeros(N, D, D)
    for lo in range(0, r.numel(), step):  # blocks of position pairs
        rb, sb = r[lo : lo + step], s[lo : lo + step]
        M = (a[:, rb] * a[:, sb]) @ K.mT  # (N, T_b, m)
        left = (gt[:, :, rb] * (M * w[lo : lo + step])[:, None]).reshape(N, D, -1)
        out = out.baddbmm(left, gt[:, :, sb].reshape(N, D, -1).mT)
    return 0.5 * (out + out.mT)


def rotate_gradients_first(R: int, n: int) -> bool:
    """Whether g̃ = g Q_G (D·R·m² per input) is cheaper than Q_Gᵀ J (D·m²·n per input):
    R ≤ n. Not for a ResNet's 1×1 convolutions at high resolution (n = c_in < R), e.g. a
    ResNet-50's 32×32 expansions 64 → 256 (R = 1,024, n = 64)."""
    return R <= n


def rotate_inputs_first(D: int, R: int, m: int, n: int) -> bool:
    """Whether ã = a Q_A (R·n² per input) is cheaper than rotating the Jacobians, J Q_A
    (D·m·n² per input): R ≤ D·m. For a ResNet-18 with C = 10 classes the 32×32 layers
    (R = 1,024, m = 64) rotate their Jacobians, all later layers their inputs."""
    return R <= D * m


def _kron_block(bs: BlockSlot, chunk: Chunk, scale: Tensor, delta: Tensor) -> Tensor:
    """J P_b⁻¹ Jᵀ (N, D, D) for a Kronecker block of one weight, in its eigenbasis."""
    if delta.ndim == 1:
        if not bool(torch.all(delta == delta[0])):
            raise ValueError("KFAC blocks need one prior precision per block "
                             "(scalar or layer-wise), got per-parameter values")
        delta = delta[0]
    mu, QG, lam, QA = bs.block.eig()
    K = 1 / (scale * torch.outer(mu, lam) + delta)
    t = bs.tensors[0]
    ld = chunk.recorded(t)
    if ld is not None:
        return _weight_quad(ld, K, QG, QA)
    J = chunk.jacobian(t)  # a layer that fell back
    Jt = torch.einsum("ndij,ia,jb->ndab", J.reshape(*J.shape[:2], QG.shape[0], QA.shape[0]),
                      QG, QA).flatten(2)
    return (Jt * K.reshape(-1)) @ Jt.mT


# ---------------------------------------------------------------------------------- Diagonal
def _diag_block(bs: BlockSlot, chunk: Chunk, scale: Tensor, delta: Tensor) -> Tensor:
    """J P_b⁻¹ Jᵀ (N, D, D) for a diagonal block, tensor by tensor."""
    K = 1 / (scale * bs.block.h + delta)
    out = chunk.like.new_zeros(chunk.N, chunk.D, chunk.D)
    for t in bs.tensors:
        Kt = K[t.start - bs.start : t.stop - bs.start]
        ld = chunk.recorded(t)
        if t.role == "weight" and ld is not None:
            out = out + _weight_quad(ld, Kt.reshape(t.shape[0], -1))
        elif t.role == "bias" and ld is not None:
            Jb = ld.g.sum(2)  # (D, N, m)
            out = out + torch.einsum("dni,eni->nde", Jb * Kt, Jb)
        else:  # other tensors and layers that fell back
            J = chunk.jacobian(t)
            out = out + (J * Kt) @ J.mT
    return out


# ---------------------------------------------------------------------------------- Dense
def _dense_block(bs: BlockSlot, chunk: Chunk, scale: Tensor, delta: Tensor) -> Tensor:
    """J P_b⁻¹ Jᵀ (N, D, D) for a dense block: a triangular solve, or J Q tensor by tensor."""
    return _dense_inv_quad(bs.block, lambda: chunk.block_jacobian(bs),
                           lambda Q: _jacobian_times(bs, chunk, Q), scale, delta)


def _dense_inv_quad(block: Dense, jacobian: Tensor | Callable[[], Tensor],
                    times: Callable[[Tensor], Tensor], scale: Tensor, delta: Tensor) -> Tensor:
    """J P⁻¹ Jᵀ (..., K, K) from J (..., K, p) (or a function making it) or from ``times(Q)``
    = J Q, whichever :func:`dense_factor` chooses."""
    if delta.ndim == 1 and bool(torch.all(delta == delta[0])):
        delta = delta[0]
    C = dense_factor(block, scale, delta)
    if C is None:
        evals, Q = block.eig()
        M = times(Q)
        return (M / (scale * evals + delta)) @ M.mT
    J = jacobian() if callable(jacobian) else jacobian
    X = whitened_rows(C, J)
    return X @ X.mT


def dense_factor(block: Dense, scale: Tensor, delta: Tensor) -> Tensor | None:
    """The block's (cached) Cholesky factor of P_b, or None where its eigenbasis serves instead.

    The eigenbasis serves a 0-d δ when the block already holds its eigendecomposition (no
    factorisation at all), when δ or s require grad (one eigendecomposition serves every
    hyperparameter step), or when P_b is not numerically positive definite (eigenvalues
    clamped at 0). A per-parameter δ always takes the Cholesky factor.
    """
    if delta.ndim == 0 and (block.has_eig or scale.requires_grad or delta.requires_grad):
        return None
    try:
        return block.cholesky(scale, delta)
    except torch.linalg.LinAlgError:
        if delta.ndim == 0:
            return None
        raise


def whitened_rows(C: Tensor, J: Tensor) -> Tensor:
    """X = J C⁻ᵀ (..., K, p) for a lower factor C of P (p, p), so that X Xᵀ = J P⁻¹ Jᵀ.

    One triangular solve for all N·K rows (O(p²) each)."""
    p = C.shape[-1]
    X = torch.linalg.solve_triangular(C.mT, J.reshape(-1, p), upper=True, left=False)
    return X.reshape(J.shape)


def _jacobian_times(bs: BlockSlot, chunk: Chunk, S: Tensor) -> Tensor:
    """J S for the block's Jacobian J (N, D, p) and a matrix S (p, q), tensor by tensor: (N, D, q).

    A weight without sharing contracts its inputs first, J^W S = g (aᵀ S) with S as
    (D_out, D_in, q), and never forms J^W.
    """
    out = chunk.like.new_zeros(chunk.N, chunk.D, S.shape[-1])
    for t in bs.tensors:
        St = S[t.start - bs.start : t.stop - bs.start]
        ld = chunk.recorded(t)
        if t.role == "weight" and ld is not None and ld.a.shape[1] == 1:
            aS = torch.einsum("nj,mjq->nmq", ld.a[:, 0], St.reshape(t.shape[0], -1, St.shape[-1]))
            out = out + torch.einsum("dnm,nmq->ndq", ld.g[:, :, 0], aS)
        elif t.role == "bias" and ld is not None:
            out = out + torch.einsum("dnm,mq->ndq", ld.g.sum(2), St)
        else:
            out = out + chunk.jacobian(t) @ St
    return out


#: How J P_b⁻¹ Jᵀ is contracted for each block type of a layer-wise plan.
CONTRACTIONS: dict[type, Callable[[BlockSlot, Chunk, Tensor, Tensor], Tensor]] = {
    Kronecker: _kron_block,
    Diagonal: _diag_block,
    Dense: _dense_block,
}

"""Low-rank curvature accumulators: ``"lowrank"`` (top-k eigenpairs by Lanczos) and
``"kernel"`` (the exact GGN from its N·C rows, the function-space form).

Both give one :class:`~marglik.structures.LowRank` block; the other structures are in
:mod:`marglik.curvature.accumulators`, whose :class:`~marglik.curvature.accumulators.Accumulator`
interface they share.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from marglik.curvature.accumulators import Accumulator, FitSpec, FullAccumulator, Sums
from marglik.curvature.batches import Replay
from marglik.curvature.lanczos import ggn_matvec, lanczos
from marglik.curvature.runtime import eval_mode
from marglik.distributed import is_distributed
from marglik.structures import LowRank

__all__ = ["KernelAccumulator", "LowRankAccumulator"]


class LowRankAccumulator(Accumulator):
    """``"lowrank"``: nothing per batch; Lanczos with matrix-free GGN-vector products replays
    the loader afterwards (top-k eigenpairs, k = min(P, rank or 100))."""

    @classmethod
    def uses_layers(cls, create_graph: bool) -> bool:
        return False

    def columns(self, fd, y) -> None:
        return None

    def add_batch(self, x, fd, y, U, layers) -> None:
        pass

    def blocks(self, sums):
        s = self.spec
        k = min(s.subset.size, s.rank or 100)
        mv = ggn_matvec(
            s.model,
            s.likelihood,
            Replay(s.loader, s.model, s.dict_key_x, s.dict_key_y),
            s.subset,
            s.curvature,
            s.seed,
        )
        with eval_mode(s.model, s.subset.names):
            vals, vecs = lanczos(
                mv,
                s.subset.size,
                k,
                dtype=s.dtype,
                device=next(s.model.parameters()).device,
                seed=s.seed,
            )
        return [LowRank(vecs, vals)]


class KernelAccumulator(FullAccumulator):
    """``"kernel"``: the exact GGN H = Bᵀ B kept as its rows B (R, P), R = K·N per-sample
    column gradients (K columns of Λ's factor for the exact GGN: C, or C − 1 for the softmax),
    turned into an exact :class:`~marglik.structures.LowRank` block by the thin SVD
    B = V diag(σ) Wᵀ: H = W diag(σ²) Wᵀ with rank ≤ min(R, P).

    Its log-determinant is the function-space (kernel) form of the evidence,

        log det(s·H + P0) = log det P0 + log det(I_R + s·B P0⁻¹ Bᵀ),

    with B P0⁻¹ Bᵀ = Λ^½ J P0⁻¹ Jᵀ Λ^½ the NTK under the prior (Immer, Korzepa & Bauer,
    AISTATS 2021), and every posterior operation is exact, as for ``"full"``, at O(P·rank²)
    instead of O(P³): for data with fewer outputs N·C than parameters P (small N, or a subset
    of the data). Memory: B, R × P numbers (at most :attr:`MAX_NUMBERS`). Singular values below
    R·ε·σ_max are dropped (their directions carry no curvature to rounding).
    """

    #: most numbers kept as rows (2^30: 4 GiB in float32) before the fit stops with an error
    MAX_NUMBERS: ClassVar[int] = 2**30

    def __init__(self, spec: FitSpec, sums: Sums):
        if is_distributed():
            raise ValueError("hessian_structure='kernel' is not available under "
                             "torch.distributed yet: use 'full' or 'lowrank'")
        super().__init__(spec, sums)
        self.kept: list[Tensor] = []

    def add_batch(self, x, fd, y, U, layers) -> None:
        self.kept.append(self.rows(x, U, layers).detach().clone())
        numbers = sum(r.numel() for r in self.kept)
        if numbers > self.MAX_NUMBERS:
            rows = sum(len(r) for r in self.kept)
            self.kept = []
            raise ValueError(
                f"hessian_structure='kernel' keeps one row of P = {self.spec.subset.size} "
                f"numbers per output: {rows} rows so far exceed KernelAccumulator.MAX_NUMBERS "
                f"({self.MAX_NUMBERS}); use 'full', 'kron' or 'lowrank', or fit on a subset of "
                "the data")

    def blocks(self, sums):
        B = torch.cat(self.kept)
        self.kept = []
        _, sv, Wt = torch.linalg.svd(B, full_matrices=False)
        keep = sv > max(B.shape) * torch.finfo(B.dtype).eps * sv.max().clamp_min(1e-300)
        return [LowRank(Wt[keep].mT.contiguous(), sv[keep].square())]

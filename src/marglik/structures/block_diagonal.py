"""Block-diagonal composition of curvature blocks (one block per layer or parameter group)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from marglik.structures.base import (
    CurvatureBlock,
    block_from_state_dict,
    check_eps,
    check_rows,
    check_scale,
)

__all__ = ["BlockDiagonal"]


class BlockDiagonal(CurvatureBlock):
    """Block-diagonal curvature ``H = blockdiag(H_1, …, H_B)`` over consecutive parameter slices.

    Block ``b`` covers the flat parameters ``offsets[b]:offsets[b + 1]`` (in order, without gaps),
    e.g. one :class:`~marglik.structures.Kronecker` block per layer and
    :class:`~marglik.structures.Diagonal` blocks for layers KFAC cannot express. The posterior
    precision ``P = scale · H + diag(delta)`` is block diagonal as well, so

        log det P = Σ_b log det P_b,    J P⁻¹ Jᵀ = Σ_b J_b P_b⁻¹ J_bᵀ   (J_b = J[..., slice_b]),

    and solves, samples and products act blockwise. ``delta`` is 0-d (shared by all blocks) or
    ``(p,)`` (sliced per block; each block applies its own rules, e.g. a Kronecker block needs a
    constant slice, which is how a layer-wise prior is passed).

    Args:
        blocks: the blocks, in parameter order; all must share dtype and device.
    """

    def __init__(self, blocks: Sequence[CurvatureBlock]) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        for b in blocks:
            if not isinstance(b, CurvatureBlock):
                raise ValueError(
                    f"BlockDiagonal blocks must be CurvatureBlocks, got {type(b).__name__}"
                )
        first = blocks[0]
        for b in blocks[1:]:
            if b.dtype != first.dtype or b.device != first.device:
                raise ValueError(
                    f"all blocks must share dtype and device, got {first.dtype}/{first.device} "
                    f"and {b.dtype}/{b.device}"
                )
        self.blocks: list[CurvatureBlock] = blocks
        offsets = [0]
        for b in blocks:
            offsets.append(offsets[-1] + b.size)
        #: Start of each block in the flat parameter vector, plus the total size at the end.
        self.offsets: list[int] = offsets

    @property
    def size(self) -> int:
        return self.offsets[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    def __len__(self) -> int:
        return len(self.blocks)

    def _slices(self) -> Iterator[tuple[CurvatureBlock, slice]]:
        for b, start, stop in zip(self.blocks, self.offsets[:-1], self.offsets[1:], strict=True):
            yield b, slice(start, stop)

    def _split_delta(self, delta: Tensor) -> Iterator[tuple[CurvatureBlock, slice, Tensor]]:
        for b, sl in self._slices():
            yield b, sl, (delta if delta.dim() == 0 else delta[sl])

    # ------------------------------------------------------------------ posterior operations
    def logdet(self, scale: Tensor, delta: Tensor) -> Tensor:
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        return torch.stack([b.logdet(scale, d) for b, _, d in self._split_delta(delta)]).sum()

    def logdet_per_block(self, scale: Tensor, deltas: Sequence[Tensor]) -> Tensor:
        """``log det P`` with one prior precision per block: ``deltas[b]`` is 0-d or ``(p_b,)``.

        Same value as :meth:`logdet` with the concatenated δ, but a block given a 0-d δ takes its
        scalar path (eigenvalues) instead of a per-parameter one (e.g. a Cholesky).
        """
        if len(deltas) != len(self.blocks):
            raise ValueError(f"got {len(deltas)} prior precisions for {len(self.blocks)} blocks")
        scale = check_scale(scale)
        return torch.stack([b.logdet(scale, d) for b, d in zip(self.blocks, deltas)]).sum()

    def inv_quad(self, J: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_rows(J, self.size)
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        out = None
        for b, sl, d in self._split_delta(delta):
            term = b.inv_quad(J[..., sl], scale, d)
            out = term if out is None else out + term
        return out

    def solve(self, v: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        self._check_rows(v, "v")
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        return torch.cat(
            [b.solve(v[..., sl], scale, d) for b, sl, d in self._split_delta(delta)], -1
        )

    def sample(self, eps: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_eps(eps, self.size)
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        return torch.cat(
            [b.sample(eps[:, sl], scale, d) for b, sl, d in self._split_delta(delta)], -1
        )

    def covariance_diag(self, scale: Tensor, delta: Tensor) -> Tensor:
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        return torch.cat([b.covariance_diag(scale, d) for b, _, d in self._split_delta(delta)])

    def precision_dense(self, scale: Tensor, delta: Tensor) -> Tensor:
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        return torch.block_diag(
            *[b.precision_dense(scale, d) for b, _, d in self._split_delta(delta)]
        )

    def covariance_dense(self, scale: Tensor, delta: Tensor) -> Tensor:
        scale, delta = check_scale(scale), self._prepare_delta(delta)
        return torch.block_diag(
            *[b.covariance_dense(scale, d) for b, _, d in self._split_delta(delta)]
        )

    # ------------------------------------------------------------------ curvature only
    def matvec(self, v: Tensor) -> Tensor:
        self._check_rows(v, "v")
        return torch.cat([b.matvec(v[..., sl]) for b, sl in self._slices()], -1)

    def diag(self) -> Tensor:
        return torch.cat([b.diag() for b in self.blocks])

    def to_dense(self) -> Tensor:
        return torch.block_diag(*[b.to_dense() for b in self.blocks])

    # ------------------------------------------------------------------ serialisation, devices
    def state_dict(self) -> dict[str, Tensor]:
        """Nested state: ``"num_blocks"`` and each block's entries under ``"blocks.{i}."``."""
        sd = self._state(num_blocks=torch.tensor(len(self.blocks), dtype=torch.int64))
        for i, b in enumerate(self.blocks):
            for key, value in b.state_dict().items():
                sd[f"blocks.{i}.{key}"] = value
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> BlockDiagonal:
        cls._check_kind(sd)
        if "num_blocks" not in sd:
            raise ValueError("BlockDiagonal.from_state_dict: missing 'num_blocks'")
        blocks = []
        for i in range(int(sd["num_blocks"])):
            prefix = f"blocks.{i}."
            sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if not sub:
                raise ValueError(f"BlockDiagonal.from_state_dict: no entries for block {i}")
            blocks.append(block_from_state_dict(sub))
        return cls(blocks)

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> BlockDiagonal:
        return BlockDiagonal([b._apply(fn) for b in self.blocks])

"""Data-parallel curvature: sum statistics over ``torch.distributed`` ranks.

When a process group is initialised, every rank fits on its own shard of the data and the
summed statistics (loss statistics, data count, curvature sums) are all-reduced, so N ranks give
the single-process result.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each tensor over all ranks (in place; a no-op without a process group)."""
    if is_distributed():
        for t in tensors.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def all_reduce_tensor(t: Tensor) -> Tensor:
    """Sum one tensor over ranks (returns it; a no-op without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


__all__ = ["is_distributed", "all_reduce_sum", "all_reduce_tensor"]

"""Partitions of N data points into blocks of M for the partitioned evidence bounds.

A partition is a list of 1-d ``LongTensor`` index blocks that together hold every index in
[0, N) exactly once. Both builders cut one ordering of the points into consecutive blocks of M
(the last one shorter when M does not divide N), so with the same ``generator`` seed the blocks
for M and for a multiple of M are nested — merging blocks can only tighten the bound
(Fischer's inequality), which makes "the bound grows with M" a deterministic statement there.

- :func:`random_partitions`: a uniformly random ordering (the stochastic estimator's batches);
- :func:`class_partitions`: points sorted by class, in random order within each class, so that
  most blocks hold one class (Immer et al., ICML 2023, §4: class-grouped batches drop only the
  kernel blocks between classes, typically the smaller ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_partitions", "class_partitions", "partition_batches", "random_partitions"]


def _check_size(n: int, m: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of data points must be a positive integer, got {n!r}")
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"the block size M must be a positive integer, got {m!r}")


def random_partitions(n: int, m: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Indices 0..n−1 in a random order (``generator``), cut into blocks of ``m``.

    Args:
        n: number of data points N.
        m: block size M (the last block holds the N mod M remaining points, if any).
        generator: makes the ordering reproducible.

    Returns:
        ⌈N/M⌉ index tensors (M,) (the last possibly shorter).
    """
    _check_size(n, m)
    return list(torch.randperm(n, generator=generator).split(m))


def class_partitions(labels: Tensor, m: int,
                     generator: torch.Generator | None = None) -> list[Tensor]:
    """Indices grouped by class, randomly ordered within each class (``generator``), cut into
    blocks of ``m`` consecutive indices: a block mixes classes only where a class ends.

    Args:
        labels: class labels (N,), integers.
        m: block size M.
        generator: makes the order within classes reproducible.

    Returns:
        ⌈N/M⌉ index tensors (M,) (the last possibly shorter).
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() \
            or labels.is_complex():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-d integer tensor (N,), got {shape}")
    _check_size(len(labels), m)
    perm = torch.randperm(len(labels), generator=generator).to(labels.device)
    order = perm[torch.argsort(labels[perm], stable=True)]
    return list(order.cpu().split(m))


def check_partitions(partitions: Sequence[Tensor], n: int) -> list[Tensor]:
    """The partitions as 1-d ``LongTensor``s (CPU) after checking that they partition [0, n).

    Raises:
        ValueError: empty, a block that is empty or not 1-d integer indices, an index out of
            range, repeated, or missing.
    """
    if isinstance(partitions, Tensor) or not isinstance(partitions, Sequence) \
            or len(partitions) == 0:
        raise ValueError("partitions must be a non-empty sequence of index tensors")
    blocks = []
    for i, block in enumerate(partitions):
        block = torch.as_tensor(block)
        if block.ndim != 1 or block.numel() == 0 or block.is_floating_point() \
                or block.dtype == torch.bool:
            raise ValueError(f"partition {i} must be a non-empty 1-d tensor of integer indices, "
                             f"got shape {tuple(block.shape)} and dtype {block.dtype}")
        blocks.append(block.long().cpu())
    flat = torch.cat(blocks)
    if flat.min() < 0 or flat.max() >= n:
        raise ValueError(f"partition indices must lie in [0, {n}), the data points, got values "
                         f"in [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=n)
    if (counts > 1).any():
        raise ValueError(f"index {int((counts > 1).nonzero()[0])} is in two partitions: they "
                         "must be disjoint")
    if (counts == 0).any():
        raise ValueError(f"the partitions hold {len(flat)} of the {n} data points (index "
                         f"{int((counts == 0).nonzero()[0])} is missing): they must cover them all")
    return blocks


def partition_batches(x: Tensor, y: Tensor, partitions: Sequence[Tensor]) -> list[list[tuple]]:
    """One loader per partition, ``[[(x[idx], y[idx])] for idx in partitions]``, the form
    :class:`~marglik.evidence.bounds.PartitionedEvidence` takes."""
    blocks = check_partitions(partitions, len(x))
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} points and y {len(y)}: they must match")
    return [[(x[idx.to(x.device)], y[idx.to(y.device)])] for idx in blocks]

"""The normalised adjacency of a GCN as a sparse tensor.

Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017,
eq. (2): the renormalised propagation matrix

    Â = D̃^{-1/2} (A + I) D̃^{-1/2},   D̃_ii = Σ_j (A + I)_ij,

of an undirected graph with N nodes given as an edge list ``edge_index`` of shape ``(2, E)``.
Each listed pair (i, j) is an undirected edge: both directions are set, duplicates count once
and self-loops in the list are the one added by ``+ I``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marglik.errors import MarglikError

__all__ = ["check_edge_index", "normalized_adjacency", "undirected_edges"]


def check_edge_index(edge_index: Tensor, n_nodes: int) -> Tensor:
    """``edge_index`` checked: integer, shape ``(2, E)``, entries in ``[0, n_nodes)``."""
    if not isinstance(n_nodes, int) or isinstance(n_nodes, bool) or n_nodes < 1:
        raise MarglikError(f"n_nodes must be a positive integer, got {n_nodes!r}")
    if not isinstance(edge_index, Tensor):
        raise MarglikError(f"edge_index must be a tensor of shape (2, E), got {type(edge_index)}")
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool:
        raise MarglikError(f"edge_index must hold integer node ids, got dtype {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise MarglikError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= n_nodes):
        raise MarglikError(
            f"edge_index has node ids outside [0, {n_nodes}): "
            f"min {int(edge_index.min())}, max {int(edge_index.max())}")
    return edge_index.long()


def undirected_edges(edge_index: Tensor, n_nodes: int) -> Tensor:
    """The distinct undirected edges i < j of ``edge_index``, shape ``(2, E')``, sorted.

    Self-loops are dropped; (i, j) and (j, i) are one edge.
    """
    e = check_edge_index(edge_index, n_nodes)
    lo, hi = torch.minimum(e[0], e[1]), torch.maximum(e[0], e[1])
    keep = lo != hi
    key = torch.unique(lo[keep] * n_nodes + hi[keep])
    return torch.stack([key // n_nodes, key % n_nodes])


def normalized_adjacency(edge_index: Tensor, n_nodes: int,
                         dtype: torch.dtype | None = None) -> Tensor:
    """Â = D̃^{-1/2}(A + I)D̃^{-1/2} as a coalesced sparse COO tensor ``(N, N)``.

    Args:
        edge_index: Undirected edges, shape ``(2, E)``, integer node ids in ``[0, N)``.
        n_nodes: N, the number of nodes (isolated nodes keep their self-loop, Â_ii = 1).
        dtype: Floating dtype of the values (default: torch's default dtype).

    Returns:
        Sparse ``(N, N)`` tensor, symmetric, with ``nnz = 2·E' + N`` for E' distinct edges.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise MarglikError(f"dtype must be floating, got {dtype}")
    und = undirected_edges(edge_index, n_nodes)
    loops = torch.arange(n_nodes).expand(2, n_nodes)
    idx = torch.cat([und, und.flip(0), loops], dim=1)
    degree = torch.bincount(idx[0], minlength=n_nodes).to(dtype)
    scale = degree.rsqrt()
    values = scale[idx[0]] * scale[idx[1]]
    return torch.sparse_coo_tensor(idx, values, (n_nodes, n_nodes),
                                   check_invariants=False).coalesce()

"""Graph augmentations for contrastive views: edge dropping and feature masking.

As in GRACE (Zhu et al., ICML GRL+ workshop 2020, §3.2): *removing edges* keeps each edge
independently with probability 1 − p_e; *masking node features* draws one mask m ∈ {0, 1}^D
with m_d ~ Bernoulli(1 − p_f) and multiplies every node's features by it (a feature dimension is
masked for all nodes at once). Both draw from an explicit ``torch.Generator``, so views are
reproducible from a seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marglik.errors import MarglikError

__all__ = ["drop_edges", "mask_features", "two_views"]


def _check_p(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise MarglikError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def drop_edges(edge_index: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Keep each column of ``edge_index`` ``(2, E)`` with probability 1 − p; ``(2, E_kept)``.

    An undirected edge listed once is kept or dropped as a whole (pass each edge once, e.g.
    :func:`~.adjacency.undirected_edges`, for that).
    """
    p = _check_p(p, "edge drop probability")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise MarglikError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    u = torch.rand(edge_index.shape[1], generator=generator, device=edge_index.device)
    return edge_index[:, u >= p]


def mask_features(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero each feature dimension of ``x`` ``(N, D)`` with probability p (one mask for all)."""
    p = _check_p(p, "feature mask probability")
    if x.dim() != 2:
        raise MarglikError(f"node features must have shape (N, D), got {tuple(x.shape)}")
    u = torch.rand(x.shape[1], generator=generator, device=x.device)
    return x * (u >= p).to(x.dtype)


def two_views(x: Tensor, edges: Tensor, n_nodes: int, p_edge: tuple[float, float],
              p_feature: tuple[float, float], generator: torch.Generator | None = None,
              ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Two augmented views ``((x₁, Â₁), (x₂, Â₂))`` of a graph, as GRACE draws them.

    View k drops edges with probability ``p_edge[k]`` and masks features with probability
    ``p_feature[k]``; Â_k is the normalised adjacency of the kept edges (every node keeps its
    self-loop).

    Args:
        x: Node features ``(N, D)``.
        edges: Undirected edges, each listed once, ``(2, E)``.
        n_nodes: N.
        p_edge: Edge drop probabilities of the two views.
        p_feature: Feature mask probabilities of the two views.
        generator: Source of the random draws.
    """
    from marglik.variational.graph.adjacency import normalized_adjacency

    if len(p_edge) != 2 or len(p_feature) != 2:
        raise MarglikError(f"give two probabilities each (one per view), got p_edge={p_edge!r}, "
                           f"p_feature={p_feature!r}")
    views = []
    for pe, pf in zip(p_edge, p_feature):
        kept = drop_edges(edges, pe, generator)
        views.append((mask_features(x, pf, generator),
                      normalized_adjacency(kept, n_nodes, dtype=x.dtype)))
    return views[0], views[1]

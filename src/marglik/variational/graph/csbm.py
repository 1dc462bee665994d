"""A contextual stochastic block model: a graph with known communities and node features.

Deshpande, Sen, Montanari & Mossel, "Contextual Stochastic Block Models", NeurIPS 2018, with C
communities instead of two. N nodes get balanced labels y_i ∈ {0..C−1} in random order; every
pair i < j is an edge independently with probability p_in if y_i = y_j and p_out otherwise;
node features are Gaussian around a class mean,

    x_i = μ_{y_i} + ε_i,   ε_i ~ N(0, I_D),   μ_c = r · g_c / ‖g_c‖,   g_c ~ N(0, I_D),

so r (``mean_distance``) is the norm of every class mean. Everything is drawn from one seeded
``torch.Generator``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from marglik.errors import MarglikError

__all__ = ["GraphData", "contextual_sbm"]


class GraphData(NamedTuple):
    """A node-classification graph: features ``x`` ``(N, D)``, undirected ``edge_index``
    ``(2, E)`` (each edge once, i < j), labels ``y`` ``(N,)``, ``n_classes``."""

    x: Tensor
    edge_index: Tensor
    y: Tensor
    n_classes: int


def contextual_sbm(n_nodes: int = 600, n_classes: int = 3, n_features: int = 20,
                   p_in: float = 0.03, p_out: float = 0.005, mean_distance: float = 1.0,
                   seed: int = 0, dtype: torch.dtype | None = None) -> GraphData:
    """Draw one graph from the contextual SBM of the module docstring.

    Args:
        n_nodes: N.
        n_classes: C (2 ≤ C ≤ N).
        n_features: D.
        p_in: Edge probability within a community.
        p_out: Edge probability between communities.
        mean_distance: r, the norm of each class mean (feature signal strength).
        seed: Seed of the generator.
        dtype: Dtype of the features (default: torch's default dtype).
    """
    for name, v in (("n_nodes", n_nodes), ("n_classes", n_classes), ("n_features", n_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise MarglikError(f"{name} must be a positive integer, got {v!r}")
    if not 2 <= n_classes <= n_nodes:
        raise MarglikError(f"need 2 ≤ n_classes ≤ n_nodes, got {n_classes} and {n_nodes}")
    for name, p in (("p_in", p_in), ("p_out", p_out)):
        if not 0.0 <= p <= 1.0:
            raise MarglikError(f"{name} must be a probability in [0, 1], got {p!r}")
    if not mean_distance >= 0:
        raise MarglikError(f"mean_distance must be non-negative, got {mean_distance!r}")
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n_nodes) % n_classes)[torch.randperm(n_nodes, generator=g)]
    i, j = torch.triu_indices(n_nodes, n_nodes, offset=1)
    prob = torch.where(y[i] == y[j], p_in, p_out)
    keep = torch.rand(prob.shape, generator=g, dtype=torch.float64) < prob
    edge_index = torch.stack([i[keep], j[keep]])
    directions = torch.randn(n_classes, n_features, generator=g, dtype=torch.float64)
    means = mean_distance * directions / directions.norm(dim=1, keepdim=True)
    x = means[y] + torch.randn(n_nodes, n_features, generator=g, dtype=torch.float64)
    return GraphData(x.to(dtype or torch.get_default_dtype()), edge_index, y, n_classes)

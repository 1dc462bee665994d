"""Uncertainty of a node from the disagreement of its contrastive likelihood over positives.

Möllers, Immer, Isufi & Fortuin (AABI 2023) measure uncertainty in contrastive learning by "the
disagreement in likelihood due to different positive samples". We make that precise as follows
(our definition; the paper's exact estimator may differ, see docs/graph-contrastive.md).

For weights θ_s (s = 1..S; draws from q, or the one point estimate) the anchor of node i is its
projection u_i^s on the unaugmented graph. A positive sample m = 1..M is an augmented view of
the graph (edge dropping and feature masking); it gives projections v^{s,m} of all nodes. The
contrastive likelihood of node i under positive m is the InfoNCE probability that the anchor
picks its own positive among the N nodes of that view,

    p_i^{s,m} = exp(θ(u_i^s, v_i^{s,m})/τ) / Σ_k exp(θ(u_i^s, v_k^{s,m})/τ)  ∈ (0, 1),

and the disagreement is the variance over positives, averaged over weight draws,

    D_i = 1/S Σ_s [ 1/M Σ_m (p_i^{s,m} − p̄_i^s)² ],   p̄_i^s = 1/M Σ_m p_i^{s,m}.

D_i = 0 when every positive sample gives the same likelihood; a node whose identification
depends on which edges and features happen to survive has a large D_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marglik.errors import MarglikError
from marglik.variational.graph.adjacency import normalized_adjacency, undirected_edges
from marglik.variational.graph.augment import drop_edges, mask_features
from marglik.variational.graph.contrastive import info_nce_log_likelihood
from marglik.variational.graph.encoder import GCNEncoder

__all__ = ["disagreement", "positive_likelihoods"]


def disagreement(likelihoods: Tensor) -> Tensor:
    """D_i from contrastive likelihoods p ``(S, M, N)`` (or ``(M, N)``, S = 1); shape ``(N,)``.

    The population variance over the M positives (axis −2), averaged over the S weight draws.
    """
    p = likelihoods[None] if likelihoods.dim() == 2 else likelihoods
    if p.dim() != 3:
        raise MarglikError(f"likelihoods must have shape (S, M, N) or (M, N), "
                           f"got {tuple(likelihoods.shape)}")
    if p.shape[1] < 2:
        raise MarglikError(f"disagreement needs at least 2 positive samples, got {p.shape[1]}")
    return p.var(dim=1, unbiased=False).mean(dim=0)


@torch.no_grad()
def positive_likelihoods(encoder: GCNEncoder, x: Tensor, edge_index: Tensor, *,
                         n_positives: int = 20, n_weight_samples: int = 10, tau: float = 0.5,
                         p_edge: float = 0.3, p_feature: float = 0.3,
                         generator: torch.Generator | None = None) -> Tensor:
    """The contrastive likelihoods p_i^{s,m} of every node, shape ``(S, M, N)``.

    Args:
        encoder: A trained encoder; a deterministic one uses S = 1 whatever is asked.
        x: Node features ``(N, D)``.
        edge_index: Undirected edges ``(2, E)``.
        n_positives: M, augmented views per weight draw.
        n_weight_samples: S, weight draws θ_s ~ q.
        tau: Temperature τ (the one used in training).
        p_edge, p_feature: Augmentation probabilities of each positive view.
        generator: Source of weight noise and augmentations.
    """
    for name, k in (("n_positives", n_positives), ("n_weight_samples", n_weight_samples)):
        if not isinstance(k, int) or k < 1:
            raise MarglikError(f"{name} must be a positive integer, got {k!r}")
    n = x.shape[0]
    edges = undirected_edges(edge_index, n)
    adj = normalized_adjacency(edges, n, dtype=x.dtype)
    n_draws = n_weight_samples if encoder.variational else 1
    out = x.new_empty(n_draws, n_positives, n)
    for s in range(n_draws):
        weights = encoder.sample_weights(generator)
        anchor = encoder.project(encoder.embed(x, adj, weights))
        for m in range(n_positives):
            kept = drop_edges(edges, p_edge, generator)
            view_adj = normalized_adjacency(kept, n, dtype=x.dtype)
            view_x = mask_features(x, p_feature, generator)
            positive = encoder.project(encoder.embed(view_x, view_adj, weights))
            out[s, m] = info_nce_log_likelihood(anchor, positive, tau).exp()
    return out

"""A two-layer GCN encoder, deterministic or variational, with a projection head.

    H = φ(Â φ(Â X W₁ + b₁) W₂ + b₂),   Z = g(H) = W₄ φ(W₃ H + b₃) + b₄,

φ = ELU. H are the node embeddings (frozen for the linear evaluation), Z the projections the
contrastive loss compares, as in GRACE (Zhu et al., "Deep Graph Contrastive Representation
Learning", ICML GRL+ workshop 2020, §3: a two-layer GCN with an activation after each layer and a
two-layer MLP head). With ``variational=True`` the two graph layers are
:class:`~.layers.BayesianGCNLayer` (Möllers, Immer, Isufi & Fortuin, AABI 2023); the head stays
deterministic (a point estimate, as for any hyperparameter of the likelihood).

Weights are explicit: :meth:`GCNEncoder.sample_weights` draws one set θ ~ q (the mean for a
deterministic encoder), :meth:`GCNEncoder.embed` applies a set, so both views of one ELBO term
see the same θ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.errors import MarglikError
from marglik.variational.graph.layers import BayesianGCNLayer, GCNLayer, gcn_propagate

__all__ = ["GCNEncoder", "Weights"]

#: one set of graph-layer weights: ``[(W₁, b₁), (W₂, b₂)]``
Weights = list[tuple[Tensor, Tensor | None]]


class GCNEncoder(nn.Module):
    """Two graph convolutions and a projection head.

    Args:
        in_features: D, the node feature size.
        hidden: Width of the first graph layer.
        out_features: Embedding size of the second graph layer.
        variational: Mean-field Gaussian graph layers (else deterministic ones).
        prior_std: s of the N(0, s²) prior (variational only).
        init_std: σ at initialisation (variational only).
        proj_dim: Hidden width of the projection head (default: ``out_features``).
    """

    def __init__(self, in_features: int, hidden: int, out_features: int,
                 variational: bool = False, prior_std: float = 1.0, init_std: float = 1e-2,
                 proj_dim: int | None = None):
        super().__init__()
        self.variational = bool(variational)
        if self.variational:
            self.layers = nn.ModuleList([
                BayesianGCNLayer(in_features, hidden, prior_std, init_std),
                BayesianGCNLayer(hidden, out_features, prior_std, init_std)])
        else:
            self.layers = nn.ModuleList([GCNLayer(in_features, hidden),
                                         GCNLayer(hidden, out_features)])
        proj = out_features if proj_dim is None else proj_dim
        if not isinstance(proj, int) or proj < 1:
            raise MarglikError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        self.head = nn.Sequential(nn.Linear(out_features, proj), nn.ELU(),
                                  nn.Linear(proj, out_features))

    @property
    def in_features(self) -> int:
        return self.layers[0].mean()[0].shape[0]

    def mean_weights(self) -> Weights:
        """The posterior means (the weights of a deterministic encoder)."""
        return [layer.mean() for layer in self.layers]

    def sample_weights(self, generator: torch.Generator | None = None) -> Weights:
        """One reparameterised draw θ ~ q (the mean for a deterministic encoder)."""
        return [layer.sample(generator) for layer in self.layers]

    def embed(self, x: Tensor, adj: Tensor, weights: Weights | None = None) -> Tensor:
        """Node embeddings H ``(N, out_features)`` of features ``x`` ``(N, D)`` and Â ``(N, N)``.

        ``weights`` defaults to :meth:`mean_weights`.
        """
        h = x
        for w, b in self.mean_weights() if weights is None else weights:
            h = F.elu(gcn_propagate(h, adj, w, b))
        return h

    def project(self, h: Tensor) -> Tensor:
        """The projections Z = g(H) ``(N, out_features)`` the contrastive loss compares."""
        return self.head(h)

    def kl(self) -> Tensor:
        """KL(q ‖ p) of the graph layers; 0 for a deterministic encoder."""
        return sum((layer.kl() for layer in self.layers), self.head[0].weight.new_zeros(()))

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        """Embeddings at the posterior mean, ``(N, out_features)``."""
        return self.embed(x, adj)

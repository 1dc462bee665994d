"""The ELBO of the variational graph encoder, and full-batch training on it.

Möllers, Immer, Isufi & Fortuin (AABI 2023) treat the contrastive objective as the
log-likelihood of the encoder weights θ and fit a mean-field q(θ) by variational inference. Per
node (divided by the number of nodes N):

    ELBO/N = E_{q(θ)} E_{views} [ 1/N Σ_i ℓ_i(θ) ] − β · KL(q(θ) ‖ p(θ)) / N,

with ℓ_i GRACE's symmetrised NT-Xent log-likelihood of node i (:mod:`.contrastive`), estimated
with S Monte Carlo draws, each a fresh θ_s ~ q (reparameterised) shared by two fresh augmented
views. The KL is divided by N because the contrastive log-likelihood has one term per node: N is
the size of the "data set", exactly as a classification ELBO divides the KL by the number of
examples when the likelihood is averaged. β = 1 is the ELBO; β < 1 a tempered posterior. For a
deterministic encoder the KL is 0 and the objective is GRACE's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from marglik.errors import MarglikError
from marglik.variational.graph.adjacency import undirected_edges
from marglik.variational.graph.augment import two_views
from marglik.variational.graph.contrastive import nt_xent_log_likelihood
from marglik.variational.graph.encoder import GCNEncoder

__all__ = ["ELBO", "elbo", "train_contrastive"]


class ELBO(NamedTuple):
    """The ELBO per node and its two parts (0-d tensors): ``elbo = log_lik − β·kl / N``."""

    elbo: Tensor
    log_lik: Tensor
    kl: Tensor


def elbo(encoder: GCNEncoder, x: Tensor, edge_index: Tensor, *, tau: float = 0.5,
         p_edge: tuple[float, float] = (0.2, 0.4), p_feature: tuple[float, float] = (0.3, 0.4),
         n_samples: int = 1, kl_weight: float = 1.0,
         generator: torch.Generator | None = None) -> ELBO:
    """Monte Carlo estimate of the ELBO per node (see the module docstring).

    Args:
        encoder: The encoder (variational or deterministic).
        x: Node features ``(N, D)``.
        edge_index: Undirected edges ``(2, E)``.
        tau: Temperature τ of the contrastive likelihood.
        p_edge, p_feature: Augmentation probabilities of the two views.
        n_samples: S, the number of (θ, views) draws.
        kl_weight: β.
        generator: Source of weights noise and augmentations.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise MarglikError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not kl_weight >= 0:
        raise MarglikError(f"kl_weight must be non-negative, got {kl_weight!r}")
    if x.dim() != 2 or x.shape[1] != encoder.in_features:
        raise MarglikError(f"node features must have shape (N, {encoder.in_features}), "
                           f"got {tuple(x.shape)}")
    n = x.shape[0]
    edges = undirected_edges(edge_index, n)
    log_lik = x.new_zeros(())
    for _ in range(n_samples):
        weights = encoder.sample_weights(generator)
        (x1, a1), (x2, a2) = two_views(x, edges, n, p_edge, p_feature, generator)
        u = encoder.project(encoder.embed(x1, a1, weights))
        v = encoder.project(encoder.embed(x2, a2, weights))
        log_lik = log_lik + nt_xent_log_likelihood(u, v, tau).mean()
    log_lik = log_lik / n_samples
    kl = encoder.kl()
    return ELBO(log_lik - kl_weight * kl / n, log_lik, kl)


def train_contrastive(encoder: GCNEncoder, x: Tensor, edge_index: Tensor, *, epochs: int = 200,
                      lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                      **elbo_kwargs) -> list[float]:
    """Maximise :func:`elbo` with full-batch Adam; returns the ELBO per epoch.

    Args:
        encoder: Trained in place.
        x: Node features ``(N, D)``.
        edge_index: Undirected edges ``(2, E)``.
        epochs: Number of Adam steps.
        lr: Learning rate.
        weight_decay: Adam's L2 penalty (GRACE uses one for the deterministic encoder).
        seed: Seeds the generator of weight noise and augmentations.
        **elbo_kwargs: ``tau``, ``p_edge``, ``p_feature``, ``n_samples``, ``kl_weight``.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise MarglikError(f"epochs must be a non-negative integer, got {epochs!r}")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    opt = torch.optim.Adam(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    encoder.train()
    for _ in range(epochs):
        opt.zero_grad()
        terms = elbo(encoder, x, edge_index, generator=generator, **elbo_kwargs)
        (-terms.elbo).backward()
        opt.step()
        history.append(float(terms.elbo.detach()))
    encoder.eval()
    return history

"""Ranking feature pairs for LA-NAM's second stage by posterior mutual information.

Bouchiat et al. (AABI 2023): after stage 1, a Laplace posterior with a *full* (joint) GGN over
the subnetworks couples the feature functions: two features whose functions the data cannot
tell apart additively have correlated posteriors. For features i, j at a training input x_n,
the linearised posterior gives a joint Gaussian of (f_i(x_n,i), f_j(x_n,j)) with correlation

    ρ_ij(x_n) = [J_i Σ_ij J_jᵀ] / sqrt([J_i Σ_ii J_iᵀ] [J_j Σ_jj J_jᵀ]),

and mutual information I_ij(x_n) = −½ log(1 − ρ_ij(x_n)²). Pairs are ranked by its mean over
the training inputs, and the top k get an interaction subnetwork.

Here the joint posterior is the full-GGN Laplace over the *last-layer weights* of all feature
subnetworks (D·C·H parameters, each block with its subnetwork's learned δ), the other weights
held at θ*; the scores use output channel 0 (the mean, the logit, or η1 for heteroscedastic
regression). All pairs are scored at once: per input one (D, D) covariance J_n Σ J_nᵀ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.applications.additive.model import AdditiveNet
from marglik.posterior import Laplace

if TYPE_CHECKING:
    from marglik.applications.additive.fit import AdditiveFit

__all__ = [
    "correlation_mutual_information",
    "last_layer_jacobian",
    "last_layer_posterior",
    "pair_mutual_information",
    "top_pairs",
]


def correlation_mutual_information(cov: Tensor, eps: float = 1e-12) -> Tensor:
    """Mutual information −½ log(1 − ρ²) of every pair of jointly Gaussian variables.

    Args:
        cov: covariances (..., G, G) (symmetrised first, against round-off).

    Returns:
        (..., G, G), symmetric, zero on the diagonal.
    """
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    std = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    rho = cov / (std[..., :, None] * std[..., None, :]).clamp_min(eps)
    rho2 = rho.square().clamp(max=1 - eps)
    mi = -0.5 * torch.log1p(-rho2)
    eye = torch.eye(cov.shape[-1], dtype=torch.bool, device=cov.device)
    return mi.masked_fill(eye, 0.0)


def last_layer_posterior(fit: AdditiveFit, X: Tensor, y: Tensor) -> Laplace:
    """Full-GGN Laplace over the last-layer weights of the feature subnetworks, at θ*.

    Each last-layer weight tensor is its own prior group with its subnetwork's learned δ; σ
    (regression) is the learned one.
    """
    model = fit.model
    names = model.features.last_layer_names("features.")
    la = Laplace(model, fit.la.likelihood, subset_of_weights="subnetwork", subnetwork=names,
                 hessian_structure="full", prior_precision=fit.feature_precisions.clone(),
                 sigma_noise=fit.la.sigma_noise if fit.likelihood == "regression" else 1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y.reshape(len(X), 1)
                                                                        .to(X.dtype)),
                                         batch_size=1024)
    la.fit(loader)
    return la


def last_layer_jacobian(model: AdditiveNet, X: Tensor) -> Tensor:
    """∂f_g(x_n)[0] / ∂(last-layer weights of all feature subnetworks), (N, D, D·C·H).

    f_g = W_g φ_g(x) + b_g with W_g (C, H) row-major in θ, so the row of f_g[0] is φ_g(x) in
    the (0, :) entries of block g and zero elsewhere (φ_g: the last hidden layer).
    """
    feats = model.features
    h = X.unsqueeze(-1)
    with torch.no_grad():
        for layer in feats.layers[:-1]:
            h = feats.act(layer(h))
    n, d, hidden = h.shape
    c = feats.widths[-1]
    J = h.new_zeros(n, d, d, c, hidden)
    idx = torch.arange(d)
    J[:, idx, idx, 0] = h
    return J.reshape(n, d, d * c * hidden)


def pair_mutual_information(fit: AdditiveFit, X: Tensor, y: Tensor) -> Tensor:
    """Mean posterior mutual information of every feature pair, (D, D), symmetric.

    Args:
        fit: a stage-1 :class:`~marglik.applications.additive.fit.AdditiveFit`.
        X, y: its training data (N, D), (N,) or (N, 1).
    """
    model = fit.model
    la = last_layer_posterior(fit, X, y)
    J = last_layer_jacobian(model, X).to(la.mean.dtype)  # (N, D, P_ll)
    cov = J @ la.posterior_covariance.to(J) @ J.transpose(1, 2)  # (N, D, D)
    return correlation_mutual_information(cov).mean(0)


def top_pairs(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The k pairs (i < j) of highest score, best first.

    Args:
        scores: (D, D) symmetric pair scores.
        k: 0 ≤ k ≤ D(D−1)/2.
    """
    d = scores.shape[0]
    if scores.dim() != 2 or scores.shape[1] != d:
        raise ValueError(f"scores must be a square matrix, got {tuple(scores.shape)}")
    n_pairs = d * (d - 1) // 2
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_pairs:
        raise ValueError(f"k must be an integer in [0, {n_pairs}], got {k!r}")
    i, j = torch.triu_indices(d, d, offset=1)
    order = torch.argsort(scores[i, j], descending=True, stable=True)[:k]
    return [(int(i[o]), int(j[o])) for o in order]

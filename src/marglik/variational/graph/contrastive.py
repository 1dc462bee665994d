"""Contrastive log-likelihoods between two views of the nodes.

With projections u_i (view 1) and v_i (view 2), cosine similarity θ(a, b) = aᵀb / (‖a‖‖b‖) and
temperature τ:

* **InfoNCE** (Oord, Li & Vinyals, arXiv 1807.03748, 2018), the log-probability that anchor u_i
  picks its positive v_i among the N candidates of the other view,

      log p(i | u_i) = θ(u_i, v_i)/τ − log Σ_k exp(θ(u_i, v_k)/τ);

* **GRACE's NT-Xent** (Zhu et al., ICML GRL+ workshop 2020, eq. 1; SimCLR's loss on graphs),
  which adds the other nodes of the anchor's own view as negatives,

      ℓ(u_i, v_i) = θ(u_i, v_i)/τ − log[Σ_k exp(θ(u_i, v_k)/τ) + Σ_{k≠i} exp(θ(u_i, u_k)/τ)],

  symmetrised: ½[ℓ(u_i, v_i) + ℓ(v_i, u_i)] per node. The training objective uses it.

Both return one value per node ``(N,)``: −mean is the usual loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marglik.errors import MarglikError

__all__ = ["cosine_scores", "info_nce_log_likelihood", "nt_xent_log_likelihood"]


def _check_views(u: Tensor, v: Tensor, tau: float) -> None:
    if u.dim() != 2 or u.shape != v.shape:
        raise MarglikError(f"the two views must have the same shape (N, D), got "
                           f"{tuple(u.shape)} and {tuple(v.shape)}")
    if not float(tau) > 0:
        raise MarglikError(f"temperature tau must be positive, got {tau!r}")


def cosine_scores(u: Tensor, v: Tensor, tau: float) -> Tensor:
    """θ(u_i, v_k)/τ for all pairs, shape ``(N, M)`` from ``u`` ``(N, D)`` and ``v`` ``(M, D)``."""
    return F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).transpose(-1, -2) / tau


def info_nce_log_likelihood(anchor: Tensor, positive: Tensor, tau: float) -> Tensor:
    """log p(i | anchor_i): anchor i picks positive i among the N rows of ``positive``; ``(N,)``.

    Args:
        anchor: Projections ``(N, D)``.
        positive: Projections of the same nodes in another view ``(N, D)``.
        tau: Temperature τ > 0.
    """
    _check_views(anchor, positive, tau)
    return torch.log_softmax(cosine_scores(anchor, positive, tau), dim=1).diagonal()


def _one_side(u: Tensor, v: Tensor, tau: float) -> Tensor:
    between = cosine_scores(u, v, tau)  # (N, N), diagonal = positives
    within = cosine_scores(u, u, tau)
    eye = torch.eye(u.shape[0], dtype=torch.bool, device=u.device)
    within = within.masked_fill(eye, float("-inf"))
    log_denominator = torch.logsumexp(torch.cat([between, within], dim=1), dim=1)
    return between.diagonal() - log_denominator


def nt_xent_log_likelihood(u: Tensor, v: Tensor, tau: float) -> Tensor:
    """GRACE's symmetrised per-node NT-Xent log-likelihood, shape ``(N,)``.

    Args:
        u: Projections of view 1, ``(N, D)``.
        v: Projections of view 2, ``(N, D)``.
        tau: Temperature τ > 0.
    """
    _check_views(u, v, tau)
    return 0.5 * (_one_side(u, v, tau) + _one_side(v, u, tau))

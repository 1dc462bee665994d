"""Post-hoc evidence maximisation over the prior precision (and the observation noise).

MacKay's evidence framework with the Laplace evidence (Immer et al., ICML 2021): Adam on the
negative log marginal likelihood in log space. The curvature is fitted once; each step only
re-evaluates the cached eigendecompositions, O(P) for scalar/layer-wise priors with
full/KFAC/diag structures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import trange

if TYPE_CHECKING:
    from marglik.posterior import Laplace

PRIOR_STRUCTURES = ("scalar", "layerwise", "diagonal")


def prior_shape(la: Laplace, prior_structure: str) -> tuple[int, ...]:
    """Shape of δ for a prior structure: () scalar, (tensors,) layer-wise, (P,) diagonal."""
    shapes = {"scalar": (), "layerwise": (len(la.subset.names),), "diagonal": (la.n_params,)}
    if prior_structure not in shapes:
        raise ValueError(
            f"unknown prior_structure {prior_structure!r}: use one of {PRIOR_STRUCTURES}"
        )
    return shapes[prior_structure]


def optimize_hyperparameters(
    la: Laplace,
    prior_structure: str | None = None,
    tune_sigma: bool = False,
    n_steps: int = 100,
    lr: float = 0.1,
    init_prior_prec: float | Tensor | None = None,
    progress: bool = False,
) -> dict[str, list]:
    """Maximise ``la.log_marginal_likelihood`` over log δ (and log σ), then store the optimum.

    Args:
        prior_structure: ``"scalar" | "layerwise" | "diagonal"``; default keeps δ's shape.
        tune_sigma: also learn σ (regression only, scalar σ).
        init_prior_prec: starting δ (default: the current one, broadcast to the shape).

    Returns:
        history with per-step ``"log_marglik"``, ``"prior_precision"`` and ``"sigma_noise"``.
    """
    la._require_fit()
    current = la.prior_precision
    if prior_structure is None:
        shape = tuple(current.shape)
    else:
        shape = prior_shape(la, prior_structure)
    start = (current if init_prior_prec is None else torch.as_tensor(init_prior_prec)).detach()
    start = start.to(la.H.dtype)
    if start.shape == shape:
        pass
    elif start.numel() == 1:
        start = start.reshape(()).expand(shape)
    elif shape == ():
        start = start.log().mean().exp()  # geometric mean of a finer prior
    elif shape == (la.n_params,):
        start = la.expand_prior(start)
    else:
        raise ValueError(f"cannot start a {prior_structure} prior from {tuple(start.shape)} values")
    log_prior = start.log().clone().requires_grad_(True)
    params = [log_prior]
    if tune_sigma:
        if la.sigma_noise is None:
            raise ValueError(f"tune_sigma needs a regression likelihood, not {la.likelihood.task}")
        if la.sigma_noise.numel() > 1:
            raise ValueError("tune_sigma supports a scalar sigma_noise only")
        log_sigma = (
            la.sigma_noise.detach().to(la.H.dtype).log().reshape(()).clone().requires_grad_(True)
        )
        params.append(log_sigma)
    optimizer = torch.optim.Adam(params, lr=lr)
    history: dict[str, list] = {"log_marglik": [], "prior_precision": [], "sigma_noise": []}
    for _ in trange(n_steps, disable=not progress, desc="evidence"):
        optimizer.zero_grad()
        sigma = log_sigma.exp() if tune_sigma else None
        neg = -la.log_marginal_likelihood(log_prior.exp(), sigma)
        neg.backward()
        optimizer.step()
        history["log_marglik"].append(-neg.item())
        history["prior_precision"].append(log_prior.detach().exp().tolist())
        if tune_sigma:
            history["sigma_noise"].append(log_sigma.detach().exp().item())
    la.prior_precision = log_prior.detach().exp()
    if tune_sigma:
        la.sigma_noise = log_sigma.detach().exp()
    return history

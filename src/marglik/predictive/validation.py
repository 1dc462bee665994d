"""Tuning the prior precision on validation data: laplace-torch's grid search.

``optimize_prior_precision(method="gridsearch", val_loader=...)`` tries the scalar δ on a
log-spaced grid and keeps the one whose predictive has the lowest validation loss. Written against
the :class:`~marglik.posterior.base.Posterior` interface (its ``__call__`` is the predictive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from marglik.curvature.batches import batches

if TYPE_CHECKING:
    from marglik.posterior.base import Posterior

__all__ = ["gridsearch_prior_precision", "validation_loss"]


def gridsearch_prior_precision(
    posterior: Posterior,
    val_loader: Iterable,
    loss: Callable[..., Any] | None,
    log_min: float,
    log_max: float,
    grid_size: int,
    pred_type: str,
    link_approx: str,
    n_samples: int,
    progress: bool,
) -> dict[str, list]:
    """Set δ to the grid point with the lowest validation loss; returns the grid and losses.

    See :meth:`marglik.posterior.base.Posterior.optimize_prior_precision` for the arguments.
    """
    posterior.require_fit()
    classify = posterior.likelihood.task in ("classification", "binary")
    grid = torch.logspace(log_min, log_max, grid_size, dtype=torch.float64)
    keys = {k: getattr(posterior, k) for k in ("dict_key_x", "dict_key_y") if hasattr(posterior, k)}
    data = list(batches(val_loader, posterior.model, **keys))
    if not data:
        raise ValueError("the validation loader is empty")
    before = posterior.prior_precision
    losses: list[float] = []
    try:
        for delta in tqdm(grid, disable=not progress, desc="grid search"):
            posterior.prior_precision = delta.to(posterior.dtype)
            try:
                value = validation_loss(
                    posterior, data, loss, classify, pred_type, link_approx, n_samples
                )
            except torch.linalg.LinAlgError:  # e.g. a Cholesky factor of a singular matrix
                value = math.inf
            losses.append(value if math.isfinite(value) else math.inf)
    except BaseException:
        posterior.prior_precision = before
        raise
    best = min(range(len(losses)), key=losses.__getitem__)
    if not math.isfinite(losses[best]):
        posterior.prior_precision = before
        raise ValueError("grid search: the validation loss is not finite for any δ")
    posterior.prior_precision = grid[best].to(posterior.dtype)
    return {"prior_precision": grid.tolist(), "loss": losses}


def validation_loss(posterior: Posterior, data: list, loss: Callable[..., Any] | None,
                    classify: bool, pred_type: str, link_approx: str, n_samples: int) -> float:
    """The loss of the current predictive on the validation batches (lower is better)."""
    kw = {"link_approx": link_approx} if classify else {}
    online = loss is not None and all(
        hasattr(loss, a) for a in ("reset", "update", "compute")
    )
    if online:
        loss.reset()
    outputs, targets = [], []
    for x, y in data:
        out = posterior(x, pred_type=pred_type, n_samples=n_samples, **kw)
        if online:
            if isinstance(out, tuple):
                try:
                    loss.update(*out, y)
                except TypeError:  # a metric of (prediction, target) only
                    loss.update(out[0], y)
            else:
                loss.update(out, y)
        else:
            outputs.append(out)
            targets.append(y)
    if online:
        return float(torch.as_tensor(loss.compute()).sum())
    y = torch.cat(targets)
    if classify:
        probs = torch.cat(outputs)
        if loss is not None:
            return float(loss(probs, y))
        return float(_categorical_nll(probs, y, posterior.likelihood.task == "binary"))
    mean = torch.cat([o[0] for o in outputs])
    var = torch.cat([o[1] for o in outputs])
    if loss is not None:
        return float(loss(mean, var, y))
    if posterior.sigma_noise is None:
        raise ValueError(
            f"grid search needs loss=... for a {type(posterior.likelihood).__name__} likelihood"
        )
    return float(_gaussian_nll(mean, var, posterior.sigma_noise, y))


def _categorical_nll(probs: Tensor, y: Tensor, binary: bool) -> Tensor:
    """Mean −log p(y) of predictive probabilities (B, ..., C), or p(y=1) (B, ...) if binary."""
    tiny = torch.finfo(probs.dtype).tiny
    if binary:
        y = y.reshape(probs.shape).to(probs)
        return -(y * probs.clamp_min(tiny).log()
                 + (1 - y) * (1 - probs).clamp_min(tiny).log()).mean()
    logp = probs.clamp_min(tiny).log().reshape(-1, probs.shape[-1])
    return -logp.gather(1, y.reshape(-1, 1).long().to(logp.device)).mean()


def _gaussian_nll(mean: Tensor, var: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
    """Mean −log N(y; f_mean, f_var + σ²I) over inputs, f_var (B, D, D)."""
    B, D = mean.shape[0], var.shape[-1]
    sigma = sigma.detach().to(var).reshape(-1)
    noise = sigma.repeat(D // sigma.numel())
    cov = var + torch.diag_embed(noise.square().expand(B, D))
    dist = torch.distributions.MultivariateNormal(mean.reshape(B, D), covariance_matrix=cov)
    return -dist.log_prob(y.reshape(B, D).to(mean)).mean()

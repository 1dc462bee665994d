"""Online evidence maximisation during training (Immer et al., ICML 2021, Algorithm 1).

For every epoch, train θ by Adam on the mean NLL + ½ θᵀdiag(δ)θ / N with the current δ (and σ)
held fixed; every ``marglik_frequency`` epochs after ``n_epochs_burnin``, fit the Laplace curvature
at the current θ and take ``n_hypersteps`` Adam steps on −log Z over log δ (and log σ), curvature
fixed. The (θ, δ, σ) with the best evidence is kept; at the end it is restored and refitted.
Resuming from a checkpoint reproduces an uninterrupted run exactly (the global RNG state and a
DataLoader's own generator are saved).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from marglik.evidence import prior_shape
from marglik.likelihoods import Gaussian, Likelihood, get_likelihood
from marglik.posterior import Laplace
from marglik.training import _n_data, map_loss


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str | Likelihood = "classification",
    hessian_structure: str = "kron",
    prior_structure: str = "layerwise",
    n_epochs: int = 100,
    lr: float = 1e-3,
    lr_hyp: float = 1e-1,
    n_epochs_burnin: int = 0,
    marglik_frequency: int = 1,
    n_hypersteps: int = 100,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    tune_sigma: bool | None = None,
    laplace_kwargs: dict[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    callback: Callable[[int, nn.Module, Laplace | None, dict], None] | None = None,
    progress: bool = False,
) -> tuple[Laplace, nn.Module, dict[str, list]]:
    """Train ``model`` and its hyperparameters jointly by the Laplace evidence.

    Args:
        model: the network (trained in place; all its parameters are in the posterior).
        train_loader: a re-iterable DataLoader of (x, y).
        likelihood: ``"classification" | "regression" | "binary"`` or a Likelihood object
            (e.g. :class:`~marglik.likelihoods.NaturalGaussian` for heteroscedastic regression).
        hessian_structure: ``"kron" | "full" | "diag"`` (``"lowrank"`` works but is slow).
        prior_structure: ``"scalar" | "layerwise" | "diagonal"``.
        n_epochs, lr: epochs and Adam learning rate of θ.
        lr_hyp, n_hypersteps: Adam on the hyperparameters, steps per evidence update.
        n_epochs_burnin, marglik_frequency: B and F of Algorithm 1.
        tune_sigma: learn σ (default: True for a Gaussian likelihood).
        laplace_kwargs: further :class:`~marglik.Laplace` arguments (e.g. ``kfac_approx``).
        checkpoint: a file path; the state after every epoch is saved there (``torch.save``,
            loadable with ``weights_only=True``) and, if it exists, training resumes from it.
        callback: called as ``callback(epoch, model, la, history)`` after every epoch.

    Returns:
        (la, model, history): the fitted Laplace at the best-evidence state, the model holding
        those weights, and per-epoch lists ``"loss"``, ``"log_marglik"`` (NaN when not
        evaluated), ``"prior_precision"``, ``"sigma_noise"``.
    """
    lik = get_likelihood(likelihood, sigma_noise_init)
    if tune_sigma is None:
        tune_sigma = isinstance(lik, Gaussian)
    if tune_sigma and not isinstance(lik, Gaussian):
        raise ValueError(f"tune_sigma needs a Gaussian likelihood, not {lik.task}")
    if marglik_frequency < 1 or n_epochs < 1:
        raise ValueError("n_epochs and marglik_frequency must be at least 1")
    n_data = _n_data(train_loader)
    if n_data == 0:
        raise ValueError("the data loader is empty")
    laplace_kwargs = dict(laplace_kwargs or {})

    def new_laplace(delta: Tensor, sigma: Tensor | None) -> Laplace:
        kw = {"sigma_noise": sigma} if sigma is not None else {}
        return Laplace(
            model, lik, "all", hessian_structure, prior_precision=delta, **kw, **laplace_kwargs
        )

    la = new_laplace(torch.tensor(prior_prec_init), None)
    dtype = next(model.parameters()).dtype
    log_prior = torch.full(prior_shape(la, prior_structure), math.log(prior_prec_init), dtype=dtype)
    log_prior.requires_grad_(True)
    hypers = [log_prior]
    log_sigma = None
    if tune_sigma:
        log_sigma = torch.tensor(math.log(sigma_noise_init), dtype=dtype, requires_grad=True)
        hypers.append(log_sigma)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    hyper_optimizer = torch.optim.Adam(hypers, lr=lr_hyp)
    history: dict[str, list] = {
        "loss": [],
        "log_marglik": [],
        "prior_precision": [],
        "sigma_noise": [],
    }
    best: dict[str, Any] = {"log_marglik": -math.inf}
    start = 0
    loader_rng = getattr(train_loader, "generator", None)  # a DataLoader's own shuffling RNG

    if checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        with torch.no_grad():
            log_prior.copy_(state["log_prior"])
            if log_sigma is not None:
                log_sigma.copy_(state["log_sigma"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        torch.set_rng_state(state["rng"])
        if loader_rng is not None:
            loader_rng.set_state(state["loader_rng"])

    param = next(model.parameters())
    bar = trange(start, n_epochs, disable=not progress, desc="marglik training")
    for epoch in bar:
        delta = log_prior.detach().exp()
        if log_sigma is not None:
            lik.sigma = log_sigma.detach().exp()
        model.train()
        total, batches = 0.0, 0
        for x, y in train_loader:
            x = x.to(param.device, param.dtype if x.is_floating_point() else None)
            optimizer.zero_grad()
            loss = map_loss(model, lik, x, y.to(param.device), delta, n_data)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history["loss"].append(total / batches)

        log_marglik = math.nan
        if epoch >= n_epochs_burnin and (epoch - n_epochs_burnin) % marglik_frequency == 0:
            sigma = log_sigma.detach().exp() if log_sigma is not None else None
            la = new_laplace(delta, sigma).fit(train_loader)
            for _ in range(n_hypersteps):
                hyper_optimizer.zero_grad()
                s = log_sigma.exp() if log_sigma is not None else None
                neg = -la.log_marginal_likelihood(log_prior.exp(), s)
                neg.backward()
                hyper_optimizer.step()
            s = log_sigma.detach().exp() if log_sigma is not None else None
            log_marglik = la.log_marginal_likelihood(log_prior.detach().exp(), s).item()
            if log_marglik > best["log_marglik"]:
                best = {
                    "log_marglik": log_marglik,
                    "model": copy.deepcopy(model.state_dict()),
                    "log_prior": log_prior.detach().clone(),
                    "log_sigma": None if log_sigma is None else log_sigma.detach().clone(),
                }
        history["log_marglik"].append(log_marglik)
        history["prior_precision"].append(log_prior.detach().exp().tolist())
        history["sigma_noise"].append(
            None if log_sigma is None else log_sigma.detach().exp().item()
        )
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", log_marglik=f"{log_marglik:.1f}")
        if checkpoint is not None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "hyper_optimizer": hyper_optimizer.state_dict(),
                    "log_prior": log_prior.detach(),
                    "log_sigma": None if log_sigma is None else log_sigma.detach(),
                    "history": history,
                    "best": best,
                    "epoch": epoch,
                    "rng": torch.get_rng_state(),
                    "loader_rng": None if loader_rng is None else loader_rng.get_state(),
                },
                checkpoint,
            )
        if callback is not None:
            callback(epoch, model, la, history)

    if "model" in best:
        model.load_state_dict(best["model"])
        delta = best["log_prior"].exp()
        sigma = None if best["log_sigma"] is None else best["log_sigma"].exp()
    else:  # no evidence evaluated (burn-in covered every epoch): keep the last state
        delta = log_prior.detach().exp()
        sigma = None if log_sigma is None else log_sigma.detach().exp()
    if sigma is not None:
        lik.sigma = sigma
    model.eval()
    la = new_laplace(delta, sigma).fit(train_loader)
    return la, model, history


def select_architecture(
    candidates: dict[str, Callable[[], nn.Module]],
    train_loader: Iterable,
    likelihood: str | Likelihood = "classification",
    **kwargs: Any,
) -> tuple[str, dict[str, float]]:
    """Train every candidate with :func:`marglik_training`; pick the best converged evidence.

    Returns:
        (name of the best candidate, {name: converged log marginal likelihood}).
    """
    if not candidates:
        raise ValueError("no candidate architectures given")
    scores = {}
    for name, make in candidates.items():
        la, _, _ = marglik_training(make(), train_loader, copy.deepcopy(likelihood), **kwargs)
        scores[name] = la.log_marginal_likelihood().item()
    return max(scores, key=scores.get), scores

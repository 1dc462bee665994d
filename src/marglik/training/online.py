"""Online evidence maximisation during training (Immer et al., ICML 2021, Algorithm 1).

For every epoch, train θ by Adam on the mean NLL + ½ θᵀdiag(δ)θ / N with the current δ (and σ)
held fixed; every ``marglik_frequency`` epochs after ``n_epochs_burnin``, fit the Laplace curvature
at the current θ and take ``n_hypersteps`` Adam steps on −log Z over log δ (and log σ), curvature
fixed. The (θ, δ, σ) with the best evidence is kept; at the end it is restored and refitted.
Resuming from a checkpoint reproduces an uninterrupted run exactly (the global RNG state and a
DataLoader's own generator are saved).

Further differentiable hyperparameters h that the model's forward pass or the likelihood uses
(a learned input scaling, augmentation parameters) can be registered. The evidence

    log Z(h) = log p(D | θ*, h) − ½ (θ*−μ0)ᵀP0(θ*−μ0) − ½ (log det(H(h)/T + P0) − log det P0)

depends on h through the data fit and the curvature, so the curvature is refitted with an
autograd graph to h (θ* held at its current value) before every hyper-step.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from marglik.curvature.batches import DICT_KEY_X, DICT_KEY_Y, split_batch, to_model
from marglik.evidence.optimize import HyperparameterStep
from marglik.likelihoods import Gaussian, Likelihood, get_likelihood
from marglik.posterior import Laplace
from marglik.training import checkpoint as saved_state
from marglik.training.hypergradients import check_hyper_options, estimate_hyper_gradient
from marglik.training.hyperparameters import (
    EVIDENCES,
    FirstBatches,
    check_hyperparameters,
    cycled_batches,
    differentiable_evidence,
    minibatch_bound,
)
from marglik.training.map import _n_data, map_loss
from marglik.training.optimizers import make_optimizer, optimizer_arguments


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str | Likelihood = "classification",
    hessian_structure: str = "kron",
    prior_structure: str = "layerwise",
    n_epochs: int = 100,
    lr: float | None = None,
    lr_hyp: float = 1e-1,
    n_epochs_burnin: int = 0,
    marglik_frequency: int = 1,
    n_hypersteps: int | None = None,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    tune_sigma: bool | None = None,
    laplace_kwargs: dict[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    callback: Callable[[int, nn.Module, Laplace | None, dict], None] | None = None,
    progress: bool = False,
    hyperparameters: Tensor | Iterable[Tensor] | None = None,
    hyper_batches: int | None = None,
    dict_key_x: str = DICT_KEY_X,
    dict_key_y: str = DICT_KEY_Y,
    *,
    evidence: str = "laplace",
    bound_loader: Iterable | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: type | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    returns: str = "history",
    hyper_gradient: str = "refit",
    lr_hyperparameters: float | None = None,
    hyper_scheduler_cls: type | None = None,
    hyper_scheduler_kwargs: dict[str, Any] | None = None,
    stop: Callable[[int, dict], bool] | None = None,
) -> (tuple[Laplace, nn.Module, dict[str, list]]
      | tuple[Laplace, nn.Module, list[float], list[float]]):
    """Train ``model`` and its hyperparameters jointly by the Laplace evidence.

    Args:
        model: the network (trained in place; all its parameters except registered
            ``hyperparameters`` are in the posterior).
        train_loader: a re-iterable DataLoader of batches as :class:`~marglik.Laplace` takes.
        likelihood: ``"classification" | "regression" | "binary"`` or a Likelihood object
            (e.g. :class:`~marglik.likelihoods.NaturalGaussian` for heteroscedastic regression).
        hessian_structure: ``"kron" | "full" | "diag"`` (``"lowrank"`` works but is slow).
        prior_structure: ``"scalar" | "layerwise" | "diagonal"``; ``"layerwise"`` is one δ per
            prior group: per parameter tensor, or per group of
            ``laplace_kwargs["prior_groups"]`` (the MAP prior term then uses the same groups).
        n_epochs, lr: epochs and learning rate of θ's optimizer (default: 1e-3 for Adam, or
            ``optimizer_kwargs["lr"]``; giving both raises).
        lr_hyp, n_hypersteps: Adam on the hyperparameters and its steps per evidence update
            (default 100; 10 with ``evidence="bound"``).
        n_epochs_burnin, marglik_frequency: B and F of Algorithm 1.
        tune_sigma: learn σ (default: True for a Gaussian likelihood).
        laplace_kwargs: further :class:`~marglik.Laplace` arguments (e.g. ``kfac_approx``).
        checkpoint: a file path; the state after every epoch is saved there (``torch.save``,
            loadable with ``weights_only=True``) and, if it exists, training resumes from it.
        callback: called as ``callback(epoch, model, la, history)`` after every epoch.
        stop: called as ``stop(epoch, history)`` after every epoch (after ``callback``);
            training ends when it returns True, and ``n_epochs`` is then a maximum, e.g.
            :class:`~marglik.training.stopping.EvidencePlateau` (the evidence has levelled off).
        progress: show a tqdm bar over epochs.
        hyperparameters: further hyperparameters h learned by the evidence: a leaf tensor or an
            iterable of leaf tensors with ``requires_grad=True`` that the model's forward pass
            or the likelihood uses, e.g. the log-scales of a learned input transformation.
            They may be parameters of ``model`` (then they are not weights: they are left out
            of the posterior, of the prior term and of θ's optimizer) or tensors held outside
            it; they must act in eval mode, where the curvature is fitted. Adam with
            ``lr_hyp`` updates them together with log δ and log σ. Each of the
            ``n_hypersteps`` steps refits the curvature at the current θ with a graph to h
            (exact GGN, ``hessian_structure`` ``"full" | "kron" | "diag"``; log δ and log σ
            then step on that refitted curvature too), so an evidence update costs
            ``n_hypersteps`` differentiable passes (with the backward pass about 1.5–3 times
            a plain fit each, holding the graph of the batches used) plus one plain fit for
            the new evidence.
            The h-gradient at fixed θ is the total one only at the mode θ*(h) (envelope
            theorem); away from it the data fit pulls h back towards the value θ was trained
            for. Prefer few steps per update (e.g. ``n_hypersteps=1``), frequent updates and θ
            trained close to convergence in between: the fixed point of the alternation is the
            joint evidence optimum.
        hyper_batches: with ``hyperparameters``, fit the differentiable curvature on only the
            first ``hyper_batches`` batches of a fresh pass over ``train_loader`` (different
            batches per step for a shuffling loader). ``"refit"``: the n of N samples stand for
            the data set: curvature and data fit are scaled by N/n, a cheaper, noisier (biased)
            evidence. ``"minibatch"`` (default 1 batch) and ``"jvp"`` (default all): the
            batches of the unbiased gradient estimate.
        hyper_gradient: how h's gradient is found (:mod:`marglik.training.hypergradients`,
            LILA, NeurIPS 2022): ``"refit"`` (above: every step refits with a graph, h steps
            with δ and σ); ``"minibatch"`` or ``"jvp"``: per evidence update one plain fit of
            all the data, ``n_hypersteps`` steps of δ, σ on it, then one step of h by the
            gradient at the full-data factors through the hyper batches' differentiable
            factors (``"minibatch"``: fitted together; ``"jvp"``: one at a time, so memory of
            one batch). Exact over all the data, unbiased over fewer. The epoch's evidence and
            best state are then those of the fit, with h before its step.
        lr_hyperparameters, hyper_scheduler_cls, hyper_scheduler_kwargs: h's own Adam learning
            rate (default ``lr_hyp``) and scheduler ``hyper_scheduler_cls(optimizer,
            **kwargs)``, stepped once per evidence update (e.g. ``CosineAnnealingLR``).
        evidence: what the hyperparameters maximise (:mod:`marglik.training.hyperparameters`).
            ``"laplace"``: the Laplace evidence over all the training data, refitted every
            evidence epoch. ``"bound"``: the stochastic data-partitioned lower bound (Immer et
            al., ICML 2023): in every evidence epoch, ``n_hypersteps`` steps, each on the next
            batch b (M points) of a fresh pass over ``bound_loader``: its unbiased estimate of
            the bound (N/M)(log p(D_b|θ) − ½ log det(P0 + H_b/T)/P0) − ½ θᵀP0θ, so a
            hyperparameter step costs one batch's curvature instead of a pass over the data;
            with ``hyperparameters`` the batch is fitted with a graph to them. The epoch's
            ``log_marglik`` (which also picks the best state) is then the mean of the steps'
            estimates, a noisy estimate of the bound (below the evidence on average).
        bound_loader: with ``evidence="bound"``, the batches its estimates come from (default
            ``train_loader``; it is cycled if it has fewer than ``n_hypersteps`` batches).
            Larger batches, or batches of few classes each, give a tighter bound (ICML 2023).
        dict_key_x, dict_key_y: keys of dict batches as in :class:`~marglik.Laplace`, used
            here and passed to every Laplace (give them here, not in ``laplace_kwargs``).
        optimizer_cls, optimizer_kwargs, scheduler_cls, scheduler_kwargs: θ's optimizer
            ``optimizer_cls(params, **optimizer_kwargs)`` (default Adam; a ``weight_decay`` is
            set to 0 with a warning: the prior is the weight decay) and an optional scheduler,
            stepped after every batch and saved in ``checkpoint``, as in laplace-torch.
        temperature: T of p(θ|D) ∝ p(D|θ)^{1/T} p(θ), as in :class:`Laplace`: the MAP step
            minimises the mean NLL + T·θᵀdiag(δ)θ/(2N) and each Laplace gets T.
        fix_sigma_noise, progress_bar: laplace-torch's names for ``tune_sigma=False`` (σ stays
            ``sigma_noise_init``) and ``progress``.
        returns: ``"history"`` or ``"laplace-torch"``: (la, model, margliks, losses), with
            ``margliks`` = ``history["neg_log_marglik"]`` and ``losses`` = ``history["loss"]``.

    Returns:
        (la, model, history): the fitted Laplace at the best-evidence state, the model holding
        those weights (and the hyperparameters set to their values at that state), and
        per-epoch lists ``"loss"``, ``"log_marglik"`` (NaN when not evaluated),
        ``"prior_precision"``, ``"sigma_noise"``, ``"hyper_seconds"`` (wall time of the
        epoch's hyperparameter work: curvature fits and steps) and, with ``hyperparameters``,
        ``"hyperparameters"`` (per epoch a list with each tensor's ``tolist()``); and
        ``"neg_log_marglik"``, −log Z before each hyperparameter step (``n_hypersteps`` per
        evidence update; laplace-torch's ``margliks``).

    Raises:
        ValueError: for hyperparameters that are not leaf floating tensors requiring grad,
            are given twice, cover every parameter of the model, or (during training) do not
            affect the evidence; and for a structure or curvature that cannot differentiate
            the curvature.
    """
    if returns not in ("history", "laplace-torch"):
        raise ValueError(f"returns must be 'history' or 'laplace-torch', got {returns!r}")
    if prior_structure == "diag":  # laplace-torch's name
        prior_structure = "diagonal"
    progress = progress or progress_bar
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    optimizer_kwargs = optimizer_arguments(optimizer_cls, optimizer_kwargs, lr)
    lik = get_likelihood(likelihood, sigma_noise_init)
    if fix_sigma_noise:
        if tune_sigma:
            raise ValueError("fix_sigma_noise=True contradicts tune_sigma=True")
        tune_sigma = False
    if tune_sigma is None:
        tune_sigma = isinstance(lik, Gaussian)
    if tune_sigma and not isinstance(lik, Gaussian):
        raise ValueError(f"tune_sigma needs a Gaussian likelihood, not {lik.task}")
    if marglik_frequency < 1 or n_epochs < 1:
        raise ValueError("n_epochs and marglik_frequency must be at least 1")
    if evidence not in EVIDENCES:
        raise ValueError(f"evidence must be one of {EVIDENCES}, got {evidence!r}")
    bound = evidence == "bound"
    if n_hypersteps is None:
        n_hypersteps = 10 if bound else 100
    if isinstance(n_hypersteps, bool) or not isinstance(n_hypersteps, int) or n_hypersteps < 0:
        raise ValueError(f"n_hypersteps must be a non-negative integer, got {n_hypersteps!r}")
    laplace_kwargs = dict(laplace_kwargs or {})
    if {"dict_key_x", "dict_key_y"} & set(laplace_kwargs):
        raise ValueError("give dict_key_x, dict_key_y to marglik_training, not in laplace_kwargs")
    laplace_kwargs.update(dict_key_x=dict_key_x, dict_key_y=dict_key_y)
    n_data = _n_data(train_loader, dict_key_x, dict_key_y)
    if n_data == 0:
        raise ValueError("the data loader is empty")
    if temperature != 1.0:
        if "temperature" in laplace_kwargs:
            raise ValueError("give temperature once: temperature= or laplace_kwargs")
        laplace_kwargs["temperature"] = temperature
    temperature = float(laplace_kwargs.get("temperature", 1.0))
    extra = check_hyperparameters(hyperparameters, model)
    check_hyper_options(hyper_gradient, len(extra), lr_hyperparameters, hyper_scheduler_cls, bound)
    subset: dict[str, Any] = {"subset_of_weights": "all"}
    if extra:
        if hessian_structure not in ("full", "kron", "diag"):
            raise ValueError(
                "hyperparameters need hessian_structure 'full', 'kron' or 'diag', got "
                f"{hessian_structure!r}"
            )
        if laplace_kwargs.get("curvature", "ggn") != "ggn":
            raise ValueError(
                f"hyperparameters need curvature='ggn', got {laplace_kwargs['curvature']!r}"
            )
    ids = {id(h) for h in extra}
    weights = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if not weights:
        raise ValueError(
            "every parameter of the model is a hyperparameter or frozen: none is left for the "
            "posterior"
        )
    if len(weights) < len(list(model.parameters())):  # frozen tensors and h are not weights
        subset = {"subset_of_weights": "subnetwork", "subnetwork": weights}
    if hyper_batches is not None:
        if bound:
            raise ValueError("hyper_batches applies to evidence='laplace'; give the bound its "
                             "batches as bound_loader")
        if not extra:
            raise ValueError("hyper_batches applies only with hyperparameters")
        if isinstance(hyper_batches, bool) or not isinstance(hyper_batches, int):
            raise ValueError(f"hyper_batches must be a positive integer, got {hyper_batches!r}")
        if hyper_batches < 1:
            raise ValueError(f"hyper_batches must be a positive integer, got {hyper_batches}")
    refit_loader = (
        train_loader if hyper_batches is None else FirstBatches(train_loader, hyper_batches)
    )
    if hyper_gradient == "minibatch" and hyper_batches is None:
        refit_loader = FirstBatches(train_loader, 1)
    if bound_loader is not None and not bound:
        raise ValueError("bound_loader applies only with evidence='bound'")
    bound_loader = train_loader if bound_loader is None else bound_loader

    def new_laplace(delta: Tensor, sigma: Tensor | None) -> Laplace:
        kw = {"sigma_noise": sigma} if sigma is not None else {}
        return Laplace(
            model,
            lik,
            hessian_structure=hessian_structure,
            prior_precision=delta,
            **subset,
            **kw,
            **laplace_kwargs,
        )

    la = new_laplace(torch.tensor(prior_prec_init), None)
    dtype = next(model.parameters()).dtype
    shape = la.prior.shape(prior_structure)
    hyper = HyperparameterStep(
        torch.full(shape, math.log(prior_prec_init), dtype=dtype),
        torch.tensor(math.log(sigma_noise_init), dtype=dtype) if tune_sigma else None,
        extra,
        lr=lr_hyp,
        extra_lr=lr_hyperparameters,
    )
    hyper_scheduler = None if hyper_scheduler_cls is None else hyper_scheduler_cls(
        hyper.extra_optimizer, **(hyper_scheduler_kwargs or {}))
    log_prior, log_sigma = hyper.log_prior, hyper.log_sigma
    extra_ids = {id(h) for h in extra}
    optimizer, scheduler = make_optimizer(
        (p for p in model.parameters() if id(p) not in extra_ids), optimizer_cls,
        optimizer_kwargs, scheduler_cls, scheduler_kwargs,
    )
    history: dict[str, list] = {
        "loss": [],
        "log_marglik": [],
        "prior_precision": [],
        "sigma_noise": [],
        "neg_log_marglik": [],
        "hyper_seconds": [],
    }
    if extra:
        history["hyperparameters"] = []
    best: dict[str, Any] = {"log_marglik": -math.inf}
    start = 0
    loader_rng = getattr(train_loader, "generator", None)  # a DataLoader's own shuffling RNG
    bound_rng = None if bound_loader is train_loader else getattr(bound_loader, "generator", None)

    run = saved_state.TrainingState(model, optimizer, scheduler, hyper, hyper_scheduler,
                                    loader_rng, bound_rng)
    if checkpoint is not None and os.path.exists(checkpoint):
        history, best, start = saved_state.restore(checkpoint, run)

    def batch_bound(batch: Any) -> Callable[[Tensor, Tensor | None], Tensor]:
        """The bound's estimate on ``batch`` as a function of (δ, σ), fitted at the current θ
        (refitted with a graph per call when hyperparameters act on the curvature)."""
        la_b = new_laplace(hyper.prior_precision, hyper.sigma_noise)
        if not extra:
            la_b.fit([batch])

        def objective(d: Tensor, s: Tensor | None) -> Tensor:
            if extra:
                la_b.fit([batch], create_graph=True)
            return minibatch_bound(la_b, n_data, d, s)
        return objective

    param = next(model.parameters())
    bar = trange(start, n_epochs, disable=not progress, desc="marglik training")
    for epoch in bar:
        delta = log_prior.detach().exp()
        # the MAP prior term reads δ per parameter tensor; user prior groups are expanded first
        delta_map = delta if la.prior.groups is None else la.prior.expand(delta)
        if temperature != 1.0:  # the mode of p(D|θ)^(1/T) p(θ)
            delta_map = temperature * delta_map
        if log_sigma is not None:
            lik.sigma = log_sigma.detach().exp()
        model.train()
        total, batches = 0.0, 0
        for batch in train_loader:
            x, y = split_batch(batch, dict_key_x, dict_key_y)
            x = to_model(x, model)
            optimizer.zero_grad()
            loss = map_loss(model, lik, x, y.to(param.device), delta_map, n_data, extra)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total, batches = total + loss.item(), batches + 1
        history["loss"].append(total / batches)

        log_marglik, fitted_at = math.nan, None
        tic = time.perf_counter()
        if epoch >= n_epochs_burnin and (epoch - n_epochs_burnin) % marglik_frequency == 0:
            delta = log_prior.detach().exp()
            sigma = log_sigma.detach().exp() if log_sigma is not None else None
            if bound:  # one step on each next batch's estimate of the bound
                estimates = []
                for batch in cycled_batches(bound_loader, max(n_hypersteps, 1)):
                    objective = batch_bound(batch)
                    if n_hypersteps:
                        estimates.append(hyper.step(objective))
                        history["neg_log_marglik"].append(-estimates[-1])
                    else:
                        estimates.append(objective(delta, sigma).item())
                log_marglik = sum(estimates) / len(estimates)
            elif extra and hyper_gradient != "refit":  # one plain fit, then one step of h
                la = new_laplace(delta, sigma).fit(train_loader)
                for _ in range(n_hypersteps):
                    history["neg_log_marglik"].append(
                        -hyper.step(la.log_marginal_likelihood, extra=False))
                fitted_at = [h.detach().clone() for h in extra]
                hyper.step_extra(estimate_hyper_gradient(
                    hyper_gradient, la, lambda d=delta, s=sigma: new_laplace(d, s),
                    refit_loader, n_data, hyper.prior_precision, hyper.sigma_noise, extra))
            elif extra:  # the curvature depends on h: refit it differentiably per step
                def objective(d: Tensor, s: Tensor | None, delta=delta, sigma=sigma) -> Tensor:
                    refit = new_laplace(delta, sigma)
                    return differentiable_evidence(refit, refit_loader, n_data, d, s)

                for _ in range(n_hypersteps):
                    history["neg_log_marglik"].append(-hyper.step(objective))
                la = new_laplace(delta, sigma).fit(train_loader)
            else:
                la = new_laplace(delta, sigma).fit(train_loader)
                for _ in range(n_hypersteps):
                    history["neg_log_marglik"].append(-hyper.step(la.log_marginal_likelihood))
            if hyper_scheduler is not None:
                hyper_scheduler.step()
            if not bound:
                s = log_sigma.detach().exp() if log_sigma is not None else None
                log_marglik = la.log_marginal_likelihood(log_prior.detach().exp(), s).item()
            if log_marglik > best["log_marglik"]:
                best = {
                    "log_marglik": log_marglik,
                    "model": copy.deepcopy(model.state_dict()),
                    "log_prior": log_prior.detach().clone(),
                    "log_sigma": None if log_sigma is None else log_sigma.detach().clone(),
                }
                if extra:
                    best["hyperparameters"] = fitted_at or [h.detach().clone() for h in extra]
        history["hyper_seconds"].append(time.perf_counter() - tic)
        history["log_marglik"].append(log_marglik)
        history["prior_precision"].append(log_prior.detach().exp().tolist())
        history["sigma_noise"].append(
            None if log_sigma is None else log_sigma.detach().exp().item()
        )
        if extra:
            history["hyperparameters"].append([h.detach().tolist() for h in extra])
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", log_marglik=f"{log_marglik:.1f}")
        if checkpoint is not None:
            saved_state.save(checkpoint, run, history, best, epoch)
        if callback is not None:
            callback(epoch, model, la, history)
        if stop is not None and stop(epoch, history):
            break

    if "model" in best:
        model.load_state_dict(best["model"])
        delta = best["log_prior"].exp()
        sigma = None if best["log_sigma"] is None else best["log_sigma"].exp()
        with torch.no_grad():
            for h, value in zip(extra, best.get("hyperparameters", [])):
                h.copy_(value)
    else:  # no evidence evaluated (burn-in covered every epoch): keep the last state
        delta = log_prior.detach().exp()
        sigma = None if log_sigma is None else log_sigma.detach().exp()
    if sigma is not None:
        lik.sigma = sigma
    model.eval()
    la = new_laplace(delta, sigma).fit(train_loader)
    if returns == "laplace-torch":
        return la, model, list(history["neg_log_marglik"]), list(history["loss"])
    return la, model, history

"""Fitting LA-NAM: online evidence maximisation with one prior precision per subnetwork.

Bouchiat et al. (AABI 2023), stage 1: the additive network (:class:`AdditiveNet`) and its
hyperparameters — a prior precision δ_g per subnetwork g (plus one for the output bias) and, for
Gaussian regression, the noise σ — are trained jointly by :func:`marglik.marglik_training`
(Immer et al., ICML 2021, Algorithm 1) with the subnetworks as prior groups
(:class:`~marglik.posterior.Prior`). A feature the data do not need gets a large δ_d, its
subnetwork is pulled to zero: implicit feature selection. Stage 2
(:func:`fit_interactions`) ranks feature pairs by the posterior mutual information
(:mod:`~marglik.applications.additive.interactions`), adds pair subnetworks for the top k and
trains again from the stage-1 weights.

Inputs are used as given (the estimators in :mod:`~marglik.applications.additive.estimators`
standardise them).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from marglik.applications.additive.interactions import pair_mutual_information, top_pairs
from marglik.applications.additive.model import AdditiveNet
from marglik.likelihoods import Likelihood
from marglik.likelihoods.heteroscedastic import NaturalGaussian
from marglik.posterior import Laplace
from marglik.training import EvidencePlateau, marglik_training

__all__ = ["HESSIAN_STRUCTURES", "LIKELIHOODS", "LR_SCHEDULES", "AdditiveFit", "fit_additive",
           "fit_interactions", "make_likelihood"]

#: Curvature structures of the additive model (see :mod:`~marglik.applications.additive.blocks`).
HESSIAN_STRUCTURES = ("kron", "full", "diag")


def _cosine(n_steps: int) -> tuple[type, dict[str, Any]]:
    """lr_t = lr (1 + cos(π t / T)) / 2 over the T = ``n_steps`` Adam steps of θ (to 0 at the
    end; Loshchilov & Hutter, ICLR 2017, without restarts)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR, {"T_max": n_steps}


#: θ's learning-rate schedules, by name: a factory ``(total Adam steps) -> (scheduler class,
#: its keyword arguments)`` stepped after every batch, or None for a constant rate.
LR_SCHEDULES: dict[str, Callable[[int], tuple[type, dict[str, Any]]] | None] = {
    "constant": None, "cosine": _cosine}

#: Likelihood names and the number of outputs C of each.
LIKELIHOODS = {"regression": 1, "heteroscedastic": 2, "binary": 1}


def make_likelihood(name: str) -> str | Likelihood:
    """The likelihood for ``"regression" | "heteroscedastic" | "binary"``."""
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {name!r}")
    return NaturalGaussian() if name == "heteroscedastic" else name


@dataclass
class AdditiveFit:
    """A fitted LA-NAM: the Laplace posterior, the model, the training history, wall time.

    ``feature_precisions`` (D,) and ``pair_precisions`` (K,) are the learned δ of the
    subnetworks; ``seconds`` the wall time of the fit (this stage only).
    """

    la: Laplace
    model: AdditiveNet
    history: dict[str, list]
    likelihood: str
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs_run(self) -> int:
        """Epochs trained (fewer than ``n_epochs`` when the evidence rule stopped early)."""
        return len(self.history["loss"])

    @property
    def precisions(self) -> Tensor:
        """δ per subnetwork (features, then pairs), without the output bias's: (D + K,)."""
        return self.la.prior_precision.detach()[: self.model.n_groups]

    @property
    def feature_precisions(self) -> Tensor:
        return self.precisions[: self.model.n_features]

    @property
    def pair_precisions(self) -> Tensor:
        return self.precisions[self.model.n_features:]


def _check_data(X: Tensor, y: Tensor, likelihood: str) -> tuple[Tensor, Tensor]:
    if not torch.is_tensor(X) or not torch.is_tensor(y):
        raise TypeError("X and y must be tensors")
    if X.dim() != 2 or len(X) < 2:
        raise ValueError(f"X must have shape (N, D) with N ≥ 2, got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be a floating tensor, got {X.dtype}")
    y = y.reshape(-1, 1).to(X.dtype)
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    if not (torch.isfinite(X).all() and torch.isfinite(y).all()):
        raise ValueError("X and y must be finite (no NaN or inf)")
    if likelihood == "binary" and not ((y == 0) | (y == 1)).all():
        raise ValueError("binary targets must be 0 or 1")
    return X, y


def _train(model: AdditiveNet, X: Tensor, y: Tensor, likelihood: str, options: dict,
           seed: int, callback: Callable[[int, dict], None] | None = None,
           progress: bool = False) -> tuple[Laplace, AdditiveNet, dict]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(X, y)
    batch = options["batch_size"] or len(X)
    loader = torch.utils.data.DataLoader(data, batch_size=min(batch, len(X)), shuffle=True,
                                         generator=gen)
    patience = options.get("patience")
    stop = None if patience is None else EvidencePlateau(patience, options["min_delta"])
    schedule = LR_SCHEDULES[options.get("lr_schedule", "constant")]
    scheduler_cls, scheduler_kwargs = (None, None) if schedule is None else schedule(
        options["n_epochs"] * len(loader))
    with torch.random.fork_rng(), warnings.catch_warnings():
        # under "kron" the output bias b (C,) gets a diagonal block: expected, not a problem
        warnings.filterwarnings("ignore", "KFAC cannot express")
        torch.manual_seed(seed)
        la, model, history = marglik_training(
            model, loader, make_likelihood(likelihood),
            hessian_structure=options["hessian_structure"], prior_structure="layerwise",
            n_epochs=options["n_epochs"], lr=options["lr"], lr_hyp=options["lr_hyp"],
            n_epochs_burnin=options["n_epochs_burnin"],
            marglik_frequency=options["marglik_frequency"],
            n_hypersteps=options["n_hypersteps"], prior_prec_init=options["prior_prec_init"],
            scheduler_cls=scheduler_cls, scheduler_kwargs=scheduler_kwargs,
            laplace_kwargs={"prior_groups": model.prior_groups()},
            callback=None if callback is None else (lambda e, m, la, h: callback(e, h)),
            progress=progress, stop=stop,
        )
    return la, model, history


def fit_additive(
    X: Tensor,
    y: Tensor,
    likelihood: str = "regression",
    hidden: tuple[int, ...] = (64,),
    activation: str = "relu",
    n_epochs: int = 300,
    lr: float = 1e-2,
    lr_schedule: str = "constant",
    batch_size: int | None = 512,
    hessian_structure: str = "kron",
    n_epochs_burnin: int = 20,
    marglik_frequency: int = 20,
    n_hypersteps: int = 50,
    lr_hyp: float = 0.1,
    prior_prec_init: float = 1.0,
    pairs: tuple[tuple[int, int], ...] = (),
    seed: int = 0,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    patience: int | None = None,
    min_delta: float = 1.0,
) -> AdditiveFit:
    """Stage 1 of LA-NAM: train f(x) = b + Σ_d f_d(x_d) by online evidence maximisation.

    Args:
        X: inputs (N, D), floating (their dtype is the model's); y: targets (N,) or (N, 1)
            (0/1 for ``"binary"``).
        likelihood: ``"regression"`` (Gaussian, σ learned), ``"heteroscedastic"``
            (:class:`~marglik.likelihoods.NaturalGaussian`: every subnetwork has the 2 natural
            parameter outputs) or ``"binary"`` (Bernoulli logit).
        hidden, activation: widths and activation of every subnetwork (default one hidden
            layer of 64 ReLU units: the width of Bouchiat et al.'s code, the activation of
            Agarwal et al.'s NAM; ReLU fitted the sharp shapes of the UCI sets better than GELU in
            the diagnosis of ``benchmarks/RESULTS-additive.md``).
        n_epochs, lr, batch_size: Adam on θ (``batch_size=None``: full batch).
        lr_schedule: θ's learning rate over training, a name in :data:`LR_SCHEDULES`:
            ``"constant"`` or ``"cosine"`` (decays lr to 0 over the n_epochs · ⌈N/batch⌉
            steps).
        hessian_structure: ``"kron"`` (default: a Kronecker-factored block per subnetwork and
            layer, as the paper), ``"full"`` (exact GGN, small models only) or ``"diag"``
            (exact GGN diagonal: over-regularises, see
            :mod:`~marglik.applications.additive.blocks`).
        n_epochs_burnin, marglik_frequency, n_hypersteps, lr_hyp, prior_prec_init: the
            evidence updates of :func:`~marglik.marglik_training`.
        pairs: interaction subnetworks to include from the start.
        patience, min_delta: the training-length rule
            (:class:`~marglik.training.stopping.EvidencePlateau`): training ends once the best
            training log evidence has not risen by ``min_delta`` nats (default 1, a Bayes factor
            of e) over ``patience`` consecutive evidence updates (one every
            ``marglik_frequency`` epochs), and ``n_epochs`` is the maximum; the state of the best
            evidence is returned either way. ``patience=None``: train all ``n_epochs``.
        seed: seeds the initialisation, the batch order and the training.
        callback: called as ``callback(epoch, history)`` after every epoch (0-based epoch,
            :func:`~marglik.marglik_training`'s history), e.g. for progress lines.
        progress: show :func:`~marglik.marglik_training`'s progress bar (stderr).

    Returns:
        :class:`AdditiveFit`.
    """
    X, y = _check_data(X, y, likelihood)
    make_likelihood(likelihood)
    if hessian_structure not in HESSIAN_STRUCTURES:
        raise ValueError(f"hessian_structure must be one of {HESSIAN_STRUCTURES}, got "
                         f"{hessian_structure!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, got "
                         f"{lr_schedule!r}")
    options = dict(hidden=tuple(hidden), activation=activation, n_epochs=n_epochs, lr=lr,
                   lr_schedule=lr_schedule,
                   batch_size=batch_size, hessian_structure=hessian_structure,
                   n_epochs_burnin=n_epochs_burnin, marglik_frequency=marglik_frequency,
                   n_hypersteps=n_hypersteps, lr_hyp=lr_hyp, prior_prec_init=prior_prec_init,
                   patience=patience, min_delta=min_delta)
    if patience is not None:
        EvidencePlateau(patience, min_delta)  # checks both
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AdditiveNet(X.shape[1], tuple(hidden), LIKELIHOODS[likelihood], pairs,
                            activation).to(X.dtype)
    la, model, history = _train(model, X, y, likelihood, options, seed, callback, progress)
    return AdditiveFit(la, model, history, likelihood, time.perf_counter() - start, options)


def fit_interactions(fit: AdditiveFit, X: Tensor, y: Tensor, k: int = 3,
                     n_epochs: int | None = None, seed: int = 0,
                     callback: Callable[[int, dict], None] | None = None,
                     progress: bool = False) -> AdditiveFit:
    """Stage 2 of LA-NAM: add pair subnetworks for the k pairs of highest posterior mutual
    information and train again, starting from the stage-1 weights.

    Args:
        fit: the stage-1 fit (its model has no pairs yet).
        X, y: the same training data.
        k: number of pairs (at most D(D−1)/2).
        n_epochs: epochs of the second stage (default: those of the first).
        seed: seeds the pair subnetworks and the batch order.
        callback, progress: as in :func:`fit_additive`.

    Returns:
        a new :class:`AdditiveFit` whose ``options["pair_scores"]`` holds the mutual information
        of every pair (D, D) and ``options["stage1_seconds"]`` the first stage's wall time.
    """
    X, y = _check_data(X, y, fit.likelihood)
    if fit.model.pairs:
        raise ValueError("fit already has pair subnetworks; pass a stage-1 fit")
    start = time.perf_counter()
    scores = pair_mutual_information(fit, X, y)
    pairs = top_pairs(scores, k)
    model = fit.model.with_pairs(pairs, seed)
    options = dict(fit.options)
    if n_epochs is not None:
        options["n_epochs"] = n_epochs
    la, model, history = _train(model, X, y, fit.likelihood, options, seed, callback,
                                progress)
    options.update(pair_scores=scores, stage1_seconds=fit.seconds)
    return AdditiveFit(la, model, history, fit.likelihood, time.perf_counter() - start, options)

"""Training the surrogate's network and its Laplace posterior on the observations so far.

Two ways to the hyperparameters (prior precision δ, observation noise σ) by the evidence:

- ``"posthoc"``: MAP training with the current δ and σ (Adam, full batch), then the Laplace fit
  and ``optimize_prior_precision(method="marglik")`` (δ, and σ unless it is fixed);
- ``"online"``: :func:`marglik.marglik_training` (Immer et al., ICML 2021), θ and (δ, σ)
  alternately.

Warm start: the network is trained from its current weights, and δ, σ from their last values,
so a refit after a new observation needs far fewer epochs than the first fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from marglik.posterior.laplace import Laplace
from marglik.training.map import train_map
from marglik.training.online import marglik_training

TUNINGS = ("posthoc", "online")


@dataclass
class FitSettings:
    """How the surrogate is trained (see :func:`fit_laplace`).

    Attributes:
        tuning: ``"posthoc"`` or ``"online"``.
        hessian_structure: ``"kron"`` (KFAC) or ``"full"`` (or ``"diag"``), all weights.
        prior_structure: ``"scalar"`` or ``"layerwise"`` δ.
        n_epochs: full-batch Adam steps of the first fit.
        n_epochs_refit: steps of a warm-started refit (after new observations).
        lr: Adam learning rate for the weights.
        n_hypersteps: evidence steps (post hoc: per fit; online: per evidence update).
        lr_hyp: learning rate of the hyperparameters (Adam in log space).
        marglik_frequency: online only, epochs between evidence updates.
        noise_std: a fixed σ; ``None`` learns it by the evidence.
        prior_precision: initial δ.
        sigma_init: initial σ where it is learned.
        laplace_kwargs: further :class:`~marglik.Laplace` arguments.
    """

    tuning: str = "posthoc"
    hessian_structure: str = "kron"
    prior_structure: str = "layerwise"
    n_epochs: int = 1000
    n_epochs_refit: int = 300
    lr: float = 1e-2
    n_hypersteps: int = 100
    lr_hyp: float = 1e-1
    marglik_frequency: int = 50
    noise_std: float | None = None
    prior_precision: float = 1.0
    sigma_init: float = 0.3
    laplace_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tuning not in TUNINGS:
            raise ValueError(f"unknown tuning {self.tuning!r}: use one of {TUNINGS}")
        for name in ("n_epochs", "n_epochs_refit", "n_hypersteps", "marglik_frequency"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "marglik_frequency" else 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.noise_std is not None and not float(self.noise_std) > 0:
            raise ValueError(f"noise_std must be positive (or None to learn it), got "
                             f"{self.noise_std!r}")
        for name in ("lr", "lr_hyp", "prior_precision", "sigma_init"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def check_data(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Training data X (n, d), Y (n, m), finite and of matching length, or a clear error."""
    for name, t in (("train_X", X), ("train_Y", Y)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape (n, {'d' if name == 'train_X' else 'm'}), "
                             f"got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/inf values")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"train_X and train_Y have different numbers of points: {X.shape[0]} "
                         f"and {Y.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError("the surrogate needs at least one observation")
    return X, Y


def fit_laplace(net: nn.Module, X: Tensor, Y: Tensor, settings: FitSettings,
                prior_precision: Tensor | float, sigma_noise: Tensor | float,
                n_epochs: int) -> Laplace:
    """Train ``net`` in place on (X (n, d), Y (n, m)) and return its evidence-tuned Laplace.

    Args:
        prior_precision, sigma_noise: the starting δ and σ (warm start: the last fit's).
        n_epochs: Adam steps of the weights (the first fit or a refit).

    Returns:
        a fitted regression :class:`~marglik.Laplace` over all weights of ``net``.
    """
    loader = [(X, Y)]
    s = settings
    sigma = s.noise_std if s.noise_std is not None else sigma_noise
    if s.tuning == "online":
        la, _, _ = marglik_training(  # warm: trains ``net`` from its current weights
            net, loader, "regression", hessian_structure=s.hessian_structure,
            prior_structure=s.prior_structure, n_epochs=max(n_epochs, 1), lr=s.lr,
            lr_hyp=s.lr_hyp, marglik_frequency=s.marglik_frequency,
            n_hypersteps=s.n_hypersteps, prior_prec_init=_scalar(prior_precision),
            sigma_noise_init=_scalar(sigma), tune_sigma=s.noise_std is None,
            laplace_kwargs=dict(s.laplace_kwargs),
        )
        return la
    train_map(net, loader, "regression", n_epochs=n_epochs, lr=s.lr,
              prior_precision=_detached(prior_precision), sigma_noise=_detached(sigma))
    la = Laplace(net, "regression", hessian_structure=s.hessian_structure,
                 prior_precision=_detached(prior_precision), sigma_noise=_detached(sigma),
                 **s.laplace_kwargs)
    la.fit(loader)
    if s.n_hypersteps > 0:
        la.optimize_prior_precision(method="marglik", prior_structure=s.prior_structure,
                                    tune_sigma=s.noise_std is None, n_steps=s.n_hypersteps,
                                    lr=s.lr_hyp)
    return la


def _detached(value: Tensor | float) -> Tensor | float:
    return value.detach().clone() if isinstance(value, Tensor) else value


def _scalar(value: Tensor | float) -> float:
    """A scalar start value (the geometric mean of a per-group δ)."""
    if isinstance(value, Tensor):
        return float(value.detach().double().log().mean().exp())
    return float(value)

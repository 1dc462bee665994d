"""Augerino: augmentation extents learned by the training loss (Benton et al., NeurIPS 2020).

The baseline LILA (Immer, van der Ouderaa et al., NeurIPS 2022) compares against: the weights
θ and the extents η of an :class:`~marglik.layers.AugmentedModel` minimise together

    L(θ, η) = (1/B) Σ_b −log p(y_b | f_η(x_b; θ)) + δ‖θ‖²/(2N) − λ ‖η‖₂,

the training loss of the averaged model minus a regulariser that rewards wide augmentations
(without it the loss alone drives η to 0: an invariance never fits the training data better).
λ is a hyperparameter to tune by hand; the evidence needs none (:func:`marglik_training` with
``hyperparameters=model.hyperparameters()``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from marglik.curvature.batches import Inputs, split_batch, to_model
from marglik.likelihoods import Likelihood, get_likelihood
from marglik.training.map import _n_data, map_loss

__all__ = ["augerino_loss", "augerino_regulariser", "train_augerino"]


def augerino_regulariser(hyperparameters: Sequence[Tensor], strength: float) -> Tensor:
    """−λ ‖η‖₂ over the concatenated hyperparameters η (0-d)."""
    if not strength >= 0:
        raise ValueError(f"the Augerino strength must be non-negative, got {strength}")
    eta = torch.cat([h.reshape(-1) for h in hyperparameters])
    return -strength * eta.norm()


def augerino_loss(
    model: nn.Module,
    likelihood: Likelihood,
    x: Inputs,
    y: Tensor,
    hyperparameters: Sequence[Tensor],
    strength: float = 0.01,
    prior_precision: float | Tensor = 0.0,
    n_data: int = 1,
) -> Tensor:
    """The Augerino objective of one batch (0-d): the MAP loss of the weights (the prior
    leaves out η) minus λ‖η‖₂ (:func:`augerino_regulariser`)."""
    hyperparameters = list(hyperparameters)
    if not hyperparameters:
        raise ValueError("Augerino needs the augmentation's parameters (hyperparameters=)")
    loss = map_loss(model, likelihood, x, y, prior_precision, n_data, hyperparameters)
    return loss + augerino_regulariser(hyperparameters, strength)


def train_augerino(
    model: nn.Module,
    loader: Iterable,
    likelihood: str | Likelihood,
    hyperparameters: Sequence[Tensor],
    n_epochs: int = 100,
    lr: float = 1e-2,
    lr_aug: float = 1e-2,
    strength: float = 0.01,
    prior_precision: float | Tensor = 0.0,
) -> dict[str, list]:
    """Train θ (Adam, ``lr``) and η (Adam, ``lr_aug``) jointly on :func:`augerino_loss`, in
    training mode (fresh random copies every batch); returns per-epoch ``"loss"`` and
    ``"hyperparameters"`` (each tensor's ``tolist()``). The model is left in eval mode."""
    hyperparameters = list(hyperparameters)
    ids = {id(h) for h in hyperparameters}
    if not hyperparameters or any(not h.requires_grad for h in hyperparameters):
        raise ValueError("the hyperparameters must be tensors requiring grad")
    lik = get_likelihood(likelihood)
    n_data = _n_data(loader)
    if n_data == 0:
        raise ValueError("the data loader is empty")
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    optimizer = torch.optim.Adam(weights, lr=lr)
    aug_optimizer = torch.optim.Adam(hyperparameters, lr=lr_aug)
    history: dict[str, list] = {"loss": [], "hyperparameters": []}
    model.train()
    for _ in range(n_epochs):
        total, batches = 0.0, 0
        for batch in loader:
            x, y = split_batch(batch)
            x, y = to_model(x, model), y.to(weights[0].device)
            optimizer.zero_grad()
            aug_optimizer.zero_grad()
            loss = augerino_loss(model, lik, x, y, hyperparameters, strength, prior_precision,
                                 n_data)
            loss.backward()
            optimizer.step()
            aug_optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history["loss"].append(total / batches)
        history["hyperparameters"].append([h.detach().tolist() for h in hyperparameters])
    model.eval()
    return history

"""MAP training: Adam on the mean negative log-likelihood plus a Gaussian prior.

The loss of a batch B from a data set of N samples is

    L(θ) = (1/|B|) Σ_{n∈B} −log p(y_n | f(x_n; θ)) + δ ‖θ‖² / (2N),

i.e. the negative log joint −log p(D, θ) divided by N, estimated on the batch. With a scalar
prior precision δ this is Adam with coupled weight decay δ/N (``torch.optim.Adam(weight_decay=)``);
a layer-wise δ (one value per parameter tensor, in ``named_parameters()`` order) or a
per-parameter δ (one per entry) gives each weight its own decay. This is the objective whose
mode :class:`marglik.Laplace` expands around, so a δ tuned by the evidence can be fed back here:
:func:`marglik.training.online.marglik_training` alternates the two during training (Immer et al.,
ICML 2021, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from marglik.curvature.batches import (
    DICT_KEY_X,
    DICT_KEY_Y,
    Inputs,
    batch_size,
    call_model,
    split_batch,
    to_model,
)
from marglik.likelihoods import Likelihood, get_likelihood
from marglik.posterior.prior import Prior

__all__ = ["map_loss", "prior_term", "train_map"]


def _n_data(loader: Iterable, dict_key_x: str = DICT_KEY_X, dict_key_y: str = DICT_KEY_Y) -> int:
    """Number of samples N in ``loader``: ``len(loader.dataset)`` if it has one (and batches
    its items: ``batch_size`` not None), else counted batch by batch
    (:func:`~marglik.curvature.batches.batch_size`, dict batches included)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and getattr(loader, "batch_size", 1) is not None:
        try:
            return len(dataset)
        except TypeError:
            pass
    return sum(
        batch_size(split_batch(batch, dict_key_x, dict_key_y)[0], dict_key_x) for batch in loader
    )


def _weights(model: nn.Module, exclude: Collection[Tensor] = ()) -> list[tuple[str, Tensor]]:
    """(name, parameter) of the trainable weights: ``requires_grad`` and not in ``exclude``."""
    skip = {id(t) for t in exclude}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]


def _expand_prior(
    model: nn.Module, prior_precision: float | Tensor, exclude: Collection[Tensor] = ()
) -> list[Tensor]:
    """δ per trainable parameter tensor: 0-d (scalar / layer-wise) or the tensor's shape."""
    weights = _weights(model, exclude)
    delta = torch.as_tensor(prior_precision, dtype=torch.get_default_dtype()).detach()
    prior = Prior(delta, allow_zero=True).bind([n for n, _ in weights],
                                               [p.numel() for _, p in weights])
    return [d if d.ndim == 0 else d.reshape(p.shape)
            for d, (_, p) in zip(prior.per_tensor(), weights)]


def prior_term(
    model: nn.Module,
    prior_precision: float | Tensor,
    n_data: int,
    exclude: Collection[Tensor] = (),
) -> Tensor:
    """δ ‖θ‖² / (2N) over the trainable parameters (0-d); δ scalar, layer-wise or per-parameter.

    Parameters in ``exclude`` (hyperparameters registered in the model, not weights) are left out.
    """
    params = [p for _, p in _weights(model, exclude)]
    deltas = _expand_prior(model, prior_precision, exclude)
    total = sum((d.to(p) * p.square()).sum() for d, p in zip(deltas, params))
    return 0.5 * total / n_data


def map_loss(
    model: nn.Module,
    likelihood: Likelihood,
    x: Inputs,
    y: Tensor,
    prior_precision: float | Tensor,
    n_data: int,
    exclude: Collection[Tensor] = (),
) -> Tensor:
    """(1/B) Σ_b −log p(y_b | f(x_b)) + δ‖θ‖²/(2N) for a batch x (B, ...), y (B, ...): 0-d.

    x may also be a dict of tensors (``model(x)``) or a tuple of them (``model(*x)``), see
    :mod:`marglik.curvature.batches`. The prior covers the trainable parameters except those in
    ``exclude``.
    """
    nll = -likelihood.log_prob(call_model(model, x), y).mean()
    return nll + prior_term(model, prior_precision, n_data, exclude)


def train_map(
    model: nn.Module,
    loader: Iterable,
    likelihood: str | Likelihood,
    n_epochs: int = 100,
    lr: float = 1e-2,
    prior_precision: float | Tensor | None = None,
    weight_decay: float | None = None,
    sigma_noise: float | Tensor = 1.0,
    progress: bool = False,
    dict_key_x: str = DICT_KEY_X,
    dict_key_y: str = DICT_KEY_Y,
) -> dict[str, list[float]]:
    """Train ``model`` in place to the MAP weights by Adam; return the per-epoch mean loss.

    Args:
        model: the network; all parameters with ``requires_grad`` are trained.
        loader: any re-iterable of (x, y) batches (a DataLoader, or a list with one full batch),
            or of dict batches (see ``dict_key_x``); x may be a tensor, a dict of tensors
            (``model(x)``) or a tuple of tensors (``model(*x)``).
        likelihood: ``"regression" | "classification" | "binary"`` or a
            :class:`~marglik.likelihoods.Likelihood`.
        n_epochs: passes over ``loader``.
        lr: Adam learning rate.
        prior_precision: δ ≥ 0 — scalar, one per trainable parameter tensor, or one per
            parameter; the prior term is δ‖θ‖²/(2N).
        weight_decay: the same prior given as a decay per sample, δ = weight_decay · N. Give at
            most one of ``prior_precision`` and ``weight_decay`` (neither: no prior).
        sigma_noise: σ of the Gaussian likelihood for ``"regression"`` (a Likelihood object
            carries its own).
        progress: show a tqdm bar over epochs.
        dict_key_x, dict_key_y: for a loader yielding dicts (``UserDict``, ``BatchEncoding``),
            as in laplace-torch: the whole dict is the model input, ``batch[dict_key_y]`` the
            targets and ``batch[dict_key_x].shape[0]`` the batch size.

    Returns:
        ``{"loss": [...]}``, the mean batch loss of every epoch.
    """
    if prior_precision is not None and weight_decay is not None:
        raise ValueError("give prior_precision or weight_decay, not both")
    if n_epochs < 0:
        raise ValueError(f"n_epochs must be non-negative, got {n_epochs}")
    lik = get_likelihood(likelihood, sigma_noise)
    n_data = _n_data(loader, dict_key_x, dict_key_y)
    if n_data == 0:
        raise ValueError("the data loader is empty")
    if weight_decay is not None:
        prior_precision = weight_decay * n_data
    if prior_precision is None:
        prior_precision = 0.0
    _expand_prior(model, prior_precision)  # validate before training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    param = params[0]
    model.train()
    history: dict[str, list[float]] = {"loss": []}
    bar = trange(n_epochs, disable=not progress, desc="MAP", leave=False)
    for _ in bar:
        total, batches = 0.0, 0
        for batch in loader:
            x, y = split_batch(batch, dict_key_x, dict_key_y)
            x, y = to_model(x, model), y.to(param.device)
            optimizer.zero_grad()
            loss = map_loss(model, lik, x, y, prior_precision, n_data)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history["loss"].append(total / max(batches, 1))
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    model.eval()
    return history

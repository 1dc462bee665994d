"""θ's optimizer and scheduler for :func:`~marglik.training.online.marglik_training`.

laplace-torch's ``optimizer_cls`` / ``optimizer_kwargs`` / ``scheduler_cls`` /
``scheduler_kwargs`` arguments, with marglik's ``lr`` kept: one place that resolves them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["make_optimizer", "optimizer_arguments"]


def optimizer_arguments(
    optimizer_cls: type[torch.optim.Optimizer],
    optimizer_kwargs: dict[str, Any] | None,
    lr: float | None,
) -> dict[str, Any]:
    """Keyword arguments of θ's optimizer: a copy of ``optimizer_kwargs`` with ``lr`` added.

    The learning rate is ``lr`` or ``optimizer_kwargs["lr"]`` (both raise), 1e-3 for Adam when
    neither is given, else the optimizer's own default. A non-zero ``weight_decay`` is set to 0
    with a warning: the prior precision is the weight decay, and the evidence learns it.
    """
    kwargs = dict(optimizer_kwargs or {})
    if lr is not None:
        if "lr" in kwargs:
            raise ValueError("give the learning rate once: lr= or optimizer_kwargs['lr']")
        kwargs["lr"] = lr
    elif optimizer_cls is torch.optim.Adam:
        kwargs.setdefault("lr", 1e-3)
    if kwargs.get("weight_decay", 0):
        warnings.warn(
            "weight_decay is the prior precision, learned by the evidence: it is set to 0 in "
            "optimizer_kwargs",
            stacklevel=3,
        )
        kwargs["weight_decay"] = 0.0
    return kwargs


def make_optimizer(
    params: Iterable[Tensor],
    optimizer_cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    scheduler_cls: type | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, Any]:
    """``optimizer_cls(params, **kwargs)`` and its scheduler (or None)."""
    optimizer = optimizer_cls(list(params), **kwargs)
    if scheduler_cls is None:
        return optimizer, None
    return optimizer, scheduler_cls(optimizer, **(scheduler_kwargs or {}))

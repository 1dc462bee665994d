"""The checkpoint of :func:`~marglik.training.online.marglik_training`: save and resume.

One ``torch.save`` file of plain tensors and containers (loadable with ``weights_only=True``)
holding everything an uninterrupted run would carry into the next epoch: the weights, θ's
optimizer and scheduler, the hyperparameters (log δ, log σ, registered h such as the extents η
of a learned augmentation) with their optimizers and h's scheduler, the history, the best state,
the global RNG state and the data loaders' own generators. Resuming reproduces an uninterrupted
run exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from marglik.evidence.optimize import HyperparameterStep

__all__ = ["TrainingState", "restore", "save"]


@dataclass
class TrainingState:
    """The objects a run updates in place, which a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hyper: HyperparameterStep
    hyper_scheduler: Any
    loader_rng: torch.Generator | None
    bound_rng: torch.Generator | None


def save(path: str | os.PathLike, run: TrainingState, history: dict, best: dict,
         epoch: int) -> None:
    """Write the state after ``epoch`` to ``path``."""
    hyper = run.hyper
    state: dict[str, Any] = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "hyper_optimizer": hyper.optimizer.state_dict(),
        "log_prior": hyper.log_prior.detach(),
        "log_sigma": None if hyper.log_sigma is None else hyper.log_sigma.detach(),
        "history": history,
        "best": best,
        "epoch": epoch,
        "rng": torch.get_rng_state(),
        "loader_rng": None if run.loader_rng is None else run.loader_rng.get_state(),
        "bound_rng": None if run.bound_rng is None else run.bound_rng.get_state(),
    }
    if hyper.extra:
        state["hyperparameters"] = [h.detach() for h in hyper.extra]
        state["extra_optimizer"] = hyper.extra_optimizer.state_dict()
    if run.scheduler is not None:
        state["scheduler"] = run.scheduler.state_dict()
    if run.hyper_scheduler is not None:
        state["hyper_scheduler"] = run.hyper_scheduler.state_dict()
    torch.save(state, path)


def restore(path: str | os.PathLike, run: TrainingState) -> tuple[dict, dict, int]:
    """Load ``path`` into ``run``; returns (history, best, the first epoch to run).

    Raises:
        ValueError: the checkpoint holds another number of registered hyperparameters.
    """
    state = torch.load(path, weights_only=True)
    hyper = run.hyper
    saved: list[Tensor] = state.get("hyperparameters") or []
    if len(saved) != len(hyper.extra):
        raise ValueError(
            f"the checkpoint holds {len(saved)} hyperparameters, this run registers "
            f"{len(hyper.extra)}"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    hyper.optimizer.load_state_dict(state["hyper_optimizer"])
    if hyper.extra:
        hyper.extra_optimizer.load_state_dict(state["extra_optimizer"])
    with torch.no_grad():
        hyper.log_prior.copy_(state["log_prior"])
        if hyper.log_sigma is not None:
            hyper.log_sigma.copy_(state["log_sigma"])
        for h, value in zip(hyper.extra, saved):
            h.copy_(value)
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if run.hyper_scheduler is not None:
        run.hyper_scheduler.load_state_dict(state["hyper_scheduler"])
    history, best = state["history"], state["best"]
    history.setdefault("neg_log_marglik", [])
    history.setdefault("hyper_seconds", [])
    torch.set_rng_state(state["rng"])
    if run.loader_rng is not None:
        run.loader_rng.set_state(state["loader_rng"])
    if run.bound_rng is not None:
        run.bound_rng.set_state(state["bound_rng"])
    return history, best, state["epoch"] + 1

"""Architecture selection by the converged evidence (Immer et al., ICML 2021, §5).

Every candidate network is trained with online evidence maximisation
(:func:`~marglik.training.online.marglik_training`); the one with the highest log marginal
likelihood at the end is chosen — no validation data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from marglik.likelihoods import Likelihood
from marglik.training.online import marglik_training

__all__ = ["select_architecture"]


def select_architecture(
    candidates: dict[str, Callable[[], nn.Module]],
    train_loader: Iterable,
    likelihood: str | Likelihood = "classification",
    **kwargs: Any,
) -> tuple[str, dict[str, float]]:
    """Train every candidate with :func:`marglik_training`; pick the best converged evidence.

    ``kwargs`` go to :func:`marglik_training`, e.g. ``dict_key_x`` / ``dict_key_y`` for a loader
    yielding dicts; the batches may be anything it accepts (:mod:`marglik.curvature.batches`).

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

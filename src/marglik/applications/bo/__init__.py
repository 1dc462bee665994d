"""Bayesian optimisation with the linearised Laplace as surrogate (Kristiadi, Immer, Eschenhagen &
Fortuin, AABI 2023); see docs/bo.md.

- :mod:`~marglik.applications.bo.linearised` — the maths, without BoTorch: the joint GLM
  predictive of t-batches (:func:`joint_moments`) and linearised function samples
  (:class:`LinearisedFunctionSamples`);
- :mod:`~marglik.applications.bo.fitting` — training the network and tuning δ, σ by the
  evidence, post hoc or online, warm-started (:class:`FitSettings`, :func:`fit_laplace`);
- :mod:`~marglik.applications.bo.surrogate` — the BoTorch ``Model``
  (:class:`LaplaceSurrogate`); needs ``botorch`` (``pip install marglik[bo]``);
- :mod:`~marglik.applications.bo.thompson` — sample-then-optimise Thompson sampling
  (:func:`thompson_candidates`); needs ``botorch``.

The BoTorch names are imported on first use, so ``import marglik.applications.bo`` works without
BoTorch installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from marglik.applications.bo.fitting import FitSettings, fit_laplace
from marglik.applications.bo.linearised import (
    LinearisedFunctionSamples,
    joint_moments,
    parameter_jacobians,
)

_LAZY = {
    "LaplaceSurrogate": "surrogate",
    "default_network": "surrogate",
    "FunctionSampleSum": "thompson",
    "thompson_candidates": "thompson",
}

__all__ = ["FitSettings", "fit_laplace", "LinearisedFunctionSamples", "joint_moments",
           "parameter_jacobians", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("botorch", "gpytorch", "linear_operator"):
            raise ImportError(f"marglik.applications.bo.{name} needs BoTorch: "
                              f"pip install 'marglik[bo]'") from err
        raise
    return getattr(module, name)

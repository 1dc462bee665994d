"""Predictives of a fitted :class:`~marglik.Laplace`: GLM (linearised) and weight sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call

from marglik.curvature.engine import curvature_mode
from marglik.predictive.glm import glm_moments
from marglik.predictive.links import LINKS, bridge, monte_carlo, probit

if TYPE_CHECKING:
    from marglik.posterior import Laplace

PRED_TYPES = ("glm", "nn")


def predict(
    la: Laplace,
    x: Tensor,
    pred_type: str = "glm",
    link_approx: str = "probit",
    joint: bool = False,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Posterior predictive at inputs x (B, ...).

    Returns:
        classification: class probabilities (B, C); binary: probabilities (B, C);
        regression and other likelihoods: (f_mean (B, D), f_var (B, D, D)) — or the joint
        covariance (B·D, B·D) with ``joint=True`` — without observation noise.
    """
    la._require_fit()
    if pred_type not in PRED_TYPES:
        raise ValueError(f"unknown pred_type {pred_type!r}: use one of {PRED_TYPES}")
    if link_approx not in LINKS:
        raise ValueError(f"unknown link_approx {link_approx!r}: use one of {LINKS}")
    param = next(la.model.parameters())
    x = x.to(param.device, param.dtype if x.is_floating_point() else None)
    task = la.likelihood.task
    with curvature_mode(la.model, la.subset):
        if pred_type == "nn":
            return nn_predictive(la, x, n_samples, generator)
        f_mean, f_var = glm_moments(la, x, joint=joint)
    if task not in ("classification", "binary") or joint:
        return f_mean, f_var
    binary = task == "binary"
    if link_approx == "probit":
        return probit(f_mean, f_var, binary)
    if link_approx == "mc":
        return monte_carlo(f_mean, f_var, n_samples, binary, generator)
    if binary:
        raise ValueError("the Laplace bridge is for softmax outputs; use probit or mc for binary")
    return bridge(f_mean, f_var, normalize=link_approx == "bridge_norm")


def nn_predictive(la: Laplace, x: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor | tuple[Tensor, Tensor]:
    """Run the network at θ ~ q(θ) (underfits compared to the GLM predictive; for comparison)."""
    thetas = la.sample(n_samples, generator)
    params = {n: p.detach() for n, p in la.model.named_parameters()}
    outs = []
    for theta in thetas:
        sampled = dict(params)
        flat = torch.cat([params[n].reshape(-1) for n in la.subset.names])
        if la.subset.index is not None:
            flat = flat.clone()
            flat[la.subset.index] = theta.to(flat)
        else:
            flat = theta.to(flat)
        for n, chunk in zip(la.subset.names, flat.split([params[n].numel() for n in la.subset.names])):
            sampled[n] = chunk.reshape(params[n].shape)
        outs.append(functional_call(la.model, sampled, (x,)))
    f = torch.stack(outs)  # (S, B, ...)
    if la.likelihood.task == "classification":
        return torch.softmax(f, -1).mean(0)
    if la.likelihood.task == "binary":
        return torch.sigmoid(f).mean(0)
    f = f.reshape(n_samples, x.shape[0], -1)
    return f.mean(0), torch.einsum("sbi,sbj->bij", f - f.mean(0), f - f.mean(0)) / (n_samples - 1)

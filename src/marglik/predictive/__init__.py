"""Predictives of a fitted posterior: GLM (linearised) and sampling, written against the interface.

Immer, Korzepa & Bauer, AISTATS 2021: the GLM predictive linearises the network at θ*,
f(x) ~ N(f(x; θ*), J(x) Σ J(x)ᵀ), and then applies a link approximation (classification) or adds
the observation noise (regression); the "nn" predictive runs the network at θ ~ q(θ).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.curvature.batches import (
    DICT_KEY_X,
    Inputs,
    batch_size,
    call_model,
    check_finite,
    detach,
    is_mapping,
    slice_inputs,
    to_model,
)
from marglik.curvature.engine import eval_mode
from marglik.likelihoods import Gaussian
from marglik.predictive.links import LINKS, bridge, bridge_log_alpha, monte_carlo, probit

if TYPE_CHECKING:
    from marglik.posterior.base import Posterior

__all__ = [
    "BACKENDS",
    "LINKS",
    "PRED_TYPES",
    "apply_link",
    "bridge",
    "bridge_log_alpha",
    "glm_moments",
    "monte_carlo",
    "nn_predictive",
    "predict",
    "probit",
]

PRED_TYPES = ("glm", "nn")
BACKENDS = ("auto", "layerwise", "generic")
CLASSIFICATION_TASKS = ("classification", "binary")


def predict(
    la: Posterior,
    x: Inputs,
    pred_type: str = "glm",
    link_approx: str = "probit",
    joint: bool = False,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    pred_var: bool = False,
    enable_backprop: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Posterior predictive at inputs x (B, ...).

    Args:
        la: a fitted posterior (any :class:`~marglik.posterior.base.Posterior`).
        x: inputs (B, ...), the model's input shape with a leading batch dimension; or a dict
            (``UserDict``, ``BatchEncoding``) of such tensors, passed as ``model(x)``, or a
            tuple of them, passed as ``model(*x)`` (:mod:`marglik.curvature.batches`).
        pred_type: ``"glm"`` (linearised, default) or ``"nn"`` (sample θ and run the network).
        link_approx: for classification with ``"glm"``: ``"probit"``, ``"bridge"``,
            ``"bridge_norm"`` (Laplace bridge, plain / normalised) or ``"mc"``. The ``"nn"``
            predictive always samples.
        joint: return the joint Gaussian over the batch, (f_mean (B·D,), cov (B·D, B·D)),
            input-major, for any likelihood (for classification: over the logits). GLM only.
        n_samples: samples for ``link_approx="mc"`` and for ``"nn"``.
        generator: random generator for the samples.
        pred_var: regression only: add the observation noise σ² to the variance, i.e. return the
            predictive variance of y instead of that of f.
        enable_backprop: keep the graph so that gradients flow to x through mean and variance;
            otherwise the outputs are detached (computed without a graph).
        chunk_size: inputs per chunk (default: bounded memory, chosen by the posterior).
        backend: for a weight-space :class:`~marglik.posterior.Laplace`: ``"auto"`` (layer-wise
            where it applies, else generic), ``"layerwise"`` or ``"generic"`` (per-sample
            Jacobians with ``torch.func``); see :mod:`marglik.posterior.glm`.

    Returns:
        classification / binary: probabilities with the model's output shape (B, ..., C);
        regression and other likelihoods: ``(f_mean, f_var)`` with f_mean of the model's output
        shape (B, ...) and f_var (B, D, D) over the D flattened outputs of one input — without
        the observation noise unless ``pred_var=True``; with ``joint=True`` see above.

    Raises:
        RuntimeError: the posterior is not fitted.
        ValueError: unknown ``pred_type`` / ``link_approx`` / ``backend``, an option that does not
            apply to the likelihood, or inputs the model cannot take.
    """
    if pred_type not in PRED_TYPES:
        raise ValueError(f"unknown pred_type {pred_type!r}: use one of {PRED_TYPES}")
    if link_approx not in LINKS:
        raise ValueError(f"unknown link_approx {link_approx!r}: use one of {LINKS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    la.require_fit()
    task = la.likelihood.task
    gaussian = isinstance(la.likelihood, Gaussian)
    if pred_var and not gaussian:
        raise ValueError(f"pred_var adds Gaussian observation noise: not for {task!r} likelihoods")
    if task == "binary" and link_approx in ("bridge", "bridge_norm") and not joint:
        raise ValueError("the Laplace bridge is for softmax outputs; use probit or mc for binary")
    if pred_type == "nn" and joint:
        raise ValueError("joint=True needs the GLM predictive (pred_type='glm')")
    x = _check_inputs(la, x, enable_backprop)
    with eval_mode(la.model), torch.set_grad_enabled(enable_backprop):
        out_shape = _output_shape(la, x)
        if task == "classification" and len(out_shape) < 1:
            raise ValueError("classification outputs must have a class dimension (B, ..., C)")
        if pred_type == "nn":
            out = nn_predictive(la, x, n_samples, generator, chunk_size)
            if pred_var:
                mean, var = out
                out = mean, var + _noise(la, out_shape, var)
        elif joint:
            f, cov = la.functional_moments(x, joint=True, create_graph=enable_backprop,
                                           backend=backend)
            if pred_var:
                cov = cov + torch.diag(_noise_diag(la, out_shape, cov).repeat(_n_inputs(la, x)))
            out = f.reshape(-1), cov
        else:
            out = _glm_marginals(la, x, task, link_approx, n_samples, generator, pred_var,
                                 enable_backprop, chunk_size, backend, out_shape)
    if enable_backprop:
        return out
    return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()


def _glm_marginals(la: Posterior, x: Tensor, task: str, link_approx: str, n_samples: int,
                   generator: torch.Generator | None, pred_var: bool, create_graph: bool,
                   chunk_size: int | None, backend: str, out_shape: torch.Size
                   ) -> Tensor | tuple[Tensor, Tensor]:
    results = []
    # softmax links read only the centred logits' Gaussian N(Pμ, PΣP) (links.project_to_zero_sum):
    # their covariance needs C − 1 output columns, not C
    centred = task == "classification" and link_approx != "mc"
    for f, cov in la.functional_moment_chunks(x, chunk_size, create_graph, backend, centred):
        if task in CLASSIFICATION_TASKS:
            results.append(apply_link(f, cov, link_approx, task == "binary", n_samples, generator))
        else:
            if pred_var:
                cov = cov + _noise(la, out_shape, cov)
            results.append((f, cov))
    if task in CLASSIFICATION_TASKS:
        return torch.cat(results)
    means, covs = zip(*results)
    return torch.cat(means), torch.cat(covs)


def glm_moments(la: Posterior, x: Tensor, joint: bool = False, chunk_size: int | None = None,
                backend: str = "auto", create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the linearised outputs of a fitted posterior at x (B, ...).

    Returns:
        ``joint=False``: f (B, ...) and per-input covariances (B, D, D) of the D flattened
        outputs; ``joint=True``: f (B, ...) and the covariance (B·D, B·D), ordered input-major.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    la.require_fit()
    return la.functional_moments(x, joint, chunk_size, create_graph, backend)


def apply_link(f: Tensor, cov: Tensor, link_approx: str, binary: bool, n_samples: int = 100,
               generator: torch.Generator | None = None) -> Tensor:
    """Probabilities (B, ..., C) from logits f (B, ..., C) and covariances cov (B, D, D).

    For outputs with positions (B, *S, C) each position uses its own C×C block (the
    probabilities at one position only depend on its marginal Gaussian).
    """
    B, C = f.shape[0], f.shape[-1] if f.ndim > 1 else 1
    R = f[0].numel() // C
    blocks = cov.reshape(B, R, C, R, C).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    mean = f.reshape(B, R, C)
    if link_approx == "probit":
        probs = probit(mean, blocks, binary)
    elif link_approx == "mc":
        probs = monte_carlo(mean, blocks, n_samples, binary, generator)
    else:
        probs = bridge(mean, blocks, normalize=link_approx == "bridge_norm")
    return probs.reshape(f.shape)


def _n_inputs(la: Posterior, x: Inputs) -> int:
    """Batch size B of x (a tensor, dict or tuple of inputs)."""
    return batch_size(x, getattr(la, "dict_key_x", DICT_KEY_X))


def _check_inputs(la: Posterior, x: Inputs, enable_backprop: bool) -> Inputs:
    if not isinstance(x, (Tensor, tuple, list)) and not is_mapping(x):
        raise ValueError(
            "x must be a tensor of inputs (B, ...), a dict or a tuple of such tensors, got "
            f"{type(x).__name__}"
        )
    if isinstance(x, Tensor) and (x.ndim == 0 or x.shape[0] == 0):
        raise ValueError(
            f"x must have a non-empty leading batch dimension, got shape {tuple(x.shape)}"
        )
    if not isinstance(x, Tensor) and _n_inputs(la, x) == 0:
        raise ValueError("x must have a non-empty leading batch dimension, got 0 inputs")
    x = to_model(x, la.model)
    check_finite(x)
    return x if enable_backprop else detach(x)


def _describe(x: Inputs) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}"
    if is_mapping(x):
        shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                  for k, v in x.items()}
        return f"a dict with shapes {shapes}"
    return f"a {type(x).__name__} with shapes " + str(
        [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in x])


def _output_shape(la: Posterior, x: Inputs) -> torch.Size:
    """Shape of one output, checking that the model takes x and keeps the batch dimension."""
    with torch.no_grad():
        try:
            f = call_model(la.model, slice_inputs(x, 0, 1))
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as err:
            raise ValueError(
                f"the model cannot be applied to inputs of {_describe(x)} "
                f"(batch of {_n_inputs(la, x)}): {err}"
            ) from err
    if not isinstance(f, Tensor) or f.ndim == 0 or f.shape[0] != 1:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"the model must return a tensor (B, ...) keeping the batch dimension, "
                         f"got {shape} for one input")
    return f.shape[1:]


def _noise_diag(la: Posterior, out_shape: torch.Size, like: Tensor) -> Tensor:
    """σ² for each of the D flattened outputs of one input: (D,)."""
    sigma = la.sigma_noise.detach().to(like)
    C = out_shape[-1] if len(out_shape) else 1
    D = out_shape.numel()
    return (sigma.square() * torch.ones(C, dtype=like.dtype, device=like.device)).repeat(D // C)


def _noise(la: Posterior, out_shape: torch.Size, like: Tensor) -> Tensor:
    return torch.diag(_noise_diag(la, out_shape, like))


def nn_predictive(
    la: Posterior,
    x: Inputs,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The sampling predictive from ``la.function_samples`` (underfits compared to the GLM one).

    Returns:
        classification / binary: mean probabilities (B, ..., C); otherwise the sample mean
        (B, ...) and sample covariance (B, D, D) of the outputs (no observation noise).
    """
    task = la.likelihood.task
    if task not in CLASSIFICATION_TASKS and n_samples < 2:
        raise ValueError("the nn predictive needs n_samples >= 2 for a covariance")
    f = la.function_samples(x, n_samples, generator, chunk_size)  # (S, B, ...)
    if task == "classification":
        return torch.softmax(f, -1).mean(0)
    if task == "binary":
        return torch.sigmoid(f).mean(0)
    mean = f.mean(0)
    centred = (f - mean).reshape(n_samples, f.shape[1], -1)
    return mean, torch.einsum("sbi,sbj->bij", centred, centred) / (n_samples - 1)

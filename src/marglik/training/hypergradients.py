"""Cheap estimators of the evidence gradient in hyperparameters h that act on the curvature.

Immer, van der Ouderaa, Rätsch, Fortuin & van der Wilk, "Invariance Learning in Deep Neural
Networks with Differentiable Laplace Approximations" (LILA), NeurIPS 2022, §4
(../shared/docs/methods.md §5). The Laplace evidence of a model whose forward pass uses h (the
extents η of a learned augmentation, :mod:`marglik.layers.augmentation`),

    log Z(h) = log p(D | θ, h) − ½ (θ−μ0)ᵀP0(θ−μ0) − ½ (log det(H(h)/T + P0) − log det P0),

depends on h through the data-fit statistics s (sums over the data) and the curvature H: KFAC
factors G ⊗ A per layer (G a sum over the data, A a mean), dense and diagonal blocks (sums).
Differentiating through a refit over all the data (``"refit"``, exact:
:func:`~marglik.training.hyperparameters.differentiable_evidence`) keeps the autograd graph of
every batch until the backward pass. The two estimators of the paper need one plain fit F of all
the data (no graph) and a differentiable fit of some batches B (n_B of the N points):

- ``"minibatch"`` (the paper's partial fit): evaluate log Z at

      F + w ⊙ (F_B − sg(F_B)),   w = N/n_B for sums (G, dense, diagonal, s), 1 for means (A),

  with sg the stop-gradient: its value is the full-data evidence and its h-gradient is
  ⟨∂ log Z/∂F, w ⊙ ∂F_B/∂h⟩ — one autograd pass through the batches' graph.
- ``"jvp"`` (the authors' ``jvecprod``: ∂ log Z/∂F contracted with the batch factors' Jacobian
  in h): the same gradient, accumulated batch by batch.
  ∂ log Z/∂F is taken once, at the full-data values; for a Kronecker block it is the derivative of
  Σ_ij log(s μ_i λ_j + δ) through the eigenbases of the factors,

      ∂ log det P/∂G = s Q_G diag(Σ_j λ_j / (s μ_i λ_j + δ)) Q_Gᵀ,
      ∂ log det P/∂A = s Q_A diag(Σ_i μ_i / (s μ_i λ_j + δ)) Q_Aᵀ,

  (autograd of the eigenvalues, which is this first-order perturbation and stays finite for
  repeated eigenvalues), then each batch b contributes ⟨∂ log Z/∂F, ∂F_b/∂h⟩ with its own graph,
  freed before the next batch: the memory of one batch, whatever the number of batches.

What they estimate: ∇_h log Z at the current θ, δ, σ and h, for the full-data structure (KFAC's
factors held at their full-data values: the gradient of the linearisation of log Z in F around
them). Over B drawn uniformly (a fixed number of points) the estimate is unbiased; when B is the
whole data set it is the exact gradient (that of ``"refit"``); for the same B the two agree. The
weights assume KFAC's A counts the same number of positions per input in every batch (images of
one size). A step of h moves F away from the fit, so :func:`~marglik.training.online.
marglik_training` takes one step of h per evidence update (the next update refits).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from marglik.evidence.laplace import laplace_log_evidence
from marglik.posterior import Laplace
from marglik.structures import BlockDiagonal, CurvatureBlock, Dense, Diagonal, Kronecker

__all__ = ["BLOCK_PARTS", "HYPER_GRADIENTS", "BlockParts", "check_hyper_options",
           "estimate_hyper_gradient", "evidence_at", "jvp_gradient", "minibatch_gradient",
           "stand_in"]

#: ``marglik_training(hyper_gradient=...)``: how the gradient in h is found
HYPER_GRADIENTS = ("refit", "minibatch", "jvp")


@dataclass(frozen=True)
class BlockParts:
    """How a curvature block is made of data sums: its tensors (attribute names), which of them
    are means over the data rather than sums, and how to build the block from them."""

    names: tuple[str, ...]
    means: tuple[str, ...]
    build: Callable[..., CurvatureBlock]


#: block type -> its parts (a new block type registers here)
BLOCK_PARTS: dict[type, BlockParts] = {
    Kronecker: BlockParts(("G", "A"), ("A",), Kronecker),
    Dense: BlockParts(("H",), (), Dense),
    Diagonal: BlockParts(("h",), (), Diagonal),
}


def _parts(block: CurvatureBlock) -> BlockParts:
    parts = BLOCK_PARTS.get(type(block))
    if parts is None:
        raise ValueError(f"{type(block).__name__} curvature blocks are not supported by the "
                         "cheap hyperparameter gradients: use hyper_gradient='refit'")
    return parts


def _tensors(la: Laplace) -> list[dict[str, Tensor]]:
    """Per block of ``la.H``: name -> tensor."""
    return [{n: getattr(b, n) for n in _parts(b).names} for b in la.H.blocks]


def _build(la: Laplace, tensors: list[dict[str, Tensor]]) -> BlockDiagonal:
    return BlockDiagonal([_parts(b).build(**t) for b, t in zip(la.H.blocks, tensors,
                                                                 strict=True)])


def evidence_at(la: Laplace, H: BlockDiagonal, statistics: dict[str, Tensor],
                prior_precision: Tensor, sigma_noise: Tensor | None) -> Tensor:
    """log Z of ``la`` with its curvature and data-fit statistics replaced (``la`` unchanged)."""
    other = copy.copy(la)
    other.H, other.statistics = H, statistics
    return laplace_log_evidence(other.log_likelihood(sigma_noise), other.scatter(prior_precision),
                                other.log_det_ratio(prior_precision, sigma_noise))


def stand_in(full: Laplace, part: Laplace, n_data: int) -> tuple[BlockDiagonal, dict]:
    """(H, s) = F + w ⊙ (F_B − sg(F_B)): the values of the full-data fit ``full`` (N =
    ``n_data`` points) with the gradient of the differentiable fit ``part`` of n_B points standing
    for the data set (w = N/n_B for sums, 1 for means)."""
    if len(part.H.blocks) != len(full.H.blocks):
        raise ValueError("the batch fit and the full-data fit have different curvature blocks")
    w = n_data / part.n_data
    tensors = []
    for b, tf, tp in zip(full.H.blocks, _tensors(full), _tensors(part), strict=True):
        means = _parts(b).means
        tensors.append({n: tf[n].detach() + (1.0 if n in means else w) * (tp[n] - tp[n].detach())
                        for n in tf})
    stats = {k: v.detach() + w * (part.statistics[k] - part.statistics[k].detach())
             for k, v in full.statistics.items()}
    return _build(full, tensors), stats


def minibatch_gradient(full: Laplace, part: Laplace, n_data: int, prior_precision: Tensor,
                       sigma_noise: Tensor | None,
                       hyperparameters: Sequence[Tensor]) -> list[Tensor | None]:
    """∂ log Z/∂h from the differentiable fit ``part`` of some batches (``fit(create_graph=True)``)
    standing in for the full-data fit ``full``: the ``"minibatch"`` estimator (module docstring).
    One entry per hyperparameter (None where it does not affect the evidence)."""
    H, stats = stand_in(full, part, n_data)
    value = evidence_at(full, H, stats, prior_precision.detach(),
                        None if sigma_noise is None else sigma_noise.detach())
    return list(torch.autograd.grad(value, list(hyperparameters), allow_unused=True))


def jvp_gradient(full: Laplace, fit_batch: Callable[[object], Laplace], batches: Iterable,
                 n_data: int, prior_precision: Tensor, sigma_noise: Tensor | None,
                 hyperparameters: Sequence[Tensor]) -> list[Tensor | None]:
    """∂ log Z/∂h accumulated batch by batch: the ``"jvp"`` estimator (module docstring).

    Args:
        full: the Laplace fitted (without a graph) on all N = ``n_data`` training points.
        fit_batch: batch -> a Laplace fitted on that batch with ``create_graph=True``.
        batches: the batches B (each visited once); all the data gives the exact gradient.
        prior_precision, sigma_noise: δ and σ (held fixed).
        hyperparameters: the tensors h.

    Returns:
        one gradient per hyperparameter (None where it does not affect the evidence).
    """
    delta = prior_precision.detach()
    sigma = None if sigma_noise is None else sigma_noise.detach()
    leaves = [{n: t.detach().requires_grad_(True) for n, t in blk.items()} for blk in
              _tensors(full)]
    stats = {k: v.detach().requires_grad_(True) for k, v in full.statistics.items()}
    value = evidence_at(full, _build(full, leaves), stats, delta, sigma)
    flat = [t for blk in leaves for t in blk.values()] + list(stats.values())
    dF = iter(torch.autograd.grad(value, flat, allow_unused=True))
    # ∂ log Z/∂F per block tensor and statistic; N × the sums' and n_b × the means' weights
    W = [{n: next(dF) for n in blk} for blk in leaves]
    Ws = {k: next(dF) for k in stats}
    means = [_parts(b).means for b in full.H.blocks]
    total: list[Tensor | None] = [None] * len(hyperparameters)
    n_used = 0
    for batch in batches:
        part = fit_batch(batch)
        inner = sum(((W[i][n] * t).sum() * (part.n_data if n in means[i] else n_data)
                     for i, blk in enumerate(_tensors(part)) for n, t in blk.items()
                     if W[i][n] is not None), start=torch.zeros((), dtype=part.H.dtype))
        inner = inner + n_data * sum((Ws[k] * v).sum() for k, v in part.statistics.items()
                                     if Ws[k] is not None)
        grads = torch.autograd.grad(inner, list(hyperparameters), allow_unused=True)
        total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, grads)]
        n_used += part.n_data
    if n_used == 0:
        raise ValueError("no batch to estimate the hyperparameter gradient from")
    return [None if t is None else t / n_used for t in total]


def estimate_hyper_gradient(method: str, full: Laplace, make: Callable[[], Laplace],
                            batches: Iterable, n_data: int, prior_precision: Tensor,
                            sigma_noise: Tensor | None,
                            hyperparameters: Sequence[Tensor]) -> list[Tensor | None]:
    """∂ log Z/∂h by ``"minibatch"`` (``batches`` fitted together) or ``"jvp"`` (one by one).

    ``make()`` returns an unfitted Laplace with the settings of ``full``.
    """
    if method == "minibatch":
        part = make().fit(batches, create_graph=True)
        return minibatch_gradient(full, part, n_data, prior_precision, sigma_noise,
                                  hyperparameters)
    if method == "jvp":
        return jvp_gradient(full, lambda b: make().fit([b], create_graph=True), batches, n_data,
                            prior_precision, sigma_noise, hyperparameters)
    raise ValueError(f"hyper_gradient must be one of {HYPER_GRADIENTS[1:]} here, got {method!r}")


def check_hyper_options(method: str, n_extra: int, lr: float | None, scheduler_cls: type | None,
                        bound: bool) -> None:
    """``marglik_training``'s options for the hyperparameters h, checked.

    Raises:
        ValueError: an unknown method, a learning rate that is not positive and finite, or an
            option for h without registered hyperparameters (or with ``evidence="bound"``).
    """
    if method not in HYPER_GRADIENTS:
        raise ValueError(f"hyper_gradient must be one of {HYPER_GRADIENTS}, got {method!r}")
    given = [name for name, value in (("hyper_gradient", method != "refit"),
                                      ("lr_hyperparameters", lr is not None),
                                      ("hyper_scheduler_cls", scheduler_cls is not None)) if value]
    if given and not n_extra:
        raise ValueError(f"{', '.join(given)} apply only with hyperparameters")
    if method != "refit" and bound:
        raise ValueError("hyper_gradient='minibatch' or 'jvp' applies to evidence='laplace'")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not 0 < lr < float("inf")):
        raise ValueError(f"lr_hyperparameters must be positive and finite, got {lr!r}")

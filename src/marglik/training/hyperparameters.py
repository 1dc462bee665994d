"""The evidence estimates that :func:`~marglik.training.online.marglik_training` steps on.

Two sources of the hyperparameter objective during training:

- ``"laplace"``: the Laplace evidence over the whole training set (Immer et al., ICML 2021),

      log Z = log p(D|θ) − ½ (θ−μ0)ᵀP0(θ−μ0) − ½ (log det(P0 + H/T) − log det P0),

  refitted over all the data (with a graph to registered hyperparameters h when there are any:
  :func:`differentiable_evidence`).
- ``"bound"``: the unbiased mini-batch estimate of the data-partitioned lower bound (Immer, van der
  Ouderaa, van der Wilk, Rätsch & Schölkopf, ICML 2023;
  :class:`marglik.evidence.PartitionedEvidence` over the loader's batches). A batch b of M points
  stands for the N training points:

      log Z ≥ E_b[(N/M) (log p(D_b|θ) − ½ log det(P0 + H_b/T) + ½ log det P0)] − ½ (θ−μ0)ᵀP0(θ−μ0),

  exactly the partitioned bound when all batches hold M points (Fischer's inequality on the
  function-space log-determinant; with an exact per-batch curvature, ``"full"``, it bounds the
  exact Laplace evidence). One hyperparameter step then costs one batch's curvature, not a pass
  over the data (:func:`minibatch_bound`). Rescaling the batch's *curvature* instead,
  log det(P0 + (N/M) H_b/T), is not a bound and is biased (what ``hyper_batches`` does).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from marglik.evidence.laplace import laplace_log_evidence
from marglik.posterior import Laplace

__all__ = ["EVIDENCES", "FirstBatches", "check_hyperparameters", "cycled_batches",
           "differentiable_evidence", "minibatch_bound"]

#: ``marglik_training(evidence=...)``: what one hyperparameter step maximises.
EVIDENCES = ("laplace", "bound")


class FirstBatches:
    """The first ``k`` batches of a fresh pass over ``loader`` (re-iterable)."""

    def __init__(self, loader: Iterable, k: int):
        self.loader, self.k = loader, k

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.k)


def cycled_batches(loader: Iterable, k: int) -> Iterator:
    """The next ``k`` batches of fresh passes over ``loader``, starting a new pass when one ends.

    Raises:
        ValueError: ``loader`` yields no batch.
    """
    it = iter(loader)
    for _ in range(k):
        try:
            yield next(it)
        except StopIteration:
            it = iter(loader)
            try:
                yield next(it)
            except StopIteration:
                raise ValueError("the loader of the bound's batches is empty") from None


def check_hyperparameters(
    hyperparameters: Tensor | Iterable[Tensor] | None, model: nn.Module
) -> list[Tensor]:
    """The registered hyperparameters as a list of distinct leaf tensors requiring grad."""
    if hyperparameters is None:
        return []
    if isinstance(hyperparameters, Tensor):
        hyperparameters = [hyperparameters]
    try:
        given = list(hyperparameters)
    except TypeError:
        raise ValueError(
            "hyperparameters must be a tensor or an iterable of tensors, got "
            f"{type(hyperparameters).__name__}"
        ) from None
    seen: set[int] = set()
    for i, h in enumerate(given):
        if not isinstance(h, Tensor):
            raise ValueError(f"hyperparameters[{i}] is a {type(h).__name__}, not a tensor")
        if not h.is_floating_point():
            raise ValueError(f"hyperparameters[{i}] must be a floating tensor, got {h.dtype}")
        if not h.requires_grad:
            raise ValueError(
                f"hyperparameters[{i}] does not require grad: create it with "
                "requires_grad=True (or as an nn.Parameter)"
            )
        if not h.is_leaf:
            raise ValueError(
                f"hyperparameters[{i}] is not a leaf tensor (it is computed from other "
                "tensors): register the tensor the optimizer should update"
            )
        if id(h) in seen:
            raise ValueError(f"hyperparameters[{i}] is registered twice")
        seen.add(id(h))
    return given


def differentiable_evidence(
    la: Laplace,
    loader: Iterable,
    n_data: int,
    prior_precision: Tensor,
    sigma_noise: Tensor | None,
) -> Tensor:
    """log Z at δ, σ from a curvature fitted with a graph to the registered hyperparameters.

    If ``loader`` yields only n < N = ``n_data`` samples, they stand for the data set: the
    data-fit statistics are scaled by N/n and the curvature by tempering T → T·n/N.
    """
    la.fit(loader, create_graph=True)
    if la.n_data < n_data:
        factor = n_data / la.n_data
        la.statistics = {k: v * factor for k, v in la.statistics.items()}
        la.temperature = la.temperature / factor
    return la.log_marginal_likelihood(prior_precision, sigma_noise)


def minibatch_bound(
    la: Laplace, n_data: int, prior_precision: Tensor, sigma_noise: Tensor | None
) -> Tensor:
    """The mini-batch estimate of the data-partitioned evidence bound (ICML 2023), 0-d.

    From ``la`` fitted on one batch of M points (with a graph to registered hyperparameters,
    ``fit(create_graph=True)``, to differentiate in them):

        (N/M) (log p(D_b|θ) − ½ (log det(P0 + H_b/T) − log det P0)) − ½ (θ−μ0)ᵀP0(θ−μ0),

    differentiable in ``prior_precision`` and ``sigma_noise``. Averaged over the batches of a
    partition of the data into equal batches it is the bound itself.
    """
    scale = n_data / la.n_data
    return laplace_log_evidence(
        scale * la.log_likelihood(sigma_noise),
        la.scatter(prior_precision),
        scale * la.log_det_ratio(prior_precision, sigma_noise),
    )

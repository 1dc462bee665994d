"""Data-partitioned lower bound of the Laplace evidence and its stochastic estimate.

Immer, van der Ouderaa, van der Wilk, Rätsch & Schölkopf (ICML 2023). In its function-space form
the log-determinant of the Laplace evidence is that of an R × R matrix over the R = N·C training
outputs, log det P − log det P0 = log det(I + Λ^½ J P0⁻¹ Jᵀ Λ^½) (Immer, Korzepa & Bauer,
AISTATS 2021). Split the data into partitions b; the matrix's diagonal blocks are the same matrix
for each partition alone, I + Λ_b^½ J_b P0⁻¹ J_bᵀ Λ_b^½, whose log-determinant is the partition's
own log det(P0 + H_b/T) − log det P0. Fischer's inequality (det A ≤ Π_b det A_bb for A ≻ 0) gives

    log Z ≥ log p(D|θ*) − ½ (θ* − μ0)ᵀ P0 (θ* − μ0) − ½ Σ_b [log det(P0 + H_b/T) − log det P0],

tight for one partition and growing as partitions are merged. Sampling k of the B partitions
uniformly without replacement and rescaling their sum by B/k is an unbiased estimate of the bound
(the data fit and scatter stay exact): a hyperparameter gradient then costs k partitions.

With an exact curvature per partition (``"full"`` or ``"kernel"``) the bound is one of the exact
Laplace evidence; with ``"kron"`` / ``"diag"`` it bounds the evidence those structures would give
if they were exact per partition (not a bound of the whole-data KFAC evidence).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.evidence.laplace import laplace_log_evidence

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace

__all__ = ["PartitionedEvidence"]


class PartitionedEvidence:
    """log Z lower bound over data partitions, for the hyperparameters of a fitted posterior.

    Args:
        la: a fitted :class:`~marglik.Laplace` posterior over all the data (its data fit and
            scatter are used; its structure, subset, prior, σ and temperature are those of the
            partitions).
        partitions: a sequence of partitions of the same data, each an iterable of batches
            (x, y) — e.g. ``[[batch] for batch in loader]`` for the loader's batches of M
            points. Each is fitted once (a shallow copy of ``la``; the model is shared).
        structure: the partitions' ``hessian_structure`` (default ``la``'s); ``"kernel"`` fits
            each exactly at rank ≤ M·C, whatever structure ``la`` has.

    Call it like :meth:`~marglik.Laplace.log_marginal_likelihood`, optionally with ``sample=k``
    partitions drawn (``generator``) for the unbiased stochastic estimate. Differentiable in
    ``prior_precision`` and ``sigma_noise``; unlike ``log_marginal_likelihood`` it stores
    neither.
    """

    def __init__(self, la: Laplace, partitions: Sequence[Iterable],
                 structure: str | None = None):
        la.require_fit()
        if len(partitions) == 0:
            raise ValueError("partitions is empty: give at least one partition of the data")
        if getattr(la, "tangent", None) is not None:
            raise ValueError("the posterior is of a tangent model (method='tangent'): the "
                             "partitions would be fitted at the network's outputs instead")
        self.la = la
        self.parts: list[Laplace] = []
        n_data = 0
        for part in partitions:
            other = copy.copy(la)
            other.hessian_structure = structure or la.hessian_structure
            other.fit(part)
            n_data += other.n_data
            self.parts.append(other)
        if n_data != la.n_data:
            raise ValueError(f"the partitions hold {n_data} data points, the posterior was "
                             f"fitted on {la.n_data}: they must partition the same data")

    def __len__(self) -> int:
        return len(self.parts)

    def __call__(
        self,
        prior_precision: Tensor | None = None,
        sigma_noise: Tensor | None = None,
        sample: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The bound (``sample=None``) or its unbiased estimate from ``sample`` partitions
        drawn uniformly without replacement (``generator``), 0-d."""
        if sample is None:
            return self.estimate(range(len(self.parts)), prior_precision, sigma_noise)
        if not isinstance(sample, int) or not 1 <= sample <= len(self.parts):
            raise ValueError(f"sample must be an integer in [1, {len(self.parts)}], the number "
                             f"of partitions, got {sample!r}")
        chosen = torch.randperm(len(self.parts), generator=generator)[:sample].tolist()
        return self.estimate(chosen, prior_precision, sigma_noise)

    def estimate(self, indices: Iterable[int], prior_precision: Tensor | None = None,
                 sigma_noise: Tensor | None = None) -> Tensor:
        """log p(D|θ*) − ½ scatter − ½ (B/k) Σ_{b ∈ indices} [log det(P0 + H_b/T) − log det P0]
        for k distinct partition ``indices`` (all of them: the bound); 0-d."""
        chosen = list(indices)
        if not chosen or len(set(chosen)) != len(chosen) or not all(
                isinstance(b, int) and 0 <= b < len(self.parts) for b in chosen):
            raise ValueError(f"indices must be distinct partitions in [0, {len(self.parts)}), "
                             f"got {chosen!r}")
        ratios = sum(self.parts[b].log_det_ratio(prior_precision, sigma_noise) for b in chosen)
        return laplace_log_evidence(
            self.la.log_likelihood(sigma_noise), self.la.scatter(prior_precision),
            len(self.parts) / len(chosen) * ratios,
        )

"""Partitioned lower bounds of the exact-GGN Laplace evidence in function space, and their
stochastic estimates (Immer, van der Ouderaa, van der Wilk, Rätsch & Schölkopf, ICML 2023).

With the rows G = Λ^½ J (N·C × P) of :mod:`~marglik.evidence.bounds.rows`, P0 = diag(δ) and
s = (σ_rows/σ)²/T, the exact log-determinant term of the evidence is that of the PD matrix
A = I_{NC} + s·G P0⁻¹ Gᵀ (function space) or, equally, of P0⁻¹(P0 + s·GᵀG) (weight space).
Fischer's inequality, det A ≤ Π_b det A_bb for A ≻ 0 and any partition of its index set,
applied to both gives a lower bound of log Z for every partition of

- the data (blocks of points, :mod:`~marglik.evidence.bounds.partitions`): the kernel is
  made block-diagonal over the blocks;
- the outputs: each block (b, c) keeps only the rows of output c — the N×N kernel blocks
  between outputs c ≠ c' are dropped, i.e. the NTK's covariance between outputs *and* the
  coupling of the outputs through Λ (the softmax's −p pᵀ) outside its symmetric root's row c;
- the parameters (block-diagonal GGN over tensors, layers or prior groups; the diagonal GGN):
  P0 + s·GᵀG made block-diagonal, which for each (data, output) block is
  Σ_g log det(I + s·G_{b,g} P0_g⁻¹ G_{b,g}ᵀ);

and every combination (a refinement of a partition is a partition of the blocks):

    log Z ≥ log p(D|θ*) − ½ (θ*−μ0)ᵀP0(θ*−μ0) − ½ Σ_{b,c,g} log det(I + s·G_bcg P0_g⁻¹ G_bcgᵀ).

Refining any partition can only lower the bound; with one block of each it is the exact
(full-GGN) Laplace evidence. KFAC is *not* a partition of this kind — its Kronecker factors
are no block of P0 + s·GᵀG — and its evidence is no guaranteed bound (it can lie above the
exact one); it is compared in ``benchmarks/bounds.py``, not offered here.

Stochastic estimates: drawing k of the B data blocks uniformly without replacement and scaling
their sum by B/k, and (output partitions) one output c_b per drawn block uniformly and scaling
its term by C, are unbiased for the log-determinant term, hence for the bound; the data fit and
scatter stay exact. A hyperparameter gradient then costs k blocks of M points and one output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.evidence.bounds.partitions import check_partitions
from marglik.evidence.bounds.rows import function_space_rows, parameter_blocks
from marglik.evidence.laplace import laplace_log_evidence
from marglik.likelihoods.gaussian import check_sigma
from marglik.structures.base import sym_eigvalsh

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace

__all__ = ["KernelBound", "gram_eigenvalues", "log_det_ratio_rows", "log_det_ratio_spectrum"]


def log_det_ratio_rows(rows: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
    """log det(I_r + s·R D⁻¹ Rᵀ) = log det(D + s·RᵀR) − log det D, D = diag(δ), by Cholesky
    of whichever side is smaller (Sylvester's determinant identity).

    Args:
        rows: R (..., r, p).
        scale: s, 0-d.
        delta: δ > 0, 0-d or (p,).

    Returns:
        (...).
    """
    r, p = rows.shape[-2:]
    if r <= p:
        gram = (rows / delta) @ rows.mT
    else:
        weighted = rows * delta.rsqrt()
        gram = weighted.mT @ weighted
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + scale * gram)
    return 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def log_det_ratio_spectrum(eigenvalues: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
    """Σ_i log(1 + s·λ_i/δ) for the eigenvalues λ (..., k) of R Rᵀ (zero-padded) and one δ per
    block, 0-d or (...): (...). Equals :func:`log_det_ratio_rows` for a block with a single δ."""
    if delta.ndim:
        delta = delta.unsqueeze(-1)
    return torch.log1p(scale * eigenvalues / delta).sum(-1)


def gram_eigenvalues(rows: Tensor) -> Tensor:
    """Eigenvalues of R Rᵀ (= the non-zero ones of Rᵀ R) from the smaller Gram matrix,
    clamped at 0: (..., min(r, p)) for rows R (..., r, p)."""
    gram = rows @ rows.mT if rows.shape[-2] <= rows.shape[-1] else rows.mT @ rows
    return sym_eigvalsh(gram)


class KernelBound:
    """Data-, output- and parameter-partitioned lower bounds of the exact-GGN Laplace evidence.

    Args:
        la: a fitted :class:`~marglik.Laplace` (its data fit, scatter, parameters, prior, σ and
            temperature are used; its curvature structure is not: the bounds are of the exact
            GGN, recomputed here from the data).
        data: the data ``la`` was fitted on, an iterable of batches (x, y); point i is the
            i-th in iteration order. The rows Λ_n^½ J_n, N·C·P numbers, are kept.
        partitions: index blocks partitioning [0, N) (e.g. :func:`~marglik.evidence.bounds.
            class_partitions`); default one block of all the data.
        rows: instead of ``data``, the rows (N, C, P) of
            :func:`~marglik.evidence.bounds.rows.function_space_rows` for ``la`` (computed
            once, shared by several bounds).
        outputs: partition the outputs too (one block per data block and output; Λ^½ is the
            symmetric root, :mod:`~marglik.evidence.bounds.rows`).
        parameters: ``None`` (full GGN), ``"tensors"``, ``"layers"``, ``"prior"`` (the
            prior's groups), ``"diag"`` or lists of tensor names
            (:func:`~marglik.evidence.bounds.rows.parameter_blocks`).

    The spectrum of every block is computed once (eigenvalues of its smaller Gram matrix,
    O(r·p·min(r, p)) for forming it and O(min(r, p)³) for ``eigvalsh``), so
    the bound at a δ that is one value per parameter block (scalar, per prior group for blocks
    inside a group, any δ for ``"diag"``) costs O(B·C·G·k) operations; other δ go through a
    Cholesky factorisation per block. Differentiable in ``prior_precision`` and
    ``sigma_noise``; nothing is stored on ``la``.
    """

    def __init__(self, la: Laplace, data: Iterable | None,
                 partitions: Sequence[Tensor] | None = None, outputs: bool = False,
                 parameters: str | Sequence[Sequence[str]] | None = None,
                 rows: Tensor | None = None):
        la.require_fit()
        if getattr(la, "tangent", None) is not None:
            raise ValueError("the posterior is of a tangent model (method='tangent'): the "
                             "bounds are of the network's Laplace evidence")
        if getattr(la, "curvature", "ggn") != "ggn":
            raise ValueError(f"the bounds are of the exact-GGN evidence; la was fitted with "
                             f"curvature={la.curvature!r}: fit it with curvature='ggn'")
        if not isinstance(outputs, bool):
            raise TypeError(f"outputs must be True or False, got {outputs!r}")
        self.la = la
        self.blocks, self.groups = parameter_blocks(la, parameters)
        if (data is None) == (rows is None):
            raise ValueError("give either data or rows (from function_space_rows), not both")
        self.rows = function_space_rows(la, data) if rows is None else rows.detach()
        if self.rows.ndim != 3 or self.rows.shape[-1] != la.n_params:
            raise ValueError(f"rows must have shape (N, C, {la.n_params}), got "
                             f"{tuple(self.rows.shape)}")
        if len(self.rows) != la.n_data:
            raise ValueError(f"data holds {len(self.rows)} points, the posterior was fitted on "
                             f"{la.n_data}: give the same data")
        self.sigma_rows = None if la.sigma_noise is None else la.sigma_noise.detach().clone()
        self.partitions = (check_partitions(partitions, la.n_data) if partitions is not None
                           else [torch.arange(la.n_data)])
        self.outputs = outputs
        #: eigenvalues of R Rᵀ for every (data block, output block, parameter block), (B, C', G, k)
        self.spectra = self._spectra()

    def __len__(self) -> int:
        return len(self.partitions)

    @property
    def n_outputs(self) -> int:
        """C, the number of outputs."""
        return self.rows.shape[1]

    # ---- blocks ----------------------------------------------------------------------------
    def _cells(self, parts: Sequence[int], columns: Tensor | None
               ) -> list[tuple[list[int], Tensor]]:
        """Rows of the blocks of data ``parts`` (their positions in ``parts`` and the rows
        (B', C', r, p)), grouped by block size; ``columns`` selects parameters."""
        by_size: dict[int, list[int]] = {}
        for i, b in enumerate(parts):
            by_size.setdefault(len(self.partitions[b]), []).append(i)
        out = []
        for where in by_size.values():
            idx = torch.stack([self.partitions[parts[i]] for i in where])  # (B', M)
            R = self.rows[idx.to(self.rows.device)]  # (B', M, C, P)
            if columns is not None:
                R = R[..., columns.to(R.device)]
            if self.outputs:
                R = R.transpose(1, 2)  # (B', C, M, p)
            else:
                R = R.reshape(R.shape[0], 1, -1, R.shape[-1])  # (B', 1, M·C, p)
            out.append((where, R))
        return out

    def _spectra(self) -> Tensor:
        parts = list(range(len(self.partitions)))
        if self.blocks is None:  # diagonal: λ = Σ_rows G² per parameter
            per = [(where, R.square().sum(-2)) for where, R in self._cells(parts, None)]
            return self._assemble(per, (self.rows.shape[-1], 1), lambda v: v.unsqueeze(-1))
        columns = []
        for cols in self.blocks:
            columns.append([(where, gram_eigenvalues(R)) for where, R in self._cells(parts, cols)])
        k = max(v.shape[-1] for per in columns for _, v in per)
        G = len(self.blocks)
        out = None
        for g, per in enumerate(columns):
            for where, v in per:
                if out is None:
                    out = v.new_zeros(len(parts), v.shape[1], G, k)
                out[where, :, g, : v.shape[-1]] = v
        return out

    def _assemble(self, per, tail, reshape) -> Tensor:
        first = per[0][1]
        out = first.new_zeros(len(self.partitions), first.shape[1], *tail)
        for where, v in per:
            out[where] = reshape(v)
        return out

    # ---- hyperparameters -------------------------------------------------------------------
    def _scale(self, sigma_noise: Tensor | None) -> Tensor:
        """s = (σ_rows/σ)²/T (0-d)."""
        la = self.la
        scale = torch.tensor(1.0 / la.temperature, dtype=self.rows.dtype, device=self.rows.device)
        if self.sigma_rows is None:
            if sigma_noise is not None:
                raise ValueError(f"sigma_noise only applies to regression, not "
                                 f"{la.likelihood.task}")
            return scale
        sigma = la.sigma_noise if sigma_noise is None else check_sigma(sigma_noise)
        ratio = self.sigma_rows.to(scale) / sigma.to(scale)
        if ratio.numel() > 1:
            if not torch.equal(sigma.detach().to(scale), self.sigma_rows.to(scale)):
                raise ValueError("a per-output sigma_noise cannot change after the rows were "
                                 "computed: build the bound again")
            return scale
        return scale * ratio.reshape(()) ** 2

    def _block_deltas(self, delta: Tensor) -> tuple[Tensor, list[int]]:
        """One δ per parameter block, 0-d or (G,) — a placeholder 1 where a block needs the
        per-parameter path — and the blocks that do."""
        kind = self.la.prior.kind(delta)
        expanded = self.la.expand_prior(delta).to(self.rows)
        if expanded.ndim == 0:
            return expanded, []
        if self.blocks is None:
            return expanded, []
        firsts = torch.stack([expanded[cols[0]] for cols in self.blocks])
        direct = [g for g, (cols, group) in enumerate(zip(self.blocks, self.groups))
                  if len(cols) > 1 and (kind == "parameter" or group is None)]
        return firsts, direct

    # ---- the bound -------------------------------------------------------------------------
    def terms(self, parts: Sequence[int], prior_precision: Tensor | None = None,
              sigma_noise: Tensor | None = None) -> Tensor:
        """log det(I + s·G_{bc} P0⁻¹ G_{bc}ᵀ) of every output block of the data blocks
        ``parts``, summed over parameter blocks: (k, C') with C' = C for output partitions,
        else 1."""
        delta = torch.as_tensor(self.la.prior_precision if prior_precision is None
                                else prior_precision)
        scale = self._scale(sigma_noise)
        deltas, direct = self._block_deltas(delta)
        index = torch.as_tensor(list(parts), dtype=torch.long, device=self.spectra.device)
        spectra = self.spectra[index]  # (k, C', G, kmax)
        if direct:
            keep = [g for g in range(spectra.shape[2]) if g not in direct]
            total = log_det_ratio_spectrum(spectra[:, :, keep], scale, deltas[keep]).sum(-1)
            expanded = self.la.expand_prior(delta).to(self.rows)
            for g in direct:
                cols = self.blocks[g]
                values = total.new_zeros(total.shape)
                for where, R in self._cells(list(parts), cols):
                    values = values.index_put(
                        (torch.tensor(where, device=values.device),),
                        log_det_ratio_rows(R, scale, expanded[cols.to(expanded.device)]))
                total = total + values
            return total
        return log_det_ratio_spectrum(spectra, scale, deltas).sum(-1)

    def estimate(self, parts: Iterable[int], outputs: Sequence[int] | None = None,
                 prior_precision: Tensor | None = None,
                 sigma_noise: Tensor | None = None) -> Tensor:
        """log p(D|θ*) − ½ scatter − ½ (B/k) Σ_{b ∈ parts} T_b for k distinct data blocks, with
        T_b the block's log-determinant term: all its outputs (``outputs=None``) or, for output
        partitions, C times that of output ``outputs[i]`` for the i-th block (the single-output
        estimate). All blocks and outputs: the bound. 0-d."""
        chosen = list(parts)
        B = len(self.partitions)
        if not chosen or len(set(chosen)) != len(chosen) or not all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b < B for b in chosen):
            raise ValueError(f"parts must be distinct data blocks in [0, {B}), got {chosen!r}")
        terms = self.terms(chosen, prior_precision, sigma_noise)  # (k, C')
        if outputs is None:
            total = terms.sum()
        else:
            if not self.outputs:
                raise ValueError("a single-output estimate needs output partitions: build the "
                                 "bound with outputs=True")
            outs = list(outputs)
            C = self.n_outputs
            if len(outs) != len(chosen) or not all(
                    isinstance(c, int) and not isinstance(c, bool) and 0 <= c < C for c in outs):
                raise ValueError(f"outputs must give one output in [0, {C}) per chosen block "
                                 f"({len(chosen)}), got {outs!r}")
            total = C * terms[torch.arange(len(chosen)), torch.tensor(outs)].sum()
        la = self.la
        return laplace_log_evidence(la.log_likelihood(sigma_noise), la.scatter(prior_precision),
                                    B / len(chosen) * total)

    def __call__(self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None,
                 sample: int | None = None, single_output: bool = False,
                 generator: torch.Generator | None = None) -> Tensor:
        """The bound, or its unbiased estimate from ``sample`` data blocks drawn uniformly
        without replacement and/or (``single_output``) one output per block drawn uniformly
        (``generator``): 0-d."""
        B = len(self.partitions)
        if sample is None:
            chosen = list(range(B))
        elif isinstance(sample, bool) or not isinstance(sample, int) or not 1 <= sample <= B:
            raise ValueError(f"sample must be an integer in [1, {B}], the number of data "
                             f"blocks, got {sample!r}")
        else:
            chosen = torch.randperm(B, generator=generator)[:sample].tolist()
        outs = None
        if single_output:
            if not self.outputs:
                raise ValueError("single_output needs output partitions: build the bound with "
                                 "outputs=True")
            outs = torch.randint(self.n_outputs, (len(chosen),), generator=generator).tolist()
        return self.estimate(chosen, outs, prior_precision, sigma_noise)

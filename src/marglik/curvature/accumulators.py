"""Curvature accumulators: one per structure, the same small interface.

:func:`~marglik.curvature.engine.fit_curvature` runs the model on each batch, records the
registered layers (:mod:`marglik.curvature.layers`) and hands every batch to the accumulator of
the requested structure (:data:`marglik.curvature.engine.ACCUMULATORS`):

- :meth:`Accumulator.columns` gives the output columns U (K, N, *S, C) whose backpropagation
  gives the curvature, Σ_k J_nᵀ U_k,n U_k,nᵀ J_n (:mod:`marglik.curvature.columns`);
- :meth:`Accumulator.add_batch` adds the batch's curvature sums from the layers' inputs
  a (N, R, D_in) and output-column gradients b (K, N, R, D_out), and from ``torch.func``
  per-sample column gradients M (K, N, P_rest) for the parameters no layer owns;
- after the pass (and the all-reduce of the sums over ranks), :meth:`Accumulator.blocks` turns
  the summed statistics into curvature blocks in the order of the subset's parameters.

The structures:

- ``"full"``: H = Σ_{k,n} m_{k,n} m_{k,n}ᵀ from the per-sample column gradients;
- ``"diag"``: the exact GGN/EF diagonal, per layer in closed form (Σ_{k,n} (Σ_r b aᵀ)²);
- ``"kron"``: per layer weight G ⊗ A (KFAC-expand or -reduce, Eschenhagen et al., NeurIPS
  2023), G alone for its bias, the exact diagonal for every other parameter;
- ``"lowrank"`` and ``"kernel"``: in :mod:`marglik.curvature.low_rank`.

Sums are kept in the accumulation dtype and, with ``create_graph``, keep their autograd graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from marglik.curvature.batches import DICT_KEY_X, DICT_KEY_Y
from marglik.curvature.columns import output_columns
from marglik.curvature.kfac import (
    Rows,
    as_matrix,
    exact_layer_diagonal,
    gram,
    layer_sample_gradients,
)
from marglik.curvature.layers import LayerMap, LayerRecord
from marglik.curvature.per_sample import per_sample_column_grads, per_sample_column_grads_autograd
from marglik.curvature.recorded import LayerBatches
from marglik.curvature.subsets import ParameterSubset
from marglik.likelihoods import Likelihood
from marglik.structures import CurvatureBlock, Dense, Diagonal, Kronecker


@dataclass
class FitSpec:
    """Everything about one fit that the accumulator needs (fixed for the whole pass)."""

    model: nn.Module
    likelihood: Likelihood
    loader: Iterable
    subset: ParameterSubset
    layers: LayerMap
    rest: ParameterSubset | None  # subset tensors that no recorded layer owns
    curvature: str
    kfac_approx: str
    rank: int | None
    mc_samples: int
    seed: int
    create_graph: bool
    dtype: torch.dtype  # accumulation dtype
    dict_key_x: str = DICT_KEY_X  # dict batches (:mod:`marglik.curvature.batches`)
    dict_key_y: str = DICT_KEY_Y


class Sums:
    """Running sums over batches (to be all-reduced over ranks), in the accumulation dtype.

    A Gram statistic may be added as its rows (:class:`~marglik.curvature.kfac.Rows`): rows
    are stacked over batches and their Gram formed once per :attr:`FLUSH` numbers (and by
    :meth:`totals`), a larger product being cheaper than many small ones; with ``keep_graph``
    it is formed at once.
    """

    #: numbers of stacked rows per key before their Gram is formed
    FLUSH: ClassVar[int] = 2**18

    def __init__(self, dtype: torch.dtype, keep_graph: bool = False):
        self.dtype, self.keep_graph = dtype, keep_graph
        self.values: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.pending: dict[str, list[Tensor]] = {}

    def add(self, key: str, value: Tensor | Rows) -> None:
        if isinstance(value, Rows):
            if self.keep_graph:
                value = as_matrix(value)
            elif value.M.numel() >= self.FLUSH:  # large enough alone: no copy, no stacking
                self._flush(key)
                value = gram(value.M.detach().to(self.dtype))
            else:
                rows = self.pending.setdefault(key, [])
                rows.append(value.M.detach().to(self.dtype, copy=True))  # batches may reuse memory
                if sum(r.numel() for r in rows) >= self.FLUSH:
                    self._flush(key)
                return
        value = (value if self.keep_graph else value.detach()).to(self.dtype)
        if key not in self.values:
            self.values[key] = value.clone()
        elif self.keep_graph:
            self.values[key] = self.values[key] + value
        else:
            self.values[key] += value

    def _flush(self, key: str) -> None:
        rows = self.pending.pop(key, [])
        if rows:
            self.add(key, gram(rows[0] if len(rows) == 1 else torch.cat(rows)))

    def count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def totals(self, n_data: int) -> dict[str, Tensor]:
        """The sums, ``"n_data"`` and the counts as one dict of tensors (for the all-reduce)."""
        for key in list(self.pending):
            self._flush(key)
        out = dict(self.values)
        out["n_data"] = torch.tensor(float(n_data), dtype=self.dtype)
        for key, count in self.counts.items():
            out[key] = torch.tensor(float(count), dtype=self.dtype)
        return out


class Accumulator:
    """Curvature sums of one structure over batches, and the blocks they give."""

    #: exact GGN columns per (position, column) pair, keeping Λ's block structure over positions
    split_positions: ClassVar[bool] = True

    @classmethod
    def uses_layers(cls, create_graph: bool) -> bool:
        """Whether registered layers are recorded (else every parameter is "rest")."""
        return True

    def __init__(self, spec: FitSpec, sums: Sums):
        self.spec, self.sums = spec, sums
        self.generator = torch.Generator().manual_seed(spec.seed)

    def columns(self, fd: Tensor, y: Tensor) -> Tensor | None:
        """Output columns U (K, N, *S, C) for the batch's detached outputs fd (N, *S, C)."""
        s = self.spec
        return output_columns(
            s.likelihood,
            fd,
            y,
            s.curvature,
            split_positions=self.split_positions,
            mc_samples=s.mc_samples,
            generator=self.generator,
        ).to(fd.dtype)

    def add_batch(
        self, x: Tensor, fd: Tensor, y: Tensor, U: Tensor | None, layers: LayerBatches
    ) -> None:
        """Add one batch: inputs x (N, ...), detached outputs fd (N, *S, C), targets y, the
        columns U of :meth:`columns` and the recorded layers.

        ``layers`` yields (record, a, b) one layer at a time, each formed on demand
        (:class:`~marglik.curvature.recorded.LayerBatches`).
        """
        raise NotImplementedError

    def blocks(self, sums: dict[str, Tensor]) -> list[CurvatureBlock]:
        """Curvature blocks, in subset order, from the summed (all-reduced) statistics."""
        raise NotImplementedError

    @classmethod
    def uses_owners(cls, create_graph: bool) -> bool:
        """Whether the owners of the other parameters are recorded (:mod:`~marglik.curvature.
        local`): their per-sample gradients then come from the layers' backward pass."""
        return False

    def owners_usable(self, fd: Tensor) -> bool:
        """Whether the backpropagated columns are those :meth:`rest_grads` needs."""
        return True

    def rest_grads(self, x: Tensor, U: Tensor, layers: LayerBatches | None = None) -> Tensor:
        """Per-sample column gradients (K, N, P_rest) of the parameters no layer owns: from
        their recorded owners' own backward (``layers``, :mod:`marglik.curvature.local`) where
        recorded, else through the whole model."""
        spec = self.spec
        if spec.create_graph:
            return per_sample_column_grads_autograd(spec.model, spec.rest, x, U)
        known = layers.owner_gradients() if layers is not None else {}
        others = [n for n in spec.rest.names if n not in known]
        if len(others) == len(spec.rest.names):
            return per_sample_column_grads(spec.model, spec.rest, x, U)
        if others:
            shapes = dict(zip(spec.rest.names, spec.rest.shapes))
            sub = ParameterSubset(others, [shapes[n] for n in others])
            known.update(zip(others, per_sample_column_grads(spec.model, sub, x, U).split(
                _sizes(sub), -1)))
        return torch.cat([known[n] for n in spec.rest.names], -1)


class FullAccumulator(Accumulator):
    """``"full"``: H = Σ Mᵀ M over per-sample column gradients M (K·N, P), one Dense block.

    Layers are recorded only with ``create_graph`` (their gradients Σ_r b aᵀ then come from
    plain autograd); otherwise ``torch.func`` gives M for the whole subset.
    """

    @classmethod
    def uses_layers(cls, create_graph: bool) -> bool:
        return create_graph

    def add_batch(self, x, fd, y, U, layers) -> None:
        M = self.rows(x, U, layers)
        self.sums.add("H", M.T @ M)

    def rows(self, x: Tensor, U: Tensor, layers: LayerBatches) -> Tensor:
        """The batch's per-sample column gradients M (K·N, P) in subset order: H = Σ Mᵀ M."""
        spec = self.spec
        if not spec.layers.layers:  # the whole subset (also index subnetworks)
            M = self.rest_grads(x, U)
        else:
            parts: dict[str, Tensor] = {}
            for rec, a, b in layers:
                w_grad, b_grad = layer_sample_gradients(a, b)
                for name, grad in ((rec.weight, w_grad), (rec.bias, b_grad)):
                    if name:
                        parts[name] = grad
            if spec.rest is not None:
                M = self.rest_grads(x, U)
                parts.update(zip(spec.rest.names, M.split(_sizes(spec.rest), -1)))
            for name, shape in zip(spec.subset.names, spec.subset.shapes):
                _check_size(spec.layers, name, shape, parts[name].shape[-1])
            M = torch.cat([parts[n] for n in spec.subset.names], -1)
        return M.reshape(-1, M.shape[-1]).to(self.sums.dtype)

    def blocks(self, sums):
        return [Dense(sums["H"])]


class DiagAccumulator(Accumulator):
    """``"diag"``: the exact diagonal, per layer Σ_{k,n} (Σ_r b_{k,n,r} a_{n,r}ᵀ)² (weight) and
    Σ_{k,n} (Σ_r b_{k,n,r})² (bias), Σ_{k,n} m² for the rest; one Diagonal block."""

    def add_batch(self, x, fd, y, U, layers) -> None:
        for rec, a, b in layers:
            w_diag, b_diag = exact_layer_diagonal(a, b)
            self.sums.add(rec.name + ".weight_diag", w_diag)
            self.sums.add(rec.name + ".bias_diag", b_diag)
        if self.spec.rest is not None:
            self.sums.add("rest_diag", self.rest_grads(x, U, layers).square().sum((0, 1)))

    @classmethod
    def uses_owners(cls, create_graph: bool) -> bool:
        return not create_graph

    def blocks(self, sums):
        def own(name: str, shape: torch.Size, rec: LayerRecord, role: str) -> Tensor:
            diagonal = sums[f"{rec.name}.{role}_diag"].reshape(-1)
            _check_size(self.spec.layers, name, shape, diagonal.numel())
            return diagonal

        return tensor_blocks(self.spec, sums, own)


def warn_channels_first(fd: Tensor, records: Iterable) -> None:
    """Warn if the model's outputs fd (N, *S, C) are a layer's channels-first output as it is
    (e.g. a final ``nn.Conv2d``: (N, C_out, H, W)). The likelihood takes the last dimension as
    the outputs and the others as positions, so KFAC would stack the GGN's columns over the
    channels, which that convolution mixes: its blocks, even the bias's, are then not the
    exact ones (``docs/equivariance.md``, "KFAC with channels-first outputs")."""
    if fd.ndim <= 2:  # no positions: nothing to mistake for them
        return
    for rec in records:
        feature_dim = getattr(rec.kind, "feature_dim", -1) % fd.ndim
        if feature_dim == fd.ndim - 1:
            continue
        if any(out.shape == fd.shape for out in rec.outputs):
            warnings.warn(
                f"the model's outputs {tuple(fd.shape)} look like the channels-first output of "
                f"layer {rec.name!r} (its features in dimension {feature_dim}); the likelihood "
                f"takes the last dimension as the outputs, so the KFAC blocks are not exact: "
                f"return output.movedim({feature_dim}, -1) (channels last), or use "
                f"hessian_structure='diag' or 'full'", stacklevel=5)
            return


class KronAccumulator(Accumulator):
    """``"kron"``: per layer the factor sums A (D_in, D_in), G (D_out, D_out) and the count of
    :func:`~marglik.curvature.kfac.kfac_statistics`; Kronecker G ⊗ (A / count) for the weight,
    Dense G for the bias, exact diagonal blocks for the rest (with a warning)."""

    split_positions = False  # KFAC sums the stacked columns over positions
    layout_checked = False

    def __init__(self, spec: FitSpec, sums: Sums):
        super().__init__(spec, sums)
        if spec.rest is not None:  # stacklevel: the caller of Laplace.fit / fit_curvature's
            warnings.warn(
                f"KFAC cannot express {spec.rest.names}; they get diagonal blocks", stacklevel=4
            )

    def add_batch(self, x, fd, y, U, layers) -> None:
        spec = self.spec
        if not self.layout_checked:
            self.layout_checked = True
            warn_channels_first(fd, layers.layers)
        for rec, A, G, count in layers.kfac(spec.kfac_approx):
            self.sums.add(rec.name + ".A", A)
            self.sums.add(rec.name + ".G", G)
            self.sums.count(rec.name + ".count", count)
        if spec.rest is not None:
            if not self.owners_usable(fd):  # exact diagonal blocks: split columns
                U = output_columns(spec.likelihood, fd, y, spec.curvature, split_positions=True).to(
                    fd.dtype
                )
                layers = None
            self.sums.add("rest_diag", self.rest_grads(x, U, layers).square().sum((0, 1)))

    @classmethod
    def uses_owners(cls, create_graph: bool) -> bool:
        return not create_graph

    def owners_usable(self, fd: Tensor) -> bool:
        """KFAC stacks the exact GGN's columns over output positions; the other parameters'
        exact diagonal needs them split (R·K columns of their own)."""
        return not (fd.ndim > 2 and self.spec.curvature == "ggn")

    def blocks(self, sums):
        def own(name: str, shape: torch.Size, rec: LayerRecord, role: str) -> CurvatureBlock:
            G = sums[rec.name + ".G"]
            if role == "bias":
                _check_size(self.spec.layers, name, shape, G.shape[0])
                return Dense(G)
            A = sums[rec.name + ".A"] / sums[rec.name + ".count"]
            _check_size(self.spec.layers, name, shape, G.shape[0] * A.shape[0])
            return Kronecker(G, A)

        return tensor_blocks(self.spec, sums, own)


def tensor_blocks(
    spec: FitSpec,
    sums: dict[str, Tensor],
    own: Callable[[str, torch.Size, LayerRecord, str], Tensor | CurvatureBlock],
) -> list[CurvatureBlock]:
    """Per-tensor blocks in subset order.

    ``own(name, shape, record, role)`` gives a layer-owned tensor's part: a diagonal vector
    (merged with its neighbours into one Diagonal block) or a block of its own. Tensors no layer
    owns take their slice of ``sums["rest_diag"]`` (in subset order).
    """
    owner = spec.layers.owner
    diagonals: list[Tensor] = []
    blocks: list[CurvatureBlock] = []
    rest_offset = 0
    for name, shape in zip(spec.subset.names, spec.subset.shapes):
        if name in owner:
            part = own(name, torch.Size(shape), *owner[name])
        else:
            numel = int(torch.Size(shape).numel())
            part = sums["rest_diag"][rest_offset : rest_offset + numel]
            rest_offset += numel
        if isinstance(part, Tensor):
            diagonals.append(part)
            continue
        if diagonals:
            blocks.append(Diagonal(torch.cat(diagonals)))
            diagonals = []
        blocks.append(part)
    if diagonals:
        blocks.append(Diagonal(torch.cat(diagonals)))
    return blocks


def _sizes(subset: ParameterSubset) -> list[int]:
    return [int(torch.Size(s).numel()) for s in subset.shapes]


def _check_size(layers: LayerMap, name: str, shape: torch.Size, size: int) -> None:
    """A registered layer's (a, b) must match its parameter: D_out·D_in weight entries."""
    if name in layers.owner and size != int(torch.Size(shape).numel()):
        rec, role = layers.owner[name]
        raise ValueError(
            f"layer {rec.name!r} ({type(rec.module).__name__}): its registered inputs / "
            f"output_grads give {size} {role} entries, but {name!r} has shape {tuple(shape)}"
        )

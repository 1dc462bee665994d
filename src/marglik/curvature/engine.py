"""Fitting curvature over a DataLoader: one pass, summed statistics, then a structure.

``fit_curvature`` runs the model on every batch, accumulates the likelihood's loss statistics
and the curvature sums for the requested structure, all-reduces them across ranks, and builds a
:class:`~marglik.structures.BlockDiagonal` in the order of the subset's parameters:

- ``"full"``: one Dense block, H = Σ_n M_nᵀ M_n with M_n the per-sample column gradients;
- ``"diag"``: one Diagonal block with the exact GGN/EF diagonal (per-layer closed forms for
  Linear/Conv, ``torch.func`` per-sample gradients for every other parameter);
- ``"kron"``: per tensor, Kronecker G ⊗ A for Linear/Conv weights, Dense G for their biases, and
  Diagonal blocks for parameters KFAC cannot express (with a warning);
- ``"lowrank"``: top-k eigenpairs by Lanczos (matrix-free GGN-vector products).

With ``create_graph=True`` nothing is detached: the curvature sums and the data-fit statistics
keep their autograd graph to every tensor the forward pass uses other than the subset's own
parameters θ (held fixed), so the Laplace evidence is differentiable in hyperparameters that
enter the model or the likelihood — a learned input transformation, an augmentation — through
both the data fit and the curvature (Immer et al., ICML 2021; NeurIPS 2022). Supported for the
exact GGN with ``"full"``, ``"diag"`` and ``"kron"``. Gradients then come from plain autograd
only (``torch.func`` does not differentiate every op correctly for an outer graph, e.g.
``nn.LayerNorm``): Linear/Conv parameters from the layer hooks (also for ``"full"``), any other
parameter of the posterior from one backward pass per sample and output column. With the backward
pass of the evidence a fit costs about 1.5–3 times a plain one for Linear/Conv networks, and it
keeps the graph of every batch in memory until the evidence is backpropagated.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from marglik.curvature.columns import CURVATURES, output_columns
from marglik.curvature.kfac import (
    KFAC_APPROXIMATIONS,
    exact_layer_diagonal,
    kfac_statistics,
    layer_sample_gradients,
)
from marglik.curvature.lanczos import ggn_matvec, lanczos
from marglik.curvature.layers import (
    GraphLayerRecorder,
    LayerRecorder,
    backprop_columns,
    find_layers,
    output_grads,
)
from marglik.curvature.per_sample import per_sample_column_grads, per_sample_column_grads_autograd
from marglik.curvature.subsets import ParameterSubset
from marglik.distributed import all_reduce_sum, is_distributed
from marglik.likelihoods import Likelihood
from marglik.structures import BlockDiagonal, CurvatureBlock, Dense, Diagonal, Kronecker, LowRank

STRUCTURES = ("full", "diag", "kron", "lowrank")


@dataclass
class Curvature:
    """What a fit produces: the curvature H, the data-fit statistics and the number of samples."""

    structure: BlockDiagonal
    statistics: dict[str, Tensor]
    n_data: int


@contextmanager
def eval_mode(model: nn.Module, requires_grad: Collection[str] = ()) -> Iterator[None]:
    """Eval mode, gradients only for the named parameters; both restored exactly afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    chosen = set(requires_grad)
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """At least float32 for curvature sums; float64 if the model is float64."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def batches(loader: Iterable, model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) moved to the model's device (floating x cast to its dtype), checking x."""
    param = next(model.parameters())
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("the data loader must yield (x, y) pairs")
        x, y = batch
        x = x.to(param.device, param.dtype if x.is_floating_point() else None)
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"inputs contain {int((~torch.isfinite(x)).sum())} NaN/inf values")
        yield x, y.to(param.device)


def fit_curvature(
    model: nn.Module,
    likelihood: Likelihood,
    loader: Iterable,
    subset: ParameterSubset,
    structure: str = "kron",
    curvature: str = "ggn",
    kfac_approx: str = "expand",
    rank: int | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
    create_graph: bool = False,
) -> Curvature:
    """Accumulate the curvature of ``model`` under ``likelihood`` over ``loader``.

    Args:
        structure: ``"full" | "diag" | "kron" | "lowrank"``.
        curvature: ``"ggn"`` (exact generalised Gauss–Newton), ``"ef"`` (empirical Fisher) or
            ``"ggn-mc"`` (Monte Carlo GGN with ``mc_samples`` sampled targets per input).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
        rank: number of eigenpairs for ``"lowrank"`` (default min(P, 100)).
        create_graph: keep the autograd graph from the curvature and the statistics to every
            tensor the forward pass uses besides the subset's parameters (whose values are
            fixed; parameters outside the subset keep their ``requires_grad`` flags). Needs
            ``curvature="ggn"`` and ``structure`` ``"full" | "diag" | "kron"``; not available
            under ``torch.distributed``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown hessian_structure {structure!r}: use one of {STRUCTURES}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}: use one of {CURVATURES}")
    if kfac_approx not in KFAC_APPROXIMATIONS:
        raise ValueError(f"unknown kfac_approx {kfac_approx!r}: use one of {KFAC_APPROXIMATIONS}")
    if create_graph:
        if structure not in ("full", "diag", "kron") or curvature != "ggn":
            raise ValueError(
                "create_graph=True supports curvature='ggn' with hessian_structure 'full', "
                f"'diag' or 'kron', got {curvature!r} with {structure!r}"
            )
        if is_distributed():
            raise ValueError("create_graph=True is not available under torch.distributed")
    if structure == "kron" and subset.index is not None:
        raise ValueError(
            "KFAC needs whole parameter tensors: use 'full', 'diag' or 'lowrank' for a "
            "subnetwork given by a mask or indices"
        )

    use_layers = structure in ("kron", "diag") or (structure == "full" and create_graph)
    layers = find_layers(model, subset) if use_layers else []
    covered = {n for rec in layers for n in (rec.weight, rec.bias) if n}
    rest_names = [n for n in subset.names if n not in covered]
    shapes = dict(zip(subset.names, subset.shapes))
    rest = (
        ParameterSubset(rest_names, [shapes[n] for n in rest_names], subset.index)
        if rest_names
        else None
    )
    if structure == "kron" and rest is not None:
        warnings.warn(f"KFAC cannot express {rest_names}; they get diagonal blocks", stacklevel=3)

    acc = accumulation_dtype(model)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def add(key: str, value: Tensor) -> None:
        value = (value if create_graph else value.detach()).to(acc)
        sums[key] = sums[key] + value if key in sums else value.clone()

    n_data = 0
    gen = torch.Generator().manual_seed(seed)
    trainable = subset.names
    recorder_type = LayerRecorder
    if create_graph:  # hyperparameters outside the subset stay in the graph
        trainable = [*subset.names, *(n for n, p in model.named_parameters() if p.requires_grad)]
        recorder_type = GraphLayerRecorder
    with eval_mode(model, trainable), recorder_type(layers) as recorder:
        for x, y in tqdm(batches(loader, model), disable=not progress, desc="curvature"):
            recorder.clear()
            grad_context = torch.enable_grad() if layers or create_graph else torch.no_grad()
            with grad_context:
                f = model(x)
            fd, y = likelihood.validate(f if create_graph else f.detach(), y)
            for key, value in likelihood.statistics(fd, y).items():
                add("stat." + key, value)
            n_data += fd.shape[0]
            if structure == "lowrank":
                continue
            U = output_columns(
                likelihood,
                fd,
                y,
                curvature,
                split_positions=structure != "kron",
                mc_samples=mc_samples,
                generator=gen,
            ).to(fd.dtype)
            layer_grads: dict[str, Tensor] = {}  # "full" with a graph: per-sample (K, N, numel)
            if layers:
                outs = [o for rec in layers for o in rec.outputs]
                grads = iter(backprop_columns(f, outs, U, create_graph))
                for rec in layers:
                    a = torch.cat(rec.inputs, 1)
                    b = torch.cat([output_grads(rec.module, next(grads)) for _ in rec.outputs], 2)
                    if structure == "kron":
                        A, G, count = kfac_statistics(a, b, kfac_approx)
                        add(rec.name + ".A", A)
                        add(rec.name + ".G", G)
                        counts[rec.name] = counts.get(rec.name, 0) + count
                    elif structure == "diag":
                        w_diag, b_diag = exact_layer_diagonal(a, b)
                        add(rec.name + ".weight_diag", w_diag)
                        add(rec.name + ".bias_diag", b_diag)
                    else:
                        w_grad, b_grad = layer_sample_gradients(a, b)
                        for name, grad in ((rec.weight, w_grad), (rec.bias, b_grad)):
                            if name:
                                layer_grads[name] = grad
            del f
            if rest is not None:
                if (
                    structure == "kron" and fd.ndim > 2 and curvature == "ggn"
                ):  # exact diagonal blocks
                    U = output_columns(likelihood, fd, y, curvature, split_positions=True).to(
                        fd.dtype
                    )
                if create_graph:
                    M = per_sample_column_grads_autograd(model, rest, x, U)
                else:
                    M = per_sample_column_grads(model, rest, x, U)
                if structure == "full" and layers:
                    sizes = [shapes[n].numel() for n in rest.names]
                    layer_grads.update(zip(rest.names, M.split(sizes, -1)))
                elif structure == "full":
                    M = M.reshape(-1, M.shape[-1]).to(acc)
                    add("H", M.T @ M)
                else:
                    add("rest_diag", M.square().sum((0, 1)))
            if layer_grads:
                M = torch.cat([layer_grads[n] for n in subset.names], -1)
                M = M.reshape(-1, M.shape[-1]).to(acc)
                add("H", M.T @ M)
    if n_data == 0:
        raise ValueError("the data loader is empty")

    sums["n_data"] = torch.tensor(float(n_data), dtype=acc)
    for name, count in counts.items():
        sums[name + ".count"] = torch.tensor(float(count), dtype=acc)
    all_reduce_sum(sums)
    n_data = int(sums.pop("n_data").round())
    statistics = {k[5:]: sums.pop(k) for k in list(sums) if k.startswith("stat.")}
    for key, value in sums.items():
        if not torch.isfinite(value).all():
            raise RuntimeError(
                f"curvature {key!r} contains NaN/inf values: check the model and data"
            )

    if structure == "full":
        blocks: list[CurvatureBlock] = [Dense(sums["H"])]
    elif structure == "lowrank":
        k = min(subset.size, rank or 100)
        mv = ggn_matvec(model, likelihood, _Replay(loader, model), subset, curvature, seed)
        with eval_mode(model, subset.names):
            vals, vecs = lanczos(
                mv, subset.size, k, dtype=acc, device=next(model.parameters()).device, seed=seed
            )
        blocks = [LowRank(vecs, vals)]
    else:
        blocks = _tensor_blocks(structure, subset, layers, sums)
    return Curvature(BlockDiagonal(blocks), statistics, n_data)


class _Replay:
    """Re-iterable view of a loader as device-ready (x, y) batches."""

    def __init__(self, loader: Iterable, model: nn.Module):
        self.loader, self.model = loader, model

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(self.loader, self.model)


def _tensor_blocks(
    structure: str, subset: ParameterSubset, layers: list, sums: dict[str, Tensor]
) -> list[CurvatureBlock]:
    """Per-tensor blocks (in subset order) for the diag and kron structures."""
    owner = {}
    for rec in layers:
        if rec.weight:
            owner[rec.weight] = (rec, "weight")
        if rec.bias:
            owner[rec.bias] = (rec, "bias")
    diagonals: list[Tensor] = []
    blocks: list[CurvatureBlock] = []
    rest_offset = 0
    for name, shape in zip(subset.names, subset.shapes):
        if name not in owner:
            numel = int(torch.Size(shape).numel())
            diagonals.append(sums["rest_diag"][rest_offset : rest_offset + numel])
            rest_offset += numel
        elif structure == "diag":
            rec, kind = owner[name]
            diagonals.append(sums[f"{rec.name}.{kind}_diag"].reshape(-1))
        else:
            rec, kind = owner[name]
            if diagonals:
                blocks.append(Diagonal(torch.cat(diagonals)))
                diagonals = []
            G = sums[rec.name + ".G"]
            if kind == "weight":
                blocks.append(Kronecker(G, sums[rec.name + ".A"] / sums[rec.name + ".count"]))
            else:
                blocks.append(Dense(G))
    if diagonals:
        blocks.append(Diagonal(torch.cat(diagonals)))
    return blocks

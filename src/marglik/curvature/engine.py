"""Fitting curvature over a DataLoader: one pass, summed statistics, then a structure.

``fit_curvature`` runs the model on every batch, accumulates the likelihood's loss statistics
and the curvature sums for the requested structure, all-reduces them across ranks, and builds a
:class:`~marglik.structures.BlockDiagonal` in the order of the subset's parameters:

- ``"full"``: one Dense block, H = Σ_n M_nᵀ M_n with M_n the per-sample column gradients;
- ``"diag"``: one Diagonal block with the exact GGN/EF diagonal (per-layer closed forms for
  registered layers, ``torch.func`` per-sample gradients for every other parameter);
- ``"kron"``: per tensor, Kronecker G ⊗ A for registered layers' weights, Dense G for their
  biases, and Diagonal blocks for parameters KFAC cannot express (with a warning);
- ``"lowrank"``: top-k eigenpairs by Lanczos (matrix-free GGN-vector products);
- ``"kernel"``: the exact GGN from the thin SVD of its N·C per-sample column-gradient rows
  (one LowRank block of rank ≤ N·C: the function-space form of the posterior).

Which modules are layers with closed forms comes from the layer registry
(:mod:`marglik.curvature.registry`: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, and whatever
is registered); the parameter → layer map from :func:`~marglik.curvature.layers.layer_map`,
shared with the layer-wise predictive. A registered layer that cannot be recorded on the first
batch — its hooks did not fire (used through ``F.linear(x, m.weight)``, or unused), or its
recorded gradients do not match autograd (weight also used outside the module) — is dropped
from the recording with one warning naming it, and its parameters take the exact ``torch.func``
path like any unregistered parameter (a diagonal block under ``"kron"``); a Linear that sees
sequence-first inputs (L, N, D) is recorded with its batch in dimension 1. Each structure is
one accumulator
(:mod:`marglik.curvature.accumulators`) with the same interface: the loop here records the
layers, backpropagates the accumulator's output columns to them and hands it the batch.

Cost. Every output column is one backward pass of the batch (a loop over columns on a CPU, one
vmapped pass elsewhere: :mod:`marglik.curvature.backprop`), so the exact GGN costs about K = C
backward passes against a training step's one — C − 1 for the softmax, whose Hessian has rank C − 1
(:mod:`marglik.curvature.columns`); one sampled column per input (``"ggn-sampled"``, ``"ggn-mc"``)
costs one. Layer inputs are kept as the forward arguments and turned into KFAC statistics one layer
at a time (:class:`~marglik.curvature.layers.FitRecorder`), convolutions without unfolding every
patch where a cheaper exact identity exists (:mod:`marglik.curvature.conv`). Parameters outside the
registered layers (BatchNorm, LayerNorm, …) get their per-sample gradients from the same backward
pass through their own module (:mod:`marglik.curvature.local`) where that is exact (checked on the
first batch), not from a second pass through the whole model. Recorded layer outputs are passed on
uncopied; a batch whose forward pass overwrites one in place is run again with copies of those
(:meth:`~marglik.curvature.layers.LayerRecorder.overwritten`). These K backward passes and the
factor products alone take 2.6–3.7 training epochs for K = 9 on the MLP and CNN of
``benchmarks/fit.py`` (``benchmarks/fit_floor.py``; one thread, CPU).

With ``create_graph=True`` nothing is detached: the curvature sums and the data-fit statistics
keep their autograd graph to every tensor the forward pass uses other than the subset's own
parameters θ (held fixed), so the Laplace evidence is differentiable in hyperparameters that
enter the model or the likelihood — a learned input transformation, an augmentation — through
both the data fit and the curvature (Immer et al., ICML 2021; NeurIPS 2022). Supported for the
exact GGN with ``"full"``, ``"diag"`` and ``"kron"``. Gradients then come from plain autograd
only (``torch.func`` does not differentiate every op correctly for an outer graph, e.g.
``nn.LayerNorm``): registered layers' parameters from the layer hooks (also for ``"full"``),
any other parameter of the posterior from one backward pass per sample and output column. With
the backward pass of the evidence a fit costs about 1.5–3 times a plain one for Linear/Conv
networks, and it keeps the graph of every batch in memory until the evidence is backpropagated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from marglik.curvature.accumulators import (
    Accumulator,
    DiagAccumulator,
    FitSpec,
    FullAccumulator,
    KronAccumulator,
    Sums,
)
from marglik.curvature.batches import (
    DICT_KEY_X,
    DICT_KEY_Y,
    Inputs,
    all_finite,
    batches,
    call_model,
)
from marglik.curvature.columns import CURVATURES
from marglik.curvature.kfac import KFAC_APPROXIMATIONS
from marglik.curvature.layers import FitRecorder, GraphLayerRecorder, LayerMap, layer_map
from marglik.curvature.local import OwnerRecorder, inconsistent_owners, owner_records
from marglik.curvature.low_rank import KernelAccumulator, LowRankAccumulator
from marglik.curvature.recorded import layer_batches
from marglik.curvature.runtime import accumulation_dtype, eval_mode
from marglik.curvature.silent import (
    inconsistent_layers,
    silent_layers,
    silent_message,
    without_layers,
)
from marglik.curvature.subsets import ParameterSubset
from marglik.distributed import all_reduce_sum, is_distributed
from marglik.likelihoods import Likelihood
from marglik.structures import BlockDiagonal

#: structure name -> accumulator class
ACCUMULATORS: dict[str, type[Accumulator]] = {
    "full": FullAccumulator,
    "diag": DiagAccumulator,
    "kron": KronAccumulator,
    "lowrank": LowRankAccumulator,
    "kernel": KernelAccumulator,
}
STRUCTURES = tuple(ACCUMULATORS)

__all__ = [
    "STRUCTURES",
    "Curvature",
    "accumulation_dtype",
    "batches",
    "eval_mode",
    "fit_curvature",
]


@dataclass
class Curvature:
    """What a fit produces: the curvature H, the data-fit statistics and the number of samples."""

    structure: BlockDiagonal
    statistics: dict[str, Tensor]
    n_data: int


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
    dict_key_x: str = DICT_KEY_X,
    dict_key_y: str = DICT_KEY_Y,
    outputs: Callable[[Inputs], Tensor] | None = None,
) -> Curvature:
    """Accumulate the curvature of ``model`` under ``likelihood`` over ``loader``.

    Args:
        structure: ``"full" | "diag" | "kron" | "lowrank" | "kernel"``.
        curvature: ``"ggn"`` (exact generalised Gauss–Newton), ``"ef"`` (empirical Fisher),
            ``"ggn-mc"`` (Monte Carlo Fisher: ``mc_samples`` sampled targets per input) or
            ``"ggn-sampled"`` (``mc_samples`` Rademacher combinations of the columns of Λ's
            factor per input); both sampled curvatures are unbiased for the GGN, their
            variances are stated in :mod:`marglik.curvature.columns`.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
        rank: number of eigenpairs for ``"lowrank"`` (default min(P, 100)).
        create_graph: keep the autograd graph from the curvature and the statistics to every
            tensor the forward pass uses besides the subset's parameters (whose values are
            fixed; parameters outside the subset keep their ``requires_grad`` flags). Needs
            ``curvature="ggn"`` and ``structure`` ``"full" | "diag" | "kron"``; not available
            under ``torch.distributed``.
        dict_key_x, dict_key_y: for batches that are dicts: the key whose tensor gives the
            batch size and the key of the targets (see :mod:`marglik.curvature.batches`).
        outputs: x -> the outputs (B, ...) at which the likelihood's statistics and Hessian Λ
            are taken instead of the model's own f(x), with the model's Jacobian J(x) kept:
            the GGN Jᵀ Λ(h) J of a model whose outputs differ from the network's by a constant
            in θ — the tangent model h = J(x) t at its own mode
            (:mod:`marglik.posterior.tangent`). Called before the recorded forward pass, so its
            own forward passes are not recorded. Not with ``create_graph``.
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
        if outputs is not None:
            raise ValueError("create_graph=True cannot be combined with outputs=")
    if structure == "kron" and subset.index is not None:
        raise ValueError(
            "KFAC needs whole parameter tensors: use 'full', 'diag' or 'lowrank' for a "
            "subnetwork given by a mask or indices"
        )

    accumulator_type = ACCUMULATORS[structure]
    uses_layers = accumulator_type.uses_layers(create_graph)
    lmap = layer_map(model, subset) if uses_layers else LayerMap([], {})
    layers = lmap.layers
    rest = rest_subset(subset, lmap)
    acc = accumulation_dtype(model)
    sums = Sums(acc, keep_graph=create_graph)
    spec = FitSpec(
        model=model,
        likelihood=likelihood,
        loader=loader,
        subset=subset,
        layers=lmap,
        rest=rest,
        curvature=curvature,
        kfac_approx=kfac_approx,
        rank=rank,
        mc_samples=mc_samples,
        seed=seed,
        create_graph=create_graph,
        dtype=acc,
        dict_key_x=dict_key_x,
        dict_key_y=dict_key_y,
    )
    accumulator = None  # made after the first forward pass, once silent layers are known

    n_data = 0
    trainable = subset.names
    recorder_type = FitRecorder
    if create_graph:  # hyperparameters outside the subset stay in the graph
        trainable = [*subset.names, *(n for n, p in model.named_parameters() if p.requires_grad)]
        recorder_type = GraphLayerRecorder
    # owners of the other parameters, recorded so that one backward pass serves them too
    owners = owner_records(model, spec.rest) if accumulator_type.uses_owners(create_graph) else []
    recorded = None  # the previous batch's column gradients: their buffers are reused
    with (eval_mode(model, trainable), recorder_type(layers) as recorder,
          OwnerRecorder(owners) as owner_recorder):
        data = batches(loader, model, dict_key_x, dict_key_y)
        for x, y in tqdm(data, disable=not progress, desc="curvature"):
            h = None
            if outputs is not None:  # before clear(): its forward passes are not recorded
                with torch.no_grad():
                    h = outputs(x)
            recorder.clear()
            owner_recorder.clear()
            needs_graph = layers or owners or create_graph
            with torch.enable_grad() if needs_graph else torch.no_grad():
                f = call_model(model, x)
                if recorder.overwritten():  # an in-place op changed a recorded output: again,
                    recorder.clear()  # with copies of those outputs
                    owner_recorder.clear()
                    f = call_model(model, x)
            if accumulator is None:
                silent = silent_layers(layers)  # and layers mixing samples: exact path (§4)
                silent += inconsistent_layers(f, [r for r in layers if not r.silent], model)
                if silent:
                    warnings.warn(silent_message(silent), stacklevel=3)
                    recorder.remove(silent)
                    layers = recorder.layers
                    lmap = without_layers(lmap, silent)
                    spec = replace(spec, layers=lmap, rest=rest_subset(subset, lmap))
                accumulator = accumulator_type(spec, sums)
                drop = owners if not accumulator.owners_usable(f) else inconsistent_owners(
                    f, owners, model)
                if drop:  # they keep the whole-model path
                    owner_recorder.remove(drop)
                    owners = owner_recorder.owners
            if h is not None and h.shape != f.shape:
                raise ValueError(f"outputs(x) has shape {tuple(h.shape)}, the model's outputs "
                                 f"{tuple(f.shape)}")
            fd = f.detach() if h is None else h.to(f.dtype)
            fd, y = likelihood.validate(f if create_graph else fd, y)
            for key, value in likelihood.statistics(fd, y).items():
                sums.add("stat." + key, value)
            n_data += fd.shape[0]
            U = accumulator.columns(fd, y)
            # the backward pass to the layers happens here, into the previous batch's buffers
            recorded = layer_batches(f, layers, U, create_graph, owners,
                                     reuse=None if create_graph else recorded)
            del f  # the rest of the graph is not needed for the per-sample gradients
            accumulator.add_batch(x, fd, y, U, recorded)
    if n_data == 0 or accumulator is None:
        raise ValueError("the data loader is empty")

    totals = all_reduce_sum(sums.totals(n_data))
    n_data = int(totals.pop("n_data").round())
    statistics = {k[5:]: totals.pop(k) for k in list(totals) if k.startswith("stat.")}
    for key, value in totals.items():
        if not all_finite(value):
            raise RuntimeError(
                f"curvature {key!r} contains NaN/inf values: check the model and data"
            )
    return Curvature(BlockDiagonal(accumulator.blocks(totals)), statistics, n_data)


def rest_subset(subset: ParameterSubset, lmap: LayerMap) -> ParameterSubset | None:
    """The subset's tensors that no recorded layer owns (the generic ``torch.func`` path)."""
    names = [n for n in subset.names if n not in lmap.owner]
    shapes = dict(zip(subset.names, subset.shapes))
    return ParameterSubset(names, [shapes[n] for n in names], subset.index) if names else None

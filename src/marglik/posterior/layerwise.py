"""Layer-wise GLM predictive, part one: which layers to record, and recording them.

The functional covariance J Σ Jᵀ is contracted from layer inputs and output gradients, without
the B×C×P Jacobian (docs/architecture.md §5); the contraction against each kind of posterior
block is :mod:`marglik.posterior.layerwise_covariance`. This module plans it and records what
it needs.

For a registered layer (:mod:`marglik.curvature.registry`: Linear, Conv1d/2d, attention projections,
or any type registered there) applied at R shared positions (tokens, conv patches), one forward pass
per chunk of inputs records the inputs a_r (D_in, unfolded for convolutions) and one backward pass
per output (vmapped off the CPU) the gradients g_{c,r} = ∂f_c/∂(layer output at r) (D_out) for every
output c (:class:`LayerData`). Parameters that belong to no registered layer (norm layers,
embeddings) get per-sample Jacobians with ``torch.func`` for those parameters only.

A layer that cannot be recorded (hooks that did not fire, or gradients that do not match
autograd; checked on the first chunk, once per plan, with a warning) gets per-sample Jacobians
of its tensors with ``torch.func`` instead (:class:`Fallback`), contracted against its block like
any other tensor — never a zero Jacobian. The layers and the parameter → layer map are those of
the curvature engine (:func:`~marglik.curvature.layers.layer_map`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.curvature.backprop import backprop_columns
from marglik.curvature.batches import Inputs, call_model
from marglik.curvature.layers import LayerRecord, LayerRecorder, layer_map
from marglik.curvature.local import (
    OwnerRecord,
    OwnerRecorder,
    inconsistent_owners,
    owner_outputs,
    owner_records,
)
from marglik.curvature.silent import inconsistent_layers, silent_layers, silent_message
from marglik.curvature.subsets import ParameterSubset
from marglik.posterior.jacobians import per_sample_jacobians
from marglik.structures import BlockDiagonal, CurvatureBlock, Dense, Diagonal, Kronecker

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace


@dataclass
class TensorSlot:
    """One parameter tensor of the posterior: its slice of θ and where its Jacobian comes from."""

    name: str
    start: int
    stop: int
    shape: torch.Size
    layer: LayerRecord | None  # None: per-sample Jacobian with torch.func
    role: str  # "weight" | "bias" | "other"


@dataclass
class BlockSlot:
    """A curvature block and the consecutive parameter tensors it covers."""

    block: CurvatureBlock
    start: int
    stop: int
    tensors: list[TensorSlot] = field(default_factory=list)


@dataclass
class LayerwisePlan:
    """Which layers to record and how each posterior block is contracted."""

    layers: list[LayerRecord]
    blocks: list[BlockSlot]
    others: ParameterSubset | None  # tensors without a registered layer, in posterior order
    other_offsets: dict[str, tuple[int, int]]  # name -> slice in the others' Jacobian
    #: layers that cannot be recorded (silent, or mixing samples), found on the first chunk:
    #: their tensors get per-sample Jacobians with torch.func (None: not checked yet)
    fallback: set[str] | None = None
    #: owner modules of ``others`` whose recording does not give their exact per-sample
    #: gradients (first chunk): their tensors take the whole-model torch.func path
    owner_fallback: set[str] = field(default_factory=set)


def layerwise_plan(la: Laplace) -> LayerwisePlan | None:
    """The plan for ``la``'s posterior, or None where only the generic path applies.

    Applies to whole parameter tensors (not a subnetwork given by indices) with Kronecker blocks
    (each the weight of one registered layer), Diagonal blocks (any tensors) and Dense blocks
    (KFAC bias blocks, or a ``"full"`` posterior over any tensors): the ``"kron"``,
    ``"diag"`` and ``"full"`` structures over all weights, the last layer or named modules.
    ``"lowrank"`` posteriors and index subnetworks use the generic per-sample Jacobians.
    """
    subset, H = la.subset, la.H
    if subset is None or subset.index is not None or not isinstance(H, BlockDiagonal):
        return None
    lmap = layer_map(la.model, subset)
    layers, owner = lmap.layers, lmap.owner
    slots, offset = [], 0
    for name, shape in zip(subset.names, subset.shapes):
        numel = int(torch.Size(shape).numel())
        rec, role = owner.get(name, (None, "other"))
        slots.append(TensorSlot(name, offset, offset + numel, torch.Size(shape), rec, role))
        offset += numel
    if offset != H.size:
        return None
    blocks, i = [], 0
    for block, start, stop in zip(H.blocks, H.offsets[:-1], H.offsets[1:]):
        bs = BlockSlot(block, start, stop)
        while i < len(slots) and slots[i].stop <= stop:
            if slots[i].start < start:
                return None
            bs.tensors.append(slots[i])
            i += 1
        if not bs.tensors or bs.tensors[0].start != start or bs.tensors[-1].stop != stop:
            return None  # the block does not cover whole tensors
        if not _block_supported(bs):
            return None
        blocks.append(bs)
    used = {id(t.layer) for bs in blocks for t in bs.tensors if t.layer is not None}
    others = [t for bs in blocks for t in bs.tensors if t.layer is None]
    other_subset, other_offsets, pos = None, {}, 0
    if others:
        other_subset = ParameterSubset([t.name for t in others], [t.shape for t in others])
        for t in others:
            other_offsets[t.name] = (pos, pos + t.stop - t.start)
            pos += t.stop - t.start
    return LayerwisePlan([r for r in layers if id(r) in used], blocks, other_subset, other_offsets)


def _block_supported(bs: BlockSlot) -> bool:
    block = bs.block
    if isinstance(block, Kronecker):
        if len(bs.tensors) != 1 or bs.tensors[0].role != "weight":
            return False
        shape = bs.tensors[0].shape
        return block.m == shape[0] and block.n == int(shape[1:].numel())
    if isinstance(block, Diagonal):
        return True
    return isinstance(block, Dense)


# ---------------------------------------------------------------------------------- recording
class _Recorder(LayerRecorder):
    """Records layer inputs (kept in the graph, for ``enable_backprop``) and layer outputs.

    Each recorded output is returned as a copy, so that in-place operations downstream (e.g.
    ``ReLU(inplace=True)``) cannot overwrite the tensor whose gradient we take; where nothing
    upstream requires grad, the output becomes a leaf so the output gradients still exist.
    """

    detach_inputs = False
    leaf_outputs = True


def _fresh_layers(plan: LayerwisePlan) -> list[LayerRecord]:
    """The plan's layers with nothing recorded: each recording (chunk) has its own lists."""
    return [rec.empty_copy() for rec in plan.layers]


def per_sample_footprint(la: Laplace, plan: LayerwisePlan, x1: Inputs) -> tuple[int, int]:
    """(numbers held per input, outputs D) for chunking, from one forward pass on x1 (1, ...)."""
    layers = _fresh_layers(plan)
    with torch.no_grad(), LayerRecorder(layers):
        f = call_model(la.model, x1)
    D = f[0].numel()
    total, largest = 4 * D * D, 0
    for rec in layers:
        R = sum(a.shape[0] * a.shape[1] for a in rec.inputs)  # one input: either layout
        d_out = rec.outputs[0][0].numel() // max(1, rec.inputs[0].shape[1]) if rec.outputs else 0
        d_in = rec.inputs[0].shape[-1] if rec.inputs else 0
        held = R * (d_in + 2 * D * d_out)  # a, the column gradients and their (R, D_out) layout
        total += held
        largest = max(largest, held)
    # the layer being contracted: its rotated (and permuted) a and g, one layer at a time;
    # its Jacobians are formed in blocks of bounded size (layerwise_covariance.MAX_JACOBIAN_BLOCK)
    total += 2 * largest
    if plan.others is not None:
        total += 3 * D * plan.others.size
    for bs in plan.blocks:  # Dense blocks: J and C⁻¹Jᵀ (D, p) each, or J·Q and aᵀQ (D_out, p)
        if isinstance(bs.block, Dense):
            d_out = max([t.shape[0] for t in bs.tensors if t.role == "weight"], default=0)
            total += (3 * D + d_out) * bs.block.size
    return total, D


def _column_grads(f: Tensor, outs: list[Tensor], create_graph: bool, U: Tensor
                  ) -> list[Tensor]:
    """∂(U_k · f)/∂out for every row U_k (D,) of U (K, D) over the flattened outputs, per input:
    list of (K, *out.shape) (U = I: ∂f_d/∂out for every output d).

    Without a graph: :func:`~marglik.curvature.backprop.backprop_columns` (one backward pass
    per column on a CPU, one vmapped pass elsewhere); with ``create_graph`` one backward pass
    per column (double backward under vmap is not reliable for every op).
    """
    B = f.shape[0]
    flat = f.reshape(B, -1)
    K = U.shape[0]
    if not create_graph:
        return backprop_columns(f, outs, U.reshape(K, 1, *f.shape[1:]).expand(K, *f.shape))
    grads: list[list[Tensor]] = [[] for _ in outs]
    for k in range(K):  # output columns, not samples
        u = U[k].expand_as(flat)
        gd = torch.autograd.grad(flat, outs, u, retain_graph=True, create_graph=create_graph,
                                 allow_unused=True)
        for i, (g, o) in enumerate(zip(gd, outs)):
            grads[i].append(torch.zeros_like(o) if g is None else g)
    return [torch.stack(g) for g in grads]


@dataclass
class LayerData:
    a: Tensor  # (N, R, D_in)
    g: Tensor  # (D, N, R, D_out)


@dataclass
class Fallback:
    """A layer that could not be recorded: per-sample Jacobians (N, D, numel) per tensor."""

    J: dict[str, Tensor]


#: recorded data per layer name
RecordedData = dict[str, "LayerData | Fallback"]


@contextmanager
def _requires_grad(model: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """The named parameters require grad inside the block (flags restored afterwards)."""
    params = [model.get_parameter(n) for n in names]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def record(la: Laplace, plan: LayerwisePlan, x: Inputs, create_graph: bool,
           basis: Callable[[Tensor], Tensor | None] | None = None
           ) -> tuple[Tensor, RecordedData, Tensor | None, Tensor | None]:
    """Model outputs f (N, ...), per-layer (a, g), the others' Jacobians (N, K, P_other) and
    the output basis V (D, K) or None.

    ``basis(f)`` may give V (D, K): then every Jacobian is that of the K outputs Vᵀ f (one
    backward pass per column of V, e.g. the C − 1 centred logits); without it K = D, V = None.

    A layer whose hooks did not fire, or (checked on the first chunk, with the layers'
    parameters requiring grad for that pass) whose recorded gradients do not match autograd,
    gets per-sample Jacobians of its tensors with ``torch.func`` instead (:class:`Fallback`),
    never a zero Jacobian; one warning per plan names such layers.

    The other tensors' Jacobians come, as in the fit (:mod:`marglik.curvature.local`), from
    their owner modules recorded in the same pass — the column gradients of their outputs and
    the module's own per-sample vjps, in closed form for normalisation layers
    (:mod:`marglik.curvature.norms`) — where the first chunk's check confirms that this gives
    autograd's gradients; otherwise (and with ``create_graph``) from per-sample Jacobians of
    the whole model with ``torch.func``.
    """
    first = plan.fallback is None
    layers = [rec for rec in _fresh_layers(plan) if first or rec.name not in plan.fallback]
    owners = [] if create_graph else [
        o for o in owner_records(la.model, plan.others)
        if first or o.name not in plan.owner_fallback]
    names = [n for rec in layers for n in (rec.weight, rec.bias) if n] if first else []
    names += [n for o in owners for n in o.params.values()]  # their outputs need a graph
    dtype = la.H.dtype
    with torch.enable_grad():
        with (_Recorder(layers), OwnerRecorder(owners) as owner_recorder,
              _requires_grad(la.model, names)):
            f = call_model(la.model, x)
            fallback = silent_layers(layers)
            if first:
                fallback += inconsistent_layers(f, [r for r in layers if not r.silent], la.model)
                plan.owner_fallback = {o.name for o in inconsistent_owners(f, owners, la.model)}
                owner_recorder.remove([o for o in owners if o.name in plan.owner_fallback])
        owners = [o for o in owners if o.name not in plan.owner_fallback]
        if first:
            plan.fallback = {rec.name for rec in fallback}
            layouts = {rec.name: (rec.batch_dim, rec.copies) for rec in layers}
            for rec in plan.layers:  # sequence-first Linears, copies: for the later chunks
                rec.batch_dim, rec.copies = layouts.get(rec.name, (rec.batch_dim, rec.copies))
            if fallback:
                warnings.warn(silent_message(fallback), stacklevel=2)
        fallback_names = {rec.name for rec in fallback} | plan.fallback
        layers = [rec for rec in layers if rec.name not in fallback_names]
        V = basis(f) if basis is not None else None
        D = f[0].numel()
        U = torch.eye(D, dtype=f.dtype, device=f.device) if V is None else V.mT.to(f.dtype)
        outs = [o for rec in layers for o in rec.outputs]
        n_layer_outs = len(outs)
        outs += owner_outputs(owners)
        if outs and f.requires_grad:
            all_grads = _column_grads(f, outs, create_graph, U)
        else:
            all_grads = [torch.zeros(U.shape[0], *o.shape, dtype=o.dtype, device=o.device)
                         for o in outs]
    grads = iter(all_grads[:n_layer_outs])
    data: RecordedData = {}
    for rec in layers:
        a, g = rec.data(grads)
        if not create_graph:
            a = a.detach()
        data[rec.name] = LayerData(a.to(dtype), g.to(dtype))
    slots = [t for bs in plan.blocks for t in bs.tensors
             if t.layer is not None and t.layer.name in fallback_names]
    if slots:
        sub = ParameterSubset([t.name for t in slots], [t.shape for t in slots])
        J = _in_basis(per_sample_jacobians(la.model, sub, x, f.shape[1:], f.dtype, create_graph)
                      .to(dtype), V)
        parts = J.split([t.stop - t.start for t in slots], -1)
        for t, Jt in zip(slots, parts):
            data.setdefault(t.layer.name, Fallback({})).J[t.name] = Jt
    J_other = None
    if plan.others is not None:
        J_other = _other_jacobians(la, plan, x, f, owners, iter(all_grads[n_layer_outs:]),
                                   create_graph, V).to(dtype)
    if not create_graph:
        f = f.detach()
    return f, data, J_other, V


def _in_basis(J: Tensor, V: Tensor | None) -> Tensor:
    """Vᵀ J (N, K, p) for Jacobians J (N, D, p) of all outputs; J itself without a basis."""
    return J if V is None else V.mT.to(J) @ J


def _other_jacobians(la: Laplace, plan: LayerwisePlan, x: Inputs, f: Tensor,
                     owners: list[OwnerRecord], grads: Iterator[Tensor], create_graph: bool,
                     V: Tensor | None = None) -> Tensor:
    """J (N, K, P_other) of the tensors without a registered layer, in ``plan.others`` order:
    from the recorded owners (column gradients ``grads`` of their outputs, already in the
    basis V), the rest with ``torch.func`` through the whole model (then Vᵀ J)."""
    parts = {name: g.transpose(0, 1) for o in owners for name, g in o.gradients(grads).items()}
    shapes = dict(zip(plan.others.names, plan.others.shapes))
    rest = [n for n in plan.others.names if n not in parts]
    if rest:
        sub = ParameterSubset(rest, [shapes[n] for n in rest])
        J = _in_basis(per_sample_jacobians(la.model, sub, x, f.shape[1:], f.dtype, create_graph), V)
        parts.update(zip(rest, J.split([int(torch.Size(shapes[n]).numel()) for n in rest], -1)))
    return torch.cat([parts[n].to(f.dtype) for n in plan.others.names], -1)

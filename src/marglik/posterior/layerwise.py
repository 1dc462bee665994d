"""Functional variance J Σ Jᵀ from layer inputs and output gradients, without the B×C×P Jacobian.

For a registered layer (:mod:`marglik.curvature.registry`: Linear, Conv1d/2d, or any type
registered there) applied at R shared positions (tokens, conv patches) with inputs a_r
(D_in, unfolded for convolutions) and gradients g_{c,r} = ∂f_c/∂(layer output at r) (D_out), the
Jacobian of output c w.r.t. the weight W (D_out × D_in, row-major) and the bias is

    J_c^W = Σ_r g_{c,r} a_rᵀ,    J_c^b = Σ_r g_{c,r}.

With a Kronecker posterior block P = s · G ⊗ A + δ, G = Q_G diag(μ) Q_Gᵀ, A = Q_A diag(λ) Q_Aᵀ,
and g̃ = Q_Gᵀ g, ã = Q_Aᵀ a (docs/architecture.md §5; the prior is added exactly in the eigenbasis),

    Cov[f_c, f_c'] = Σ_ij J̃_{c,ij} J̃_{c',ij} / (s μ_i λ_j + δ),    J̃_c = Σ_r g̃_{c,r} ã_rᵀ,

and without weight sharing (R = 1) the sum collapses to a rank-one form,

    Cov[f_c, f_c'] = g̃_cᵀ diag(K ã²) g̃_c',    K_ij = 1 / (s μ_i λ_j + δ),

which costs O(C²·D_out + D_out·D_in) per input instead of O(C·D_out·D_in). A diagonal posterior
(P = s · h + δ elementwise) gives the same forms without the rotation. Dense blocks (KFAC bias
blocks, G alone, or a full posterior) multiply the Jacobian into the eigenvectors Q (scalar δ)
or into Σ (per-parameter δ) tensor by tensor, J^W Q = g (aᵀ Q) without sharing, which saves the
factor D·D_in/(D_in + D) of forming J first (about D, the number of outputs, for a last layer);
parameters that belong to no registered layer (norm layers, embeddings) get per-sample Jacobians
with ``torch.func`` for those parameters only. The posterior blocks are those of
:mod:`marglik.structures`; this module only reads their public factors (``Kronecker.eig()``,
``Dense.eig()``, ``Diagonal.h``) and calls ``inv_quad`` (joint covariances).

Inputs and gradients are collected with forward hooks (:mod:`marglik.curvature.layers`): one
forward pass per chunk of inputs and one backward pass per output column. A layer that cannot
be recorded (hooks that did not fire, or gradients that do not match autograd; checked on the
first chunk, once per plan, with a warning) gets per-sample Jacobians of its tensors with
``torch.func`` instead, contracted against its block like any other tensor (a Kronecker block
in its eigenbasis) — never a zero Jacobian. The layers and the
parameter → layer map are those of the curvature engine
(:func:`~marglik.curvature.layers.layer_map`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.curvature.batches import Inputs, call_model
from marglik.curvature.layers import LayerRecord, LayerRecorder, backprop_columns, layer_map
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


def layerwise_plan(la: Laplace) -> LayerwisePlan | None:
    """The plan for ``la``'s posterior, or None where only the generic path applies.

    Applies to whole parameter tensors (not a subnetwork given by indices) with Kronecker blocks
    (each the weight of one registered layer), Diagonal blocks (any tensors) and Dense blocks of a
    Dense blocks (KFAC bias blocks, or a ``"full"`` posterior over any tensors): the ``"kron"``,
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
    total = 4 * D * D
    for rec in layers:
        R = sum(a.shape[0] * a.shape[1] for a in rec.inputs)  # one input: either layout
        d_out = rec.outputs[0][0].numel() // max(1, rec.inputs[0].shape[1]) if rec.outputs else 0
        d_in = rec.inputs[0].shape[-1] if rec.inputs else 0
        total += 3 * R * (d_in + D * d_out)  # activations, a, g and their rotations
        if R > 1:
            total += 3 * D * d_out * d_in  # materialised per-layer Jacobians
    if plan.others is not None:
        total += 3 * D * plan.others.size
    for bs in plan.blocks:  # Dense blocks: J·Q (D, p) and, per weight, aᵀQ (D_out, p)
        if isinstance(bs.block, Dense):
            d_out = max([t.shape[0] for t in bs.tensors if t.role == "weight"], default=0)
            total += (3 * D + d_out) * bs.block.size
    return total, D


def _column_grads(f: Tensor, outs: list[Tensor], create_graph: bool) -> list[Tensor]:
    """∂f_d/∂out for every flattened output d, per input: list of (D, *out.shape).

    Without a graph: one vmapped backward pass (:func:`~marglik.curvature.layers.backprop_columns`);
    with ``create_graph`` one backward pass per column (double backward under vmap is not
    reliable for every op).
    """
    B = f.shape[0]
    flat = f.reshape(B, -1)
    D = flat.shape[1]
    if not create_graph:
        U = torch.eye(D, dtype=f.dtype, device=f.device).reshape(D, 1, *f.shape[1:])
        return backprop_columns(f, outs, U.expand(D, *f.shape))
    grads: list[list[Tensor]] = [[] for _ in outs]
    for d in range(D):
        u = torch.zeros_like(flat)
        u[:, d] = 1
        gd = torch.autograd.grad(flat, outs, u, retain_graph=True, create_graph=create_graph,
                                 allow_unused=True)
        for k, (g, o) in enumerate(zip(gd, outs)):
            grads[k].append(torch.zeros_like(o) if g is None else g)
    return [torch.stack(g) for g in grads]


@dataclass
class _LayerData:
    a: Tensor  # (N, R, D_in)
    g: Tensor  # (D, N, R, D_out)


@dataclass
class _Fallback:
    """A layer that could not be recorded: per-sample Jacobians (N, D, numel) per tensor."""

    J: dict[str, Tensor]


_Data = dict[str, "_LayerData | _Fallback"]


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


def record(la: Laplace, plan: LayerwisePlan, x: Inputs, create_graph: bool
           ) -> tuple[Tensor, dict[str, _LayerData | _Fallback], Tensor | None]:
    """Model outputs f (N, ...), per-layer (a, g), and the others' Jacobians (N, D, P_other).

    A layer whose hooks did not fire, or (checked on the first chunk, with the layers'
    parameters requiring grad for that pass) whose recorded gradients do not match autograd,
    gets per-sample Jacobians of its tensors with ``torch.func`` instead (:class:`_Fallback`),
    never a zero Jacobian; one warning per plan names such layers.
    """
    first = plan.fallback is None
    layers = [rec for rec in _fresh_layers(plan) if first or rec.name not in plan.fallback]
    names = [n for rec in layers for n in (rec.weight, rec.bias) if n] if first else []
    dtype = la.H.dtype
    with torch.enable_grad():
        with _Recorder(layers), _requires_grad(la.model, names):
            f = call_model(la.model, x)
            fallback = silent_layers(layers)
            if first:
                fallback += inconsistent_layers(f, [r for r in layers if not r.silent], la.model)
        if first:
            plan.fallback = {rec.name for rec in fallback}
            layouts = {rec.name: rec.batch_dim for rec in layers}
            for rec in plan.layers:  # sequence-first Linears, for the later chunks
                rec.batch_dim = layouts.get(rec.name, rec.batch_dim)
            if fallback:
                warnings.warn(silent_message(fallback), stacklevel=2)
        fallback_names = {rec.name for rec in fallback} | plan.fallback
        layers = [rec for rec in layers if rec.name not in fallback_names]
        D = f[0].numel()
        outs = [o for rec in layers for o in rec.outputs]
        if outs and f.requires_grad:
            grads = iter(_column_grads(f, outs, create_graph))
        else:
            grads = iter([torch.zeros(D, *o.shape, dtype=o.dtype, device=o.device) for o in outs])
    data: dict[str, _LayerData | _Fallback] = {}
    for rec in layers:
        a, g = rec.data(grads)
        if not create_graph:
            a = a.detach()
        data[rec.name] = _LayerData(a.to(dtype), g.to(dtype))
    slots = [t for bs in plan.blocks for t in bs.tensors
             if t.layer is not None and t.layer.name in fallback_names]
    if slots:
        sub = ParameterSubset([t.name for t in slots], [t.shape for t in slots])
        J = per_sample_jacobians(la.model, sub, x, f.shape[1:], f.dtype, create_graph).to(dtype)
        parts = J.split([t.stop - t.start for t in slots], -1)
        for t, Jt in zip(slots, parts):
            data.setdefault(t.layer.name, _Fallback({})).J[t.name] = Jt
    J_other = None
    if plan.others is not None:
        J_other = per_sample_jacobians(la.model, plan.others, x, f.shape[1:], f.dtype,
                                       create_graph).to(dtype)
    if not create_graph:
        f = f.detach()
    return f, data, J_other


# ---------------------------------------------------------------------------------- contraction
def _tensor_jacobian(t: TensorSlot, data: _Data, J_other: Tensor | None,
                     plan: LayerwisePlan, N: int, D: int, like: Tensor) -> Tensor:
    """Materialised Jacobian (N, D, numel) of one parameter tensor."""
    numel = t.stop - t.start
    if t.layer is None:
        lo, hi = plan.other_offsets[t.name]
        return J_other[..., lo:hi]
    ld = data.get(t.layer.name)
    if isinstance(ld, _Fallback):
        return ld.J[t.name]
    if ld is None:  # not reached: every planned layer is recorded or falls back
        return like.new_zeros(N, D, numel)
    if t.role == "bias":
        return ld.g.sum(2).transpose(0, 1)
    return torch.einsum("dnri,nrj->ndij", ld.g, ld.a).reshape(N, D, numel)


def _weight_quad(ld: _LayerData, K: Tensor) -> Tensor:
    """Σ_ij J_{c,ij} J_{c',ij} K_ij for J_c = Σ_r g_{c,r} a_rᵀ: (N, D, D)."""
    g, a = ld.g, ld.a
    if a.shape[1] == 1:  # rank one: g_cᵀ diag(K a²) g_c'
        g0 = g[:, :, 0]  # (D, N, m)
        w = a[:, 0].square() @ K.mT  # (N, m)
        return torch.einsum("dni,eni->nde", g0 * w, g0)
    J = torch.einsum("dnri,nrj->ndij", g, a).flatten(2)  # (N, D, m·n)
    return (J * K.reshape(-1)) @ J.mT


def _kron_quad(block: Kronecker, ld: _LayerData, scale: Tensor, delta: Tensor) -> Tensor:
    mu, QG, lam, QA = block.eig()
    K = 1 / (scale * torch.outer(mu, lam) + delta)
    return _weight_quad(_LayerData(ld.a @ QA, ld.g @ QG), K)


def _kron_quad_dense(block: Kronecker, J: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
    """J Σ Jᵀ for a materialised weight Jacobian J (N, D, m·n) and P = s · G ⊗ A + δ."""
    mu, QG, lam, QA = block.eig()
    K = 1 / (scale * torch.outer(mu, lam) + delta)
    Jr = J.reshape(*J.shape[:2], QG.shape[0], QA.shape[0])
    Jt = torch.einsum("ndij,ia,jb->ndab", Jr, QG, QA).flatten(2)
    return (Jt * K.reshape(-1)) @ Jt.mT


def _recorded(data: dict[str, _LayerData | _Fallback], t: TensorSlot) -> _LayerData | None:
    """The recorded (a, g) of the tensor's layer; None for other tensors and fallbacks."""
    ld = data.get(t.layer.name) if t.layer is not None else None
    return ld if isinstance(ld, _LayerData) else None


def _block_jacobian(bs: BlockSlot, data: _Data, J_other: Tensor | None,
                    plan: LayerwisePlan, N: int, D: int, like: Tensor) -> Tensor:
    """Materialised Jacobian (N, D, p_b) of the tensors one block covers."""
    parts = [_tensor_jacobian(t, data, J_other, plan, N, D, like) for t in bs.tensors]
    return torch.cat(parts, -1)


def _block_delta(delta: Tensor, bs: BlockSlot) -> Tensor:
    return delta if delta.ndim == 0 else delta[bs.start : bs.stop]


def functional_covariance(la: Laplace, plan: LayerwisePlan, data: _Data,
                          J_other: Tensor | None, N: int, D: int, joint: bool) -> Tensor:
    """J Σ Jᵀ per input (N, D, D), or over the whole batch (N·D, N·D) with ``joint=True``."""
    scale, delta = la._precision_args()
    like = torch.zeros((), dtype=la.H.dtype, device=la.H.device)
    if joint:
        out = like.new_zeros(N * D, N * D)
        for bs in plan.blocks:
            J = _block_jacobian(bs, data, J_other, plan, N, D, like).reshape(1, N * D, -1)
            out = out + bs.block.inv_quad(J, scale, _block_delta(delta, bs))[0]
        return out
    out = like.new_zeros(N, D, D)
    for bs in plan.blocks:
        block, d = bs.block, _block_delta(delta, bs)
        if isinstance(block, Kronecker):
            t = bs.tensors[0]
            if d.ndim == 1:
                if not bool(torch.all(d == d[0])):
                    raise ValueError("KFAC blocks need one prior precision per block "
                                     "(scalar or layer-wise), got per-parameter values")
                d = d[0]
            ld = _recorded(data, t)
            if ld is not None:
                out = out + _kron_quad(block, ld, scale, d)
            else:
                J = _tensor_jacobian(t, data, J_other, plan, N, D, like)
                out = out + _kron_quad_dense(block, J, scale, d)
        elif isinstance(block, Diagonal):
            K = 1 / (scale * block.h + d)
            for t in bs.tensors:
                Kt = K[t.start - bs.start : t.stop - bs.start]
                ld = _recorded(data, t)
                if t.role == "weight" and ld is not None:
                    out = out + _weight_quad(ld, Kt.reshape(t.shape[0], -1))
                elif t.role == "bias" and ld is not None:
                    Jb = ld.g.sum(2)  # (D, N, m)
                    out = out + torch.einsum("dni,eni->nde", Jb * Kt, Jb)
                else:  # other tensors and layers that fell back
                    J = _tensor_jacobian(t, data, J_other, plan, N, D, like)
                    out = out + (J * Kt) @ J.mT
        else:  # Dense
            if d.ndim == 1 and bool(torch.all(d == d[0])):
                d = d[0]
            if d.ndim == 0:
                evals, Q = block.eig()
                M = _jacobian_times(bs, data, J_other, plan, Q, N, D, like)
                out = out + (M / (scale * evals + d)) @ M.mT
            else:
                M = _jacobian_times(bs, data, J_other, plan, block.covariance_dense(scale, d),
                                    N, D, like)
                out = out + M @ _block_jacobian(bs, data, J_other, plan, N, D, like).mT
    return out


def _jacobian_times(bs: BlockSlot, data: _Data, J_other: Tensor | None,
                    plan: LayerwisePlan, S: Tensor, N: int, D: int, like: Tensor) -> Tensor:
    """J S for the block's Jacobian J (N, D, p) and a matrix S (p, q), tensor by tensor: (N, D, q).

    A weight without sharing contracts its inputs first, J^W S = g (aᵀ S) with S as
    (D_out, D_in, q), and never forms J^W.
    """
    out = like.new_zeros(N, D, S.shape[-1])
    for t in bs.tensors:
        St = S[t.start - bs.start : t.stop - bs.start]
        ld = _recorded(data, t)
        if t.role == "weight" and ld is not None and ld.a.shape[1] == 1:
            aS = torch.einsum("nj,mjq->nmq", ld.a[:, 0], St.reshape(t.shape[0], -1, St.shape[-1]))
            out = out + torch.einsum("dnm,nmq->ndq", ld.g[:, :, 0], aS)
        elif t.role == "bias" and ld is not None:
            out = out + torch.einsum("dnm,mq->ndq", ld.g.sum(2), St)
        else:
            out = out + _tensor_jacobian(t, data, J_other, plan, N, D, like) @ St
    return out

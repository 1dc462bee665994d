"""Layers that hooks cannot record: detection on the first batch (no factor maths here).

A registered layer is *silent* when its hooks did not fire during a forward pass (called
functionally, e.g. ``F.linear(x, m.weight)``, or not used at all), and *inconsistent* when what
its hooks recorded cannot give its parameters' exact gradients (its weight is also used outside
its forward, or its batch is not the first dimension of its input). The curvature engine and the
layer-wise predictive check both on the first batch (chunk), warn once naming such layers
(:func:`silent_message`), and give their parameters the exact per-sample ``torch.func`` path —
never a zero or mixed-up Jacobian (docs/architecture.md §4). A Linear that sees sequence-first
inputs (L, N, D) is not dropped: it is recorded with its batch in dimension 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from marglik.curvature.builtin_layers import LINEAR
from marglik.curvature.layers import LayerMap, LayerRecord


def silent_layers(layers: list[LayerRecord]) -> list[LayerRecord]:
    """The records of a recording (one forward pass) whose hooks did not fire."""
    return [rec for rec in layers if rec.silent]


def without_layers(lmap: LayerMap, drop: list[LayerRecord]) -> LayerMap:
    """``lmap`` without the given records (their tensors then take the generic path)."""
    ids = {id(rec) for rec in drop}
    return LayerMap(
        [rec for rec in lmap.layers if id(rec) not in ids],
        {n: o for n, o in lmap.owner.items() if id(o[0]) not in ids},
    )


def inconsistent_layers(f: Tensor, layers: list[LayerRecord], model: nn.Module
                        ) -> list[LayerRecord]:
    """Recorded layers whose recording cannot give their parameters' exact gradients.

    Checked on one batch with outputs f (N, ...), for layers that did record (remove silent
    ones first):

    - the batch is not the first dimension of a recorded output (e.g. the Linear layers of a
      sequence-first ``nn.TransformerEncoderLayer`` see (L, N, E)): the registry's (a, b)
      layout would mix samples;
    - the weight or bias is also used outside the module's forward (tied, or shared through a
      functional call): for one fixed output column u·f(x_0), the gradient that flows through
      the recorded outputs differs from autograd's total gradient;
    - where the layout is ambiguous (a recorded output (N, N, ...)), or the layer sees the
      N·S copies of a copy-averaging module (:mod:`marglik.curvature.copies`), the recorded
      per-sample gradient Σ_r b_{0,r} a_{0,r}ᵀ of x_0 differs from autograd's.

    A Linear whose recorded outputs are all (L, N, D_out) (sequence first: unambiguous if
    L ≠ N, else decided by the per-sample check) gets ``batch_dim = 1`` instead, and keeps its
    Kronecker factors. The layers' parameters must require grad (else only the first check
    runs).
    """
    N = f.shape[0]

    def sequence_first(rec: LayerRecord) -> bool:
        return rec.kind is LINEAR and all(o.dim() == 3 and o.shape[1] == N for o in rec.outputs)

    for rec in layers:
        if rec.copies > 1 and all(o.shape[0] == N for o in rec.outputs):
            rec.copies = 1  # inside a copy-averaging module, but run on the inputs themselves
        if any(o.shape[0] != N * rec.copies for o in rec.outputs) and sequence_first(rec):
            rec.batch_dim, rec.copies = 1, 1
    bad = [rec for rec in layers
           if any(o.shape[rec.batch_dim] != N * rec.copies for o in rec.outputs)]
    layers = [rec for rec in layers if rec not in bad]
    names = [n for rec in layers for n in (rec.weight, rec.bias) if n]
    params = {n: model.get_parameter(n) for n in names}
    if not layers or not f.requires_grad or not all(p.requires_grad for p in params.values()):
        return bad
    u = torch.zeros_like(f)
    D = f[0].numel()
    u[0] = (1.5 + torch.cos(torch.arange(D, dtype=f.dtype, device=f.device))).reshape(f.shape[1:])
    outs = [o for rec in layers for o in rec.outputs]
    grads = torch.autograd.grad(f, outs + list(params.values()), u, retain_graph=True,
                                allow_unused=True)
    g_outs = [torch.zeros_like(o) if g is None else g.detach()
              for g, o in zip(grads[: len(outs)], outs)]
    total = {n: torch.zeros_like(p) if g is None else g.detach()
             for (n, p), g in zip(params.items(), grads[len(outs):])}
    tol = 1e-6 if f.dtype == torch.float64 else 1e-3

    def differs(got: Tensor, ref: Tensor) -> bool:
        if got.shape != ref.shape:  # a mismatched registration: reported by the accumulators
            return False
        scale = max(float(ref.abs().max()), float(got.abs().max()), 1e-30)
        return float((got - ref).abs().max()) > tol * scale

    position = 0
    for rec in layers:
        g_rec = g_outs[position : position + len(rec.outputs)]
        position += len(rec.outputs)
        mine = [n for n in (rec.weight, rec.bias) if n]
        inner = torch.autograd.grad(rec.outputs, [params[n] for n in mine], g_rec,
                                    retain_graph=True, allow_unused=True)
        if any(differs(torch.zeros_like(total[n]) if g is None else g.detach(), total[n])
               for n, g in zip(mine, inner)):
            bad.append(rec)
            continue
        if rec.copies > 1 or any(o.dim() >= 3 and o.shape[1] == N for o in rec.outputs):
            if _per_sample_matches(rec, g_rec, total, differs):
                continue
            if rec.batch_dim == 0 and sequence_first(rec):  # (N, N, D): try sequence first
                rec.batch_dim = 1
                if _per_sample_matches(rec, g_rec, total, differs):
                    continue
                rec.batch_dim = 0
            bad.append(rec)
    return bad


def _per_sample_matches(rec: LayerRecord, g_rec: list[Tensor], total: dict[str, Tensor],
                        differs) -> bool:
    """Whether the recorded gradient of sample 0, Σ_r b_{0,r} a_{0,r}ᵀ, is autograd's."""
    a, b = rec.data(iter(g[None] for g in g_rec))
    got = {rec.weight: torch.einsum("ro,ri->oi", b[0, 0], a[0].detach()),
           rec.bias: b[0, 0].sum(0)}
    return not any(differs(got[n].reshape(-1), total[n].reshape(-1).to(got[n].dtype))
                   for n in (rec.weight, rec.bias) if n)


def silent_message(layers: list[LayerRecord]) -> str:
    """One line naming layers that cannot be recorded (for the warning)."""
    names = sorted({rec.name for rec in layers})
    return (
        f"layers {names} cannot be recorded as modules (hooks that did not fire: called "
        "functionally, e.g. F.linear(x, m.weight), or unused; or gradients that do not match "
        "autograd: weights also used outside the module, or the batch not in the first "
        "dimension); their parameters take the exact per-sample (torch.func) path"
    )

"""Per-sample column gradients of parameters outside registered layers, module by module.

Parameters that no registered layer owns (BatchNorm, LayerNorm, a custom module's) take the
exact generic path: per-sample gradients J_nᵀ U_k,n. Through the whole model
(:func:`~marglik.curvature.per_sample.per_sample_column_grads`) that is a second backward pass
of every column for every sample — for a ResNet's BatchNorms as much as the fit's own pass.
Instead, each such parameter's *owner* (the module holding it directly) is recorded like a
layer: its forward arguments and its output, whose column gradients b (K, N, *out) the fit's one
backward pass gives as well. The per-sample gradients are then the owner's own vector-Jacobian
products, ∂(b_{k,n} · m(x_n))/∂θ_m, vmapped over samples and columns through this module alone
(``torch.func``) and summed over its calls — or, for normalisation layers, their closed form
(:mod:`marglik.curvature.norms`).

This is exact when the module computes sample n's output from sample n's inputs only, batch
first (eval-mode BatchNorm, LayerNorm, GroupNorm, …), and its parameters act only through its
forward. Both are checked on the first batch (:func:`inconsistent_owners`): for one output
column of sample 0, the gradient the recording gives each owner's parameters must equal
autograd's. Owners that fail, whose hooks did not fire, or whose forward takes keyword tensors
or non-tensor arguments keep the whole-model path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from marglik.curvature.norms import norm_sample_gradients
from marglik.curvature.subsets import ParameterSubset


@dataclass
class OwnerRecord:
    """A module owning parameters of the generic path, and what one forward pass saw.

    Attributes:
        name: module name.
        params: local parameter name -> full name, in subset order.
        args, outputs: per call, the (detached) positional arguments and the raw output.
        supported: False once a call had keyword tensors, non-tensor arguments or outputs.
    """

    name: str
    module: nn.Module
    params: dict[str, str]
    args: list[tuple[Tensor, ...]] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    supported: bool = True
    recording: bool = True  # off while :meth:`gradients` runs the module itself

    def gradients(self, grads: Iterator[Tensor]) -> dict[str, Tensor]:
        """Per-sample column gradients (K, N, numel) of the parameters, full name -> tensor,
        from the next ``len(self.outputs)`` column gradients (K, *output.shape)."""
        params = {local: self.module.get_parameter(local).detach() for local in self.params}
        total: dict[str, Tensor] = {}
        self.recording = False
        try:
            for args in self.args:
                g = next(grads)  # (K, N, *out)
                self._add_call(params, args, g, total)
        finally:
            self.recording = True
        return {self.params[local]: value for local, value in total.items()}

    def _add_call(self, params: dict[str, Tensor], args: tuple[Tensor, ...], g: Tensor,
                  total: dict[str, Tensor]) -> None:
        """Add one call's per-sample gradients (K, N, numel) to ``total``: in closed form for
        normalisation layers (:mod:`marglik.curvature.norms`), else by ``torch.func``."""
        per_call = norm_sample_gradients(self.module, args, g, list(params))
        if per_call is None:
            per_call = self._generic(params, args, g)
        for local, value in per_call.items():
            total[local] = total[local] + value if local in total else value

    def _generic(self, params: dict[str, Tensor], args: tuple[Tensor, ...], g: Tensor
                 ) -> dict[str, Tensor]:
        """The module's own vjp per sample and column, vmapped: local name -> (K, N, numel)."""

        def sample(args_n: tuple[Tensor, ...], g_n: Tensor) -> dict[str, Tensor]:
            def f(p: dict[str, Tensor]) -> Tensor:
                return functional_call(self.module, p, tuple(a.unsqueeze(0) for a in args_n))[0]

            _, vjp_fn = vjp(f, params)
            return vmap(lambda u: vjp_fn(u)[0])(g_n)

        per_call = vmap(sample)(args, g.transpose(0, 1))  # (N, K, *shape) per parameter
        return {local: value.transpose(0, 1).reshape(*g.shape[:2], -1)
                for local, value in per_call.items()}


def owner_records(model: nn.Module, rest: ParameterSubset | None) -> list[OwnerRecord]:
    """The owners of the generic path's tensors (whole tensors only; none for index subsets,
    nor for parameters of the model itself)."""
    if rest is None or rest.index is not None:
        return []
    by_owner: dict[str, dict[str, str]] = {}
    for full in rest.names:
        if "." in full:
            owner, local = full.rsplit(".", 1)
            by_owner.setdefault(owner, {})[local] = full
    modules = dict(model.named_modules())
    return [OwnerRecord(owner, modules[owner], params) for owner, params in by_owner.items()
            if owner in modules]


class OwnerRecorder:
    """Forward hooks on the owners (removed on exit); each output is handed on as a copy, so
    that in-place operations downstream cannot overwrite the recorded one."""

    def __init__(self, owners: list[OwnerRecord]):
        self.owners = owners
        self.handles: list = []

    def __enter__(self) -> OwnerRecorder:
        for rec in self.owners:
            self.handles.append(
                rec.module.register_forward_hook(self._hook(rec), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def remove(self, drop: list[OwnerRecord]) -> None:
        """Stop recording the given owners."""
        ids = {id(rec) for rec in drop}
        self.__exit__()
        self.owners = [rec for rec in self.owners if id(rec) not in ids]
        self.__enter__()

    def clear(self) -> None:
        for rec in self.owners:
            rec.args.clear()
            rec.outputs.clear()

    @staticmethod
    def _hook(rec: OwnerRecord):
        def hook(module, args, kwargs, output):
            if not rec.recording:
                return None
            if (not isinstance(output, Tensor) or not all(isinstance(a, Tensor) for a in args)
                    or any(isinstance(v, Tensor) for v in kwargs.values())):
                rec.supported = False
                return None
            rec.args.append(tuple(a.detach() for a in args))
            rec.outputs.append(output)
            return output.clone()

        return hook


def owner_outputs(owners: list[OwnerRecord]) -> list[Tensor]:
    """The recorded outputs of all owners, in owner and call order."""
    return [o for rec in owners for o in rec.outputs]


def inconsistent_owners(f: Tensor, owners: list[OwnerRecord], model: nn.Module
                        ) -> list[OwnerRecord]:
    """Owners whose recording does not give their parameters' exact per-sample gradients.

    Checked on one batch with outputs f (N, ...): the owner did not run, could not be recorded,
    does not keep the batch in dimension 0, or, for the column u = (1.5 + cos d) at sample 0
    only, its recorded gradient differs from autograd's gradient of u·f w.r.t. its
    parameters (which must require grad).
    """
    N = f.shape[0]
    bad = [rec for rec in owners
           if not rec.supported or not rec.outputs
           or any(t.dim() == 0 or t.shape[0] != N for o, a in zip(rec.outputs, rec.args)
                  for t in (o, *a))]
    owners = [rec for rec in owners if rec not in bad]
    params = {full: model.get_parameter(full) for rec in owners for full in rec.params.values()}
    if not owners or not f.requires_grad or not all(p.requires_grad for p in params.values()):
        return bad + owners
    u = torch.zeros_like(f)
    D = f[0].numel()
    u[0] = (1.5 + torch.cos(torch.arange(D, dtype=f.dtype, device=f.device))).reshape(f.shape[1:])
    outs = owner_outputs(owners)
    grads = torch.autograd.grad(f, outs + list(params.values()), u, retain_graph=True,
                                allow_unused=True)
    g_outs = iter((torch.zeros_like(o) if g is None else g.detach())[None]
                  for g, o in zip(grads[: len(outs)], outs))
    total = {n: torch.zeros_like(p) if g is None else g.detach()
             for (n, p), g in zip(params.items(), grads[len(outs):])}
    tol = 1e-6 if f.dtype == torch.float64 else 1e-3
    for rec in owners:
        got = rec.gradients(g_outs)
        for full, value in got.items():
            ref = total[full].reshape(-1)
            scale = max(float(ref.abs().max()), float(value[0, 0].abs().max()), 1e-30)
            if float((value[0, 0] - ref).abs().max()) > tol * scale:
                bad.append(rec)
                break
    return bad

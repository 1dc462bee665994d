"""Collecting layer inputs and output gradients with forward hooks (no factor maths here).

Which modules are layers, and how their inputs and output gradients are laid out, comes from the
registry (:mod:`marglik.curvature.registry`): ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d``
(``groups=1``, zero padding) are registered, other types can be. :func:`layer_map` resolves a
model and a parameter subset into the layers to record and the map parameter → (layer, role),
once per fit or predictive plan; the curvature engine and the layer-wise predictive both use it.

For each call of a layer we keep its input ``a`` as (N, R, D_in) — e.g. convolution inputs
unfolded into patches — and later the gradients ``b`` of each output column w.r.t. the layer
output as (K, N, R, D_out).

A module registered as a :class:`~marglik.curvature.registry.CompositeType`
(``nn.MultiheadAttention``) gives one record per linear part; while recording, its forward is
replaced by the type's explicit forward, whose ``linear`` callback records each part (the
instance attribute is removed again on exit, and torch's fused attention fast paths are
switched off meanwhile, so they cannot bypass it).

A layer whose hooks did not fire during a forward pass (called functionally, e.g.
``F.linear(x, m.weight)``, or not used at all) is *silent*: :mod:`marglik.curvature.silent`
finds it (and layers whose recording mixes samples), and the engine and the layer-wise
predictive give its parameters the exact ``torch.func`` path instead (a zero Jacobian would be
wrong whenever the weight is used some other way).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.curvature.builtin_layers import LINEAR
from marglik.curvature.copies import (
    group_grads,
    group_input_sums,
    group_inputs,
    module_copies,
    scale_expand,
)
from marglik.curvature.kfac import input_statistics, kfac_factors
from marglik.curvature.registry import CompositeType, LayerType, layer_type
from marglik.curvature.subsets import ParameterSubset


@dataclass
class LayerRecord:
    """A registered layer whose weight and/or bias lie in the subset, and what one forward saw.

    ``kind`` is the registry entry, resolved once when the record is made (see
    :func:`layer_map`); the hooks use it on every call without a lookup.
    """

    name: str
    module: nn.Module
    weight: str | None  # parameter name if the weight is in the subset
    bias: str | None
    kind: LayerType | None = None  # default: looked up in the registry
    inputs: list[Tensor] = field(default_factory=list)  # (N, R, D_in) per call
    outputs: list[Tensor] = field(default_factory=list)  # raw outputs per call (graph attached)
    #: for a part of a composite module (``CompositeType``): the part's name, its composite
    #: type, its full D_out, and per call the weight rows it used (None: all of them)
    part: str | None = None
    composite: CompositeType | None = None
    d_out: int = 0
    rows: list[tuple[int, int] | None] = field(default_factory=list)
    #: 1 for a Linear that sees sequence-first inputs (L, N, D_in) (e.g. inside a
    #: ``batch_first=False`` transformer layer); set by :func:`inconsistent_layers`
    batch_dim: int = 0
    #: S > 1 inside a module averaging S copies of each input whose layer sees N·S rows
    #: (:mod:`marglik.curvature.copies`); reset to 1 by :func:`inconsistent_layers` if not
    copies: int = 1
    #: lazily recorded calls (:class:`FitRecorder`): the forward arguments and their tensors'
    #: versions (``inputs`` is then empty; a is formed when used, one layer at a time)
    args: list[tuple] = field(default_factory=list)
    versions: list[tuple[int, ...]] = field(default_factory=list)
    #: recorded outputs passed on uncopied (:class:`FitRecorder`): their versions when recorded,
    #: and whether an in-place operation downstream overwrote one (then copies from now on)
    out_versions: list[int] = field(default_factory=list)
    copy_output: bool = False

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = layer_type(self.module)
            if not isinstance(self.kind, LayerType):
                raise ValueError(
                    f"layer {self.name!r}: {type(self.module).__name__} is not a "
                    "registered layer type (marglik.curvature.registry)"
                )

    def empty_copy(self) -> LayerRecord:
        """The same layer with nothing recorded (for a recording of its own)."""
        return LayerRecord(self.name, self.module, self.weight, self.bias, self.kind,
                           part=self.part, composite=self.composite, d_out=self.d_out,
                           batch_dim=self.batch_dim, copies=self.copies)

    @property
    def silent(self) -> bool:
        """Whether nothing was recorded (the hooks did not fire)."""
        return not self.outputs

    def data(self, grads: Iterator[Tensor]) -> tuple[Tensor, Tensor]:
        """(a (N, R, D_in), b (K, N, R, D_out)) over all recorded calls.

        Takes the next ``len(self.outputs)`` entries of ``grads``: the column gradients
        (K, *output.shape) w.r.t. each recorded output, in call order (see
        :func:`~marglik.curvature.backprop.backprop_columns`). Calls are concatenated along the
        positions R; a call that used only some rows of the weight (``rows``) gets its
        gradients zero-padded to D_out.
        """
        bs = self.call_grads(grads)
        return _cat(self.call_inputs(), 1), _cat(bs, 2)

    def kfac(self, grads: Iterator[Tensor], approx: str) -> tuple[Tensor, Tensor, int]:
        """KFAC sums (A_sum, G_sum, count) of this batch, matrices or the rows whose Gram they
        are (:func:`~marglik.curvature.kfac.kfac_factors`); the input statistics come straight
        from the forward arguments where the layer type has a cheaper identity
        (``LayerType.input_sums``, e.g. convolutions)."""
        bs = self.call_grads(grads)
        fast = self.kind.input_sums if self.args and self.batch_dim == 0 else None
        if fast is not None:
            self._check_unchanged()
            stats = [group_input_sums(fast(self.module, args, approx), approx, self.copies)
                     for args in self.args]
        else:
            stats = [input_statistics(a, approx) for a in self.call_inputs()]
        A, G, count = kfac_factors(stats, bs, approx)
        return A, scale_expand(G, approx, self.copies), count

    def call_inputs(self) -> list[Tensor]:
        """a (N, R_c, D_in) per recorded call (formed now if the recording was lazy)."""
        if self.args:
            self._check_unchanged()
            inputs = [self.kind.inputs(self.module, args) for args in self.args]
        else:
            inputs = self.inputs
        if self.batch_dim == 1:  # (L, N, D_in) recorded as (L, R = N, D_in)
            inputs = [a.transpose(0, 1) for a in inputs]
        return [group_inputs(a, self.copies) for a in inputs]

    def call_grads(self, grads: Iterator[Tensor]) -> list[Tensor]:
        """b (K, N, R_c, D_out) per recorded call, from the next ``len(self.outputs)`` entries of
        ``grads``; a call that used only some rows of the weight is zero-padded to D_out."""
        if self.silent:
            raise ValueError(
                f"layer {self.name!r} ({type(self.module).__name__}) ran on the first batch but "
                "not on this one; its curvature cannot be recorded consistently (is it used "
                "conditionally?): use hessian_structure='full' or exclude it"
            )
        bs = []
        for i in range(len(self.outputs)):
            b = self.kind.output_grads(self.module, next(grads))
            if self.batch_dim == 1:
                b = b.transpose(1, 2)
            b = group_grads(b, self.copies)
            rows = self.rows[i] if i < len(self.rows) else None
            if rows is not None:
                b = F.pad(b, (rows[0], self.d_out - rows[1]))
            bs.append(b)
        return bs

    def _check_unchanged(self) -> None:
        """Lazily recorded inputs must not have been modified in place since the layer ran."""
        for args, versions in zip(self.args, self.versions):
            now = tuple(t._version for t in args if isinstance(t, Tensor))
            if now != versions:
                raise RuntimeError(
                    f"the input of layer {self.name!r} ({type(self.module).__name__}) was "
                    "modified in place after the layer used it (an in-place operation on it "
                    "later in the forward pass); its curvature would be wrong: make that "
                    "operation out of place"
                )


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    """torch.cat without a copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


@dataclass
class LayerMap:
    """The registered layers owning parameters of a subset, and which parameter is which.

    Attributes:
        layers: records in ``model.named_modules()`` order.
        owner: parameter name -> (record, ``"weight"`` | ``"bias"``) for every subset tensor that
            belongs to a layer; the other tensors take the generic (``torch.func``) path.
    """

    layers: list[LayerRecord]
    owner: dict[str, tuple[LayerRecord, str]]


def layer_map(model: nn.Module, subset: ParameterSubset) -> LayerMap:
    """Registered layers that own a parameter of the subset (whole tensors only).

    A subnetwork given by flat indices has no layers (every entry takes the generic path).
    A composite module (``CompositeType``) gives one record per linear part, named
    ``<module>.<part>``; a submodule whose parameters a part claims (``out_proj`` of
    ``nn.MultiheadAttention``) is not a layer of its own.
    """
    if subset.index is not None:
        return LayerMap([], {})
    chosen = set(subset.names)
    records, owner = [], {}
    claimed: set[str] = set()  # parameters of composite parts

    def add(rec: LayerRecord) -> None:
        if rec.weight:
            owner[rec.weight] = (rec, "weight")
        if rec.bias:
            owner[rec.bias] = (rec, "bias")
        if rec.weight or rec.bias:
            records.append(rec)

    for name, module in model.named_modules():
        kind = layer_type(module)
        if kind is None:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(kind, CompositeType):
            for part in kind.parts(module):
                weight = prefix + part.weight
                bias = prefix + part.bias if part.bias is not None else None
                claimed.update(n for n in (weight, bias) if n)
                add(LayerRecord(
                    prefix + part.name,
                    module,
                    weight if weight in chosen else None,
                    bias if bias in chosen else None,
                    LINEAR,
                    part=part.name,
                    composite=kind,
                    d_out=module.get_parameter(part.weight).shape[0],
                ))
            continue
        weight = prefix + kind.weight
        bias = prefix + kind.bias if kind.bias is not None else None
        if weight in claimed or bias in claimed:
            continue
        add(LayerRecord(
            name,
            module,
            weight if weight in chosen else None,
            bias if bias in chosen else None,
            kind,
        ))
    copies = module_copies(model)
    for rec in records:
        rec.copies = copies[id(rec.module)]
    return LayerMap(records, owner)


def find_layers(model: nn.Module, subset: ParameterSubset) -> list[LayerRecord]:
    """The records of :func:`layer_map`."""
    return layer_map(model, subset).layers


def supported(module: nn.Module) -> bool:
    """Whether the layer's weight has a Kronecker-factored curvature here (is registered)."""
    return layer_type(module) is not None


class LayerRecorder:
    """Records inputs and outputs of the given layers; the hooks are removed on exit.

    Each recorded output is returned to the rest of the network as a copy, so that in-place
    operations downstream (``ReLU(inplace=True)``) cannot overwrite the tensor whose gradient
    we take (unless ``copy_outputs`` is off). Class flags select the variant:

    - ``detach_inputs``: record ``a`` from detached forward arguments (plain fits);
    - ``leaf_outputs``: where an output does not require grad (nothing upstream does), record a
      leaf copy that does, so that gradients w.r.t. it still exist;
    - ``lazy_inputs``: keep the forward arguments and form ``a`` only when a layer's statistics
      are taken (:meth:`LayerRecord.call_inputs`, :meth:`LayerRecord.kfac`), one layer at a
      time: no unfolded patches of every layer at once, and cheaper identities for the KFAC
      factors (``LayerType.input_sums``);
    - ``copy_outputs``: return a copy of each recorded output to the network. Off, the output
      itself goes on (no copy of every layer's output per batch) and :meth:`overwritten` finds
      the layers whose recorded output an in-place operation changed after the layer ran; those
      are copied from then on and the caller redoes the forward pass.
    """

    detach_inputs: bool = True
    leaf_outputs: bool = False
    lazy_inputs: bool = False
    copy_outputs: bool = True

    def __init__(self, layers: list[LayerRecord]):
        self.layers = layers
        self.handles: list = []
        self.patched: list[tuple[nn.Module, object]] = []  # composite modules, their own forward
        self.fastpath: bool | None = None

    def __enter__(self) -> LayerRecorder:
        composites: dict[nn.Module, dict[str, LayerRecord]] = {}
        for rec in self.layers:
            if rec.composite is not None:
                composites.setdefault(rec.module, {})[rec.part] = rec
            else:
                self.handles.append(rec.module.register_forward_hook(self._hook(rec)))
        for module, parts in composites.items():
            own = module.__dict__.get("forward", _MISSING)
            self.patched.append((module, own))
            kind = next(iter(parts.values())).composite
            module.forward = functools.partial(kind.forward, module, self._linear(parts))
        if composites:  # fused attention kernels would bypass the explicit forward
            self.fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module, own in reversed(self.patched):
            if own is _MISSING:
                del module.forward
            else:
                module.forward = own
        self.patched.clear()
        if self.fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self.fastpath)
            self.fastpath = None

    def remove(self, drop: list[LayerRecord]) -> None:
        """Stop recording the given layers (silent ones), keeping the others' hooks.

        Rebuilds the hooks and forwards for the remaining layers.
        """
        ids = {id(rec) for rec in drop}
        self.__exit__(None, None, None)
        self.layers = [rec for rec in self.layers if id(rec) not in ids]
        self.__enter__()

    def _record(self, rec: LayerRecord, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if self.detach_inputs:
            args = tuple(t.detach() if isinstance(t, Tensor) else t for t in args)
        if self.lazy_inputs:
            rec.args.append(args)
            rec.versions.append(tuple(t._version for t in args if isinstance(t, Tensor)))
        else:
            rec.inputs.append(rec.kind.inputs(rec.module, args))
        if self.leaf_outputs and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        rec.outputs.append(output)
        if self.copy_outputs or rec.copy_output:
            return output.clone()
        rec.out_versions.append(output._version)
        return output

    def _hook(self, rec: LayerRecord):
        record = self._record

        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return record(rec, args, output)

        return hook

    def _linear(self, parts: dict[str, LayerRecord]):
        """The ``linear`` callback of a composite module's explicit forward."""
        record = self._record

        def linear(part: str, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                   rows: tuple[int, int] | None = None) -> Tensor:
            out = F.linear(x, weight, bias)
            rec = parts.get(part)
            if rec is None:  # the part is not in the subset
                return out
            rec.rows.append(rows)
            return record(rec, (x,), out)

        return linear

    def clear(self) -> None:
        for rec in self.layers:
            for recorded in (rec.inputs, rec.outputs, rec.rows, rec.args, rec.versions,
                             rec.out_versions):
                recorded.clear()

    def overwritten(self) -> list[LayerRecord]:
        """Layers whose uncopied recorded outputs (``copy_outputs`` off) an in-place operation
        changed after the layer ran: their gradients would be taken w.r.t. the wrong tensor.
        They are marked to be recorded with copies from now on; the forward pass that recorded
        them must be redone (after :meth:`clear`)."""
        bad = [rec for rec in self.layers
               if any(o._version != v for o, v in zip(rec.outputs, rec.out_versions))]
        for rec in bad:
            rec.copy_output = True
        return bad


class FitRecorder(LayerRecorder):
    """The curvature fit's recorder: detached inputs, recorded lazily (``lazy_inputs``), outputs
    passed on uncopied unless an in-place operation overwrites them (``copy_outputs`` off: the
    engine checks :meth:`~LayerRecorder.overwritten` after every forward pass)."""

    lazy_inputs = True
    copy_outputs = False


class GraphLayerRecorder(LayerRecorder):
    """A :class:`LayerRecorder` that keeps the recorded inputs in the autograd graph.

    Used for a differentiable curvature (``fit_curvature(create_graph=True)``): the inputs ``a``
    then carry gradients to whatever produced them (e.g. a learned input transformation).
    """

    detach_inputs = False


_MISSING = object()


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """Input ``a`` (N, R, D_in) of a registered single-input layer called on x."""
    return _kind(module).inputs(module, (x,))


def output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Gradients w.r.t. a layer output, with a leading column dim K, as (K, N, R, D_out)."""
    return _kind(module).output_grads(module, g)


def _kind(module: nn.Module) -> LayerType:
    kind = layer_type(module)
    if not isinstance(kind, LayerType):
        raise ValueError(f"{type(module).__name__} is not a registered layer type")
    return kind

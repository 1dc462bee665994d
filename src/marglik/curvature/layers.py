"""Collecting layer inputs and output gradients with forward hooks (no factor maths here).

Supported layers are ``nn.Linear`` (inputs with any leading dimensions: the middle ones are
shared positions, e.g. tokens or graph nodes) and ``nn.Conv1d``/``nn.Conv2d`` with
``groups=1`` and zero padding (patches are the shared positions). For each call of a layer we
keep its input ``a`` as (N, R, D_in) — convolution inputs unfolded into patches — and later the
gradients ``b`` of each output column w.r.t. the layer output as (K, N, R, D_out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.curvature.subsets import ParameterSubset


@dataclass
class LayerRecord:
    """A supported layer whose weight and/or bias lie in the subset, and what one forward saw."""

    name: str
    module: nn.Module
    weight: str | None  # parameter name if the weight is in the subset
    bias: str | None
    inputs: list[Tensor] = field(default_factory=list)  # (N, R, D_in) per call
    outputs: list[Tensor] = field(default_factory=list)  # raw outputs per call (graph attached)


def supported(module: nn.Module) -> bool:
    """Whether the layer's weight has a Kronecker-factored curvature here."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


def find_layers(model: nn.Module, subset: ParameterSubset) -> list[LayerRecord]:
    """Supported layers that own a parameter of the subset (whole tensors only)."""
    if subset.index is not None:
        return []
    chosen = set(subset.names)
    records = []
    for name, module in model.named_modules():
        if not supported(module):
            continue
        prefix = f"{name}." if name else ""
        weight, bias = prefix + "weight", prefix + "bias"
        rec = LayerRecord(
            name, module, weight if weight in chosen else None, bias if bias in chosen else None
        )
        if rec.weight or rec.bias:
            records.append(rec)
    return records


class LayerRecorder:
    """Records inputs and outputs of the given layers; the hooks are removed on exit."""

    def __init__(self, layers: list[LayerRecord]):
        self.layers = layers
        self.handles: list = []

    def __enter__(self) -> LayerRecorder:
        for rec in self.layers:
            self.handles.append(rec.module.register_forward_hook(self._hook(rec)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @staticmethod
    def _hook(rec: LayerRecord):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            rec.inputs.append(layer_inputs(module, inputs[0].detach()))
            rec.outputs.append(output)
            # the rest of the network gets a copy, so in-place ops (ReLU(inplace=True)) cannot
            # overwrite the tensor whose gradient we take
            return output.clone()

        return hook

    def clear(self) -> None:
        for rec in self.layers:
            rec.inputs.clear()
            rec.outputs.clear()


class GraphLayerRecorder(LayerRecorder):
    """A :class:`LayerRecorder` that keeps the recorded inputs in the autograd graph.

    Used for a differentiable curvature (``fit_curvature(create_graph=True)``): the inputs ``a``
    then carry gradients to whatever produced them (e.g. a learned input transformation).
    """

    @staticmethod
    def _hook(rec: LayerRecord):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            rec.inputs.append(layer_inputs(module, inputs[0]))
            rec.outputs.append(output)
            return output.clone()

        return hook


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input as (N, R, D_in): leading dims flattened to positions, or conv patches."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-1)
        kernel, stride, dilation = (
            (*module.kernel_size, 1),
            (*module.stride, 1),
            (*module.dilation, 1),
        )
        padding = module.padding if isinstance(module.padding, str) else (*module.padding, 0)
    else:
        kernel, stride, dilation, padding = (
            module.kernel_size,
            module.stride,
            module.dilation,
            module.padding,
        )
    if isinstance(padding, str):  # "valid" or "same" (stride 1), padded as torch does
        pads = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = 0 if padding == "valid" else d * (k - 1)
            pads += [total // 2, total - total // 2]
        x, padding = F.pad(x, pads), 0
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)  # (N, R, C_in·prod(kernel))


def output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Gradients w.r.t. a layer output, with a leading column dim K, as (K, N, R, D_out)."""
    K, N = g.shape[:2]
    if isinstance(module, nn.Linear):
        return g.reshape(K, N, -1, g.shape[-1])
    return g.reshape(K, N, g.shape[2], -1).transpose(2, 3)  # conv: (K, N, C_out, *spatial)


def backprop_columns(
    f: Tensor, tensors: list[Tensor], U: Tensor, create_graph: bool = False
) -> list[Tensor]:
    """Gradients of Σ U_k · f w.r.t. each tensor, for every column k: list of (K, *t.shape).

    All K columns go through one vmapped backward pass (``is_grads_batched``); models with ops
    that vmap does not support fall back to one backward pass per column. With
    ``create_graph`` the gradients stay differentiable (in ``U`` too) and every column gets its
    own backward pass (double backward under vmap is not reliable for every op).
    """
    if not create_graph:
        try:
            grads = torch.autograd.grad(
                f, tensors, U, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            return [
                torch.zeros(U.shape[0], *t.shape, dtype=t.dtype, device=t.device)
                if g is None
                else g
                for g, t in zip(grads, tensors)
            ]
        except RuntimeError:
            pass
    columns: list[list[Tensor]] = [[] for _ in tensors]
    for k in range(U.shape[0]):
        gk = torch.autograd.grad(
            f, tensors, U[k], retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        for i, (g, t) in enumerate(zip(gk, tensors)):
            columns[i].append(torch.zeros_like(t) if g is None else g)
    return [torch.stack(g) for g in columns]

"""Per-sample Jacobians J (N, D, P) of the flattened outputs w.r.t. a parameter subset.

Without a graph to the inputs, ``torch.func`` (vmap over samples, vjp over the D output columns;
:func:`marglik.curvature.per_sample.per_sample_column_grads`). With ``create_graph=True`` (the
predictive's ``enable_backprop``) a plain autograd loop over samples and columns is used
instead: in torch 2.13, ``vmap`` of the ``layer_norm`` backward gives wrong gradients w.r.t. the
inputs under an outer ``autograd.grad`` (checked with ``gradcheck``; GroupNorm, BatchNorm, GELU,
softmax and RMSNorm are fine), and the loop is correct for every module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from marglik.curvature.batches import Inputs, batch_size, model_args, slice_inputs
from marglik.curvature.per_sample import per_sample_column_grads
from marglik.curvature.subsets import ParameterSubset


def per_sample_jacobians(model: nn.Module, subset: ParameterSubset, x: Inputs,
                         out_shape: torch.Size, dtype: torch.dtype,
                         create_graph: bool = False) -> Tensor:
    """J (N, D, P): row d of J_n is ∂f_d(x_n)/∂θ for the D = prod(out_shape) flattened outputs.

    Args:
        x: inputs (N, ...), or a dict / tuple of such tensors (:mod:`marglik.curvature.batches`).
        out_shape: the shape of one output, f(x_n).shape; dtype: the outputs' dtype.
        create_graph: keep the graph to x (autograd loop, N·D backward passes).
    """
    device = next(model.parameters()).device
    N, D = batch_size(x), out_shape.numel()
    if not create_graph:
        U = torch.eye(D, dtype=dtype, device=device)
        U = U.reshape(D, 1, *out_shape).expand(D, N, *out_shape)
        return per_sample_column_grads(model, subset, x, U).transpose(0, 1)
    params = {n: p.detach().requires_grad_(True) for n, p in subset.parameters(model).items()}
    leaves = list(params.values())
    rows = []
    for n in range(N):
        f = functional_call(model, params, model_args(slice_inputs(x, n, n + 1))).reshape(-1)
        cols = []
        for d in range(D):
            grads = torch.autograd.grad(f[d], leaves, retain_graph=True, create_graph=True,
                                        allow_unused=True)
            cols.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, leaves)]))
        rows.append(torch.stack(cols))
    J = torch.stack(rows)
    return J if subset.index is None else J[..., subset.index]

"""Per-sample column gradients J_nᵀ U_k,n for any model, with ``torch.func`` (vmap over samples).

This is the generic path: it works for every module ``torch.func.functional_call`` can run and
gives exact full and diagonal curvature. Memory is N·K·P per chunk; callers chunk over samples.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from marglik.curvature.batches import Inputs, call_model, model_args, slice_inputs, tree_map
from marglik.curvature.subsets import ParameterSubset


def per_sample_column_grads(
    model: nn.Module, subset: ParameterSubset, x: Inputs, U: Tensor, max_elements: int = 2**26
) -> Tensor:
    """Gradients of U_k,n · f(x_n) w.r.t. the subset: (K, N, P).

    Args:
        x: inputs (N, ...): a tensor, or a dict / tuple of tensors sharing the batch dimension
            (:mod:`marglik.curvature.batches`); vmap maps over every tensor in it.
        U: output columns (K, N, *S, C) (see :func:`~marglik.curvature.columns.output_columns`).
        max_elements: chunk over samples so that one chunk holds at most this many numbers.
    """
    params = {n: p.detach() for n, p in subset.parameters(model).items()}
    width = sum(p.numel() for p in params.values())
    chunk = max(1, max_elements // max(1, U.shape[0] * width))

    def sample_grads(x_n: Inputs, U_n: Tensor) -> dict[str, Tensor]:
        def f_single(p: dict[str, Tensor]) -> Tensor:
            x1 = tree_map(lambda t: t.unsqueeze(0), x_n)
            return functional_call(model, p, model_args(x1)).squeeze(0)

        _, vjp_fn = vjp(f_single, params)
        return vmap(lambda u: vjp_fn(u)[0])(U_n)

    out = []
    for start in range(0, U.shape[1], chunk):
        try:
            grads = vmap(sample_grads)(
                slice_inputs(x, start, start + chunk), U[:, start : start + chunk].transpose(0, 1)
            )
        except RuntimeError as err:  # ops vmap cannot batch (e.g. nn.GRU / LSTM / RNN)
            _warn_fallback(model, err)
            G = per_sample_column_grads_looped(model, subset, x, U)
            return G if subset.index is None else G[..., subset.index]
        # (n, K, width); reshape, not flatten(2): a 0-d parameter's gradients are (n, K)
        flat = torch.cat([g.reshape(*g.shape[:2], -1) for g in grads.values()], dim=2)
        out.append(flat.transpose(0, 1))
    G = torch.cat(out, dim=1)
    return G if subset.index is None else G[..., subset.index]


_WARNED: set[type] = set()


def _warn_fallback(model: nn.Module, err: RuntimeError) -> None:
    if type(model) not in _WARNED:
        _WARNED.add(type(model))
        warnings.warn(
            f"torch.func.vmap cannot run {type(model).__name__} per sample ({str(err)[:120]}); "
            "per-sample gradients fall back to one backward pass per sample (exact, slower)",
            stacklevel=4,
        )


def per_sample_column_grads_looped(
    model: nn.Module, subset: ParameterSubset, x: Inputs, U: Tensor
) -> Tensor:
    """:func:`per_sample_column_grads` with one forward and one backward pass per sample: (K, N, P).

    The fallback for models whose ops ``vmap`` cannot batch (recurrent layers): exact, with the
    K output columns batched in each backward pass (``is_grads_batched``) where autograd can,
    else one pass per column.
    """
    params = {n: p.detach().requires_grad_(True) for n, p in subset.parameters(model).items()}
    leaves = list(params.values())
    K = U.shape[0]
    samples = []
    with torch.enable_grad():
        for n in range(U.shape[1]):
            f_n = functional_call(model, params, model_args(slice_inputs(x, n, n + 1)))
            cols = U[:, n : n + 1]
            try:
                grads = torch.autograd.grad(f_n, leaves, cols, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
            except RuntimeError:
                per_col = [torch.autograd.grad(f_n, leaves, cols[k], retain_graph=True,
                                               allow_unused=True) for k in range(K)]
                grads = tuple(
                    None if per_col[0][i] is None else torch.stack([c[i] for c in per_col])
                    for i in range(len(leaves))
                )
            flat = [(torch.zeros(K, p.numel(), dtype=p.dtype, device=p.device) if g is None
                     else g.reshape(K, -1)) for g, p in zip(grads, leaves)]
            samples.append(torch.cat(flat, 1).detach())
    return torch.stack(samples, 1)


def per_sample_column_grads_autograd(
    model: nn.Module, subset: ParameterSubset, x: Inputs, U: Tensor
) -> Tensor:
    """:func:`per_sample_column_grads` with plain autograd, differentiable: (K, N, P).

    One forward pass per sample and one backward pass per (sample, column), with
    ``create_graph=True``, so the result keeps its graph to ``U`` and to every tensor the
    forward pass uses besides the subset (which must require grad). Slow (N·K backward passes)
    but reliable: ``torch.func`` transforms do not differentiate every op correctly for an outer
    autograd graph (e.g. ``nn.LayerNorm`` under ``vmap``).
    """
    params = list(subset.parameters(model).values())
    samples = []
    for n in range(U.shape[1]):
        f_n = call_model(model, slice_inputs(x, n, n + 1))
        columns = []
        for k in range(U.shape[0]):
            grads = torch.autograd.grad(
                f_n,
                params,
                U[k, n : n + 1],
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
            )
            flat = [
                (torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)
            ]
            columns.append(torch.cat(flat))
        samples.append(torch.stack(columns))
    G = torch.stack(samples, 1)
    return G if subset.index is None else G[..., subset.index]

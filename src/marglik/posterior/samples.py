"""Network outputs under sampled weights: the "nn" (sampling) predictive of a weight posterior.

Daxberger et al., NeurIPS 2021: run the network at θ_s ~ q(θ), s = 1..S. Parameters outside the
posterior keep their trained values; a subnetwork given by indices replaces only its entries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from marglik.curvature.batches import Inputs, batch_size, call_model, model_args, slice_inputs
from marglik.curvature.subsets import ParameterSubset

__all__ = ["sample_outputs"]

#: Default bound on the output numbers held per chunk of inputs.
MAX_ELEMENTS = 2**24


def sample_outputs(model: nn.Module, subset: ParameterSubset, thetas: Tensor, x: Inputs,
                   chunk_size: int | None = None) -> Tensor:
    """f(x; θ_s) for every sample: (S, B, ...).

    Args:
        model: the network (called with ``torch.func.functional_call``; not modified).
        subset: which parameters θ covers.
        thetas: weight samples (S, P).
        x: inputs (B, ...), or a dict / tuple of such tensors (:mod:`marglik.curvature.batches`).
        chunk_size: inputs per chunk (default: about :data:`MAX_ELEMENTS` numbers per chunk).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = subset.names
    base = torch.cat([params[n].reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    samples = []
    for theta in thetas:
        flat = base.clone()
        if subset.index is not None:
            flat[subset.index] = theta.to(flat)
        else:
            flat = theta.to(flat)
        sampled = dict(params)
        for n, chunk in zip(names, flat.split(sizes)):
            sampled[n] = chunk.reshape(params[n].shape)
        samples.append(sampled)
    if chunk_size is None:
        with torch.no_grad():
            numel_out = call_model(model, slice_inputs(x, 0, 1)).numel()
        chunk_size = max(1, MAX_ELEMENTS // max(1, 4 * len(samples) * numel_out))
    chunks = [
        torch.stack([functional_call(model, s, model_args(slice_inputs(x, i, i + chunk_size)))
                     for s in samples])
        for i in range(0, batch_size(x), chunk_size)
    ]
    return torch.cat(chunks, 1)

"""The tangent (linearised) model h(x; t) = J(x; θ*) t of a network at its trained weights θ*.

Antorán et al., ICML 2022: the GLM predictive is the posterior predictive of this Bayesian linear
model in the features J(x; θ*); :mod:`marglik.posterior.tangent` evaluates its evidence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from marglik.curvature.batches import Inputs, model_args
from marglik.curvature.runtime import no_fused_attention
from marglik.curvature.subsets import ParameterSubset

__all__ = ["tangent_outputs"]


def tangent_outputs(
    model: nn.Module, subset: ParameterSubset, t: Tensor
) -> Callable[[Inputs], Tensor]:
    """x -> h(x; t) = J(x; θ*) t, (B, ...) — one forward-mode pass (``torch.func.jvp``).

    ``t`` (P,) lives in the subset's coordinates; parameters outside the subset are held fixed.
    Differentiable in ``t``. Run it with the model in eval mode (as the curvature is fitted).
    """
    params = {n: p.detach() for n, p in subset.parameters(model).items()}

    def tangents() -> dict[str, Tensor]:
        flat = t
        if subset.index is not None:
            full = torch.zeros(sum(p.numel() for p in params.values()), dtype=t.dtype,
                               device=t.device)
            flat = full.index_put((subset.index,), t)
        out, start = {}, 0
        for name, p in params.items():
            out[name] = flat[start : start + p.numel()].reshape(p.shape).to(p.dtype)
            start += p.numel()
        return out

    def h(x: Inputs) -> Tensor:
        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, p, model_args(x))

        with no_fused_attention():  # fused attention kernels have no forward mode
            return jvp(f, (params,), (tangents(),))[1]

    return h

"""What every pass over the data shares: eval mode, the accumulation dtype, device-ready batches."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def eval_mode(model: nn.Module, requires_grad: Collection[str] = ()) -> Iterator[None]:
    """Eval mode, gradients only for the named parameters; both restored exactly afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    chosen = set(requires_grad)
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """At least float32 for curvature sums; float64 if the model is float64."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def batches(loader: Iterable, model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) moved to the model's device (floating x cast to its dtype), checking x."""
    param = next(model.parameters())
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("the data loader must yield (x, y) pairs")
        x, y = batch
        x = x.to(param.device, param.dtype if x.is_floating_point() else None)
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"inputs contain {int((~torch.isfinite(x)).sum())} NaN/inf values")
        yield x, y.to(param.device)


class Replay:
    """Re-iterable view of a loader as device-ready (x, y) batches."""

    def __init__(self, loader: Iterable, model: nn.Module):
        self.loader, self.model = loader, model

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(self.loader, self.model)

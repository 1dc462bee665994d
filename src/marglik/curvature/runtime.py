"""What every pass over the data shares: eval mode with the model left exactly as it was, the
accumulation dtype, device-ready batches.

Batches live in :mod:`marglik.curvature.batches`; ``batches`` and ``Replay`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from marglik.curvature.batches import Replay, batches

__all__ = ["Replay", "accumulation_dtype", "batches", "eval_mode", "no_fused_attention",
           "preserved"]


#: hook dictionaries of an ``nn.Module`` that a forward or backward pass runs
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)

#: ids of the models whose buffers an enclosing :func:`preserved` already saved
_SAVED_BUFFERS: set[int] = set()


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Leave ``model`` exactly as it was: restore on exit what passes inside may change.

    Restored: the ``training`` flag of every submodule, ``requires_grad`` of every parameter,
    every buffer's value (BatchNorm running statistics, ``num_batches_tracked``; copied back in
    place, so the buffer tensors keep their identity, and only where they changed, so graphs that
    saved them stay valid) and the hook dictionaries (hooks added inside and left behind are
    removed; the user's hooks stay). Buffers are cloned once: a nested :func:`preserved` on the
    same model (e.g. per batch inside a fit) only saves the flags.
    """
    modes = {m: m.training for m in model.modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {
        (m, attr): set(getattr(m, attr).keys())
        for m in model.modules()
        for attr in _HOOK_DICTS
        if hasattr(m, attr)
    }
    key = id(model)
    outer = key not in _SAVED_BUFFERS
    saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    if outer:
        with torch.no_grad():
            saved = [
                (m, name, b, b.detach().clone())
                for m in model.modules()
                for name, b in m._buffers.items()
                if b is not None
            ]
        _SAVED_BUFFERS.add(key)
    try:
        yield
    finally:
        if outer:
            _SAVED_BUFFERS.discard(key)
            with torch.no_grad():
                for m, name, tensor, value in saved:
                    if m._buffers.get(name) is not tensor:  # reassigned: put the original back
                        m._buffers[name] = tensor
                    if tensor.shape != value.shape:
                        tensor.set_(value)
                    elif not torch.equal(tensor, value):
                        tensor.copy_(value)
        for m, training in modes.items():
            m.training = training
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        for (m, attr), keys in hooks.items():
            d = getattr(m, attr)
            for k in [k for k in d if k not in keys]:
                del d[k]


@contextmanager
def eval_mode(model: nn.Module, requires_grad: Collection[str] | None = ()) -> Iterator[None]:
    """Eval mode, gradients only for the named parameters (``None``: flags left as they are),
    inside :func:`preserved`: modes, ``requires_grad`` flags, buffers and hooks are restored
    exactly afterwards; fused attention kernels off (:func:`no_fused_attention`), so that every
    pass of the library can use forward mode and ``vmap``."""
    with preserved(model), no_fused_attention():
        model.eval()
        if requires_grad is not None:
            chosen = set(requires_grad)
            for n, p in model.named_parameters():
                p.requires_grad_(n in chosen)
        yield


@contextmanager
def no_fused_attention() -> Iterator[None]:
    """torch's fused attention kernels off: the ``torch.backends.mha`` fast path of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode and the flash /
    memory-efficient kernels of ``F.scaled_dot_product_attention`` (only its math kernel). The
    fused kernels have no forward-mode derivative (``torch.func.jvp`` raises
    ``NotImplementedError``) and the fast path bypasses forward hooks; the math path computes
    the same function."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _math_attention():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _math_attention():
    """``sdpa_kernel(MATH)`` where torch has it (≥ 2.3), else nothing to switch."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """At least float32 for curvature sums; float64 if the model is float64."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32

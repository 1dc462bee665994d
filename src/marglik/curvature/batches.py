"""What a batch is: the one place that splits batches into (x, y) and handles structured inputs.

Convention (laplace-torch ≥ 0.2 for dict batches), used by the curvature engine, the
predictives, :func:`~marglik.training.train_map`, :func:`~marglik.training.marglik_training` and
:func:`~marglik.training.select_architecture`:

- a batch is either an ``(x, y)`` pair (tuple or list of length 2) or a *mapping*
  (``dict``, ``collections.UserDict``, a Hugging Face ``BatchEncoding``, any
  ``collections.abc.Mapping``). A mapping batch is the model input as a whole (nothing is
  removed, so the model also sees the target) and its target is ``batch[dict_key_y]``;
- the inputs x are a tensor (B, ...), a mapping of such tensors (nested mappings, tuples and
  lists inside are allowed) or a tuple / list of them. The model is called as ``model(x)`` for a
  tensor or a mapping and as ``model(*x)`` for a tuple or list (positional inputs);
- every tensor with at least one dimension in x shares the leading batch dimension B, which is
  ``x[dict_key_x].shape[0]`` for a mapping holding ``dict_key_x`` (laplace-torch's rule), and
  the common leading dimension otherwise; 0-d tensors and non-tensor leaves are passed along
  unchanged and never sliced;
- inputs are moved to the model's device; floating tensors are cast to its dtype, other tensors
  (token ids, masks, labels) only moved. Mappings are rebuilt as plain ``dict`` (so that
  ``torch.func.vmap`` and ``functional_call`` see a pytree they know).
"""

from __future__ import annotations

import math
from collections import UserDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

#: A model input: a tensor, a mapping of inputs, or a tuple / list of inputs (see module doc).
Inputs = Tensor | Mapping[str, Any] | tuple | list

#: laplace-torch's defaults for mapping batches.
DICT_KEY_X = "input_ids"
DICT_KEY_Y = "labels"

__all__ = [
    "DICT_KEY_X",
    "DICT_KEY_Y",
    "Inputs",
    "Replay",
    "batch_size",
    "batches",
    "call_model",
    "check_finite",
    "detach",
    "is_mapping",
    "model_args",
    "slice_inputs",
    "split_batch",
    "to_model",
    "tree_map",
]


def is_mapping(obj: Any) -> bool:
    """True for a dict, a ``UserDict`` (e.g. ``BatchEncoding``) or any ``Mapping``."""
    return isinstance(obj, (Mapping, UserDict))


def tree_map(fn: Callable[[Tensor], Any], x: Any) -> Any:
    """Apply ``fn`` to every tensor in x; mappings become plain dicts, tuples/lists keep type."""
    if isinstance(x, Tensor):
        return fn(x)
    if is_mapping(x):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(tree_map(fn, v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    return x


def _leaves(x: Any, path: str = "x") -> Iterator[tuple[str, Tensor]]:
    """(path, tensor) for every tensor in x, e.g. ``("x['input_ids']", t)``."""
    if isinstance(x, Tensor):
        yield path, x
    elif is_mapping(x):
        for k, v in x.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")


def _check_kind(x: Any) -> None:
    if not (isinstance(x, (Tensor, tuple, list)) or is_mapping(x)):
        raise ValueError(
            "inputs must be a tensor (B, ...), a dict of tensors or a tuple of tensors, got "
            f"{type(x).__name__}"
        )


def split_batch(
    batch: Any, dict_key_x: str = DICT_KEY_X, dict_key_y: str = DICT_KEY_Y
) -> tuple[Inputs, Tensor]:
    """(x, y) of one batch: an ``(x, y)`` pair, or a mapping (x = the whole mapping, y =
    ``batch[dict_key_y]``). Nothing is moved or copied.

    Raises:
        ValueError: a mapping without ``dict_key_y`` (naming the keys it has), or a batch that is
            neither a pair nor a mapping.
    """
    if is_mapping(batch):
        if dict_key_y not in batch:
            raise ValueError(
                f"a dict batch must hold the targets under dict_key_y={dict_key_y!r}; it has "
                f"the keys {list(batch.keys())} (set dict_key_y to the target key)"
            )
        return batch, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "the data loader must yield (x, y) pairs or dicts holding the inputs and the targets "
        f"(under dict_key_y={dict_key_y!r}), got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def batch_size(x: Inputs, dict_key_x: str = DICT_KEY_X) -> int:
    """The batch size B of inputs x, checking that all their tensors share it.

    For a mapping holding ``dict_key_x``, B = ``x[dict_key_x].shape[0]``; otherwise B is the
    leading dimension of the tensors (0-d tensors are ignored).

    Raises:
        ValueError: no tensor with a batch dimension, or tensors with different batch sizes.
    """
    _check_kind(x)
    sizes = {path: t.shape[0] for path, t in _leaves(x) if t.ndim > 0}
    if is_mapping(x) and dict_key_x in x:
        key = x[dict_key_x]
        if not isinstance(key, Tensor) or key.ndim == 0:
            raise ValueError(
                f"inputs[{dict_key_x!r}] (dict_key_x) must be a tensor with a batch dimension, "
                f"got {type(key).__name__ if not isinstance(key, Tensor) else 'a 0-d tensor'}"
            )
        B = key.shape[0]
    elif sizes:
        B = next(iter(sizes.values()))
    else:
        raise ValueError("the inputs hold no tensor with a leading batch dimension")
    wrong = {path: n for path, n in sizes.items() if n != B}
    if wrong:
        raise ValueError(
            f"all input tensors must share the batch size {B}, but "
            + ", ".join(f"{p} has {n}" for p, n in wrong.items())
        )
    return int(B)


def to_model(x: Inputs, model: nn.Module) -> Inputs:
    """x on the model's device: floating tensors cast to its dtype, other tensors only moved."""
    _check_kind(x)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    return tree_map(lambda t: t.to(device, dtype if t.is_floating_point() else None), x)


def all_finite(t: Tensor) -> bool:
    """Whether every entry of the floating tensor t is finite (no NaN, no ±inf).

    A finite sum implies it (a NaN or ±inf entry makes the sum NaN or ±inf), and one reduction
    is cheap where ``torch.isfinite`` writes a mask first (about 20× slower on a CPU: 210 µs
    against 8.5 µs for a 256 × 256 float32 factor, one thread). Only where the sum is not finite (a
    non-finite entry, or finite entries whose sum overflows) are the entries checked one by one.
    """
    t = t.detach()
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def check_finite(x: Inputs) -> None:
    """Raise ``ValueError`` if a floating tensor in x holds NaN or inf values."""
    bad = [(p, int((~torch.isfinite(t)).sum())) for p, t in _leaves(x)
           if t.is_floating_point() and not all_finite(t)]
    bad = [(p, n) for p, n in bad if n]
    if not bad:
        return
    if isinstance(x, Tensor):
        raise ValueError(f"inputs contain {bad[0][1]} NaN/inf values")
    raise ValueError(
        f"inputs contain {sum(n for _, n in bad)} NaN/inf values ("
        + ", ".join(f"{n} in {p}" for p, n in bad) + ")"
    )


def detach(x: Inputs) -> Inputs:
    """x with every tensor detached."""
    return tree_map(Tensor.detach, x)


def slice_inputs(x: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of x: every tensor with a batch dimension sliced along it."""
    return tree_map(lambda t: t[start:stop] if t.ndim > 0 else t, x)


def model_args(x: Inputs) -> tuple:
    """Positional arguments of the model call: ``tuple(x)`` for a tuple / list, else ``(x,)``."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def call_model(model: Callable, x: Inputs) -> Any:
    """``model(*x)`` for a tuple / list of inputs, ``model(x)`` for a tensor or a mapping."""
    return model(*model_args(x))


def batches(
    loader: Iterable,
    model: nn.Module,
    dict_key_x: str = DICT_KEY_X,
    dict_key_y: str = DICT_KEY_Y,
) -> Iterator[tuple[Inputs, Tensor]]:
    """Yield (x, y) moved to the model's device (see :func:`to_model`), checking x.

    Raises:
        ValueError: a malformed batch (:func:`split_batch`), inputs with different batch
            sizes (:func:`batch_size`) or NaN/inf inputs.
    """
    param = next(model.parameters())
    for batch in loader:
        x, y = split_batch(batch, dict_key_x, dict_key_y)
        x = to_model(x, model)
        batch_size(x, dict_key_x)
        check_finite(x)
        yield x, y.to(param.device)


class Replay:
    """Re-iterable view of a loader as device-ready (x, y) batches."""

    def __init__(
        self,
        loader: Iterable,
        model: nn.Module,
        dict_key_x: str = DICT_KEY_X,
        dict_key_y: str = DICT_KEY_Y,
    ):
        self.loader, self.model = loader, model
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        return batches(self.loader, self.model, self.dict_key_x, self.dict_key_y)

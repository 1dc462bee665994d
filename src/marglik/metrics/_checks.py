"""Input checks shared by the metrics: tensors, probabilities, class targets, shapes.

Each check converts its input with :func:`torch.as_tensor` and raises :class:`ValueError` with a
message that says what is wrong (shape mismatches, NaNs, probabilities that do not sum to one,
non-positive variances).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Tolerance on ``|sum_c p_c - 1|`` for every row of ``probs``.
PROB_SUM_TOL = 1e-3


def _as_tensor(x, name: str) -> Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} could not be converted to a tensor: {e}") from e
    return t


def _check_no_nan(t: Tensor, name: str) -> None:
    if t.is_floating_point() or t.is_complex():
        n_nan = int(torch.isnan(t).sum())
        if n_nan:
            raise ValueError(f"{name} contains {n_nan} NaN value(s)")


def _check_probs(probs, name: str = "probs") -> Tensor:
    p = _as_tensor(probs, name)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got shape {tuple(p.shape)}")
    if p.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if p.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        p = p.to(torch.get_default_dtype())
    _check_no_nan(p, name)
    if bool((p < -PROB_SUM_TOL).any()) or bool((p > 1 + PROB_SUM_TOL).any()):
        raise ValueError(
            f"{name} must lie in [0, 1]; got values in [{float(p.min()):.4g}, {float(p.max()):.4g}]"
            " (pass probabilities, not logits)"
        )
    sums = p.sum(dim=1)
    dev = (sums - 1).abs()
    bad = dev > PROB_SUM_TOL
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} rows must sum to 1 (within {PROB_SUM_TOL:g}); {int(bad.sum())} row(s) do not, "
            f"e.g. row {i} sums to {float(sums[i]):.6g} (pass probabilities, not logits)"
        )
    return p


def _check_targets(y, n: int, n_classes: int, name: str = "y") -> Tensor:
    t = _as_tensor(y, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but probs has {n} rows")
    if t.is_floating_point():
        _check_no_nan(t, name)
        if not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes - 1}] for {n_classes} classes; "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _check_classification(probs, y) -> tuple[Tensor, Tensor]:
    p = _check_probs(probs)
    t = _check_targets(y, p.shape[0], p.shape[1])
    return p, t


def _check_scores(s, name: str) -> Tensor:
    t = _as_tensor(s, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not t.is_floating_point():
        t = t.double()
    _check_no_nan(t, name)
    return t


def _align(a: Tensor, shape: torch.Size, name: str, ref: str) -> Tensor:
    """Reshape ``(N,)`` <-> ``(N, 1)`` to ``shape``; otherwise shapes must match exactly."""
    if a.shape == shape:
        return a
    if a.numel() == math.prod(shape) and a.ndim in (1, 2) and len(shape) in (1, 2):
        squeezed_a = a.shape if a.ndim == 1 else (a.shape[0],) if a.shape[1] == 1 else None
        squeezed_s = shape if len(shape) == 1 else (shape[0],) if shape[1] == 1 else None
        if squeezed_a is not None and squeezed_a == squeezed_s:
            return a.reshape(shape)
    raise ValueError(f"{name} has shape {tuple(a.shape)} but {ref} has shape {tuple(shape)}")


def _check_regression(mean, var, y) -> tuple[Tensor, Tensor, Tensor]:
    m = _as_tensor(mean, "mean")
    if m.ndim not in (1, 2):
        raise ValueError(f"mean must have shape (N,) or (N, C), got shape {tuple(m.shape)}")
    if m.numel() == 0:
        raise ValueError("mean is empty")
    if not m.is_floating_point():
        m = m.to(torch.get_default_dtype())
    t = _align(_as_tensor(y, "y"), m.shape, "y", "mean").to(m.dtype)
    _check_no_nan(m, "mean")
    _check_no_nan(t, "y")
    v = None
    if var is not None:
        v = _align(_as_tensor(var, "var"), m.shape, "var", "mean").to(m.dtype)
        _check_no_nan(v, "var")
        n_bad = int((v <= 0).sum())
        if n_bad:
            raise ValueError(
                f"var must be strictly positive; {n_bad} value(s) are <= 0 "
                f"(min {float(v.min()):.4g}); pass variances, including the observation noise"
            )
    return m, v, t  # type: ignore[return-value]

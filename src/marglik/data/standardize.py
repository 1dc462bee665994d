"""The library's one standardiser: ``(x − mean) / std`` per column, statistics from training data.

:class:`Standardizer` holds per-column means and standard deviations as plain tensors (fit,
transform, inverse, ``state_dict`` for :func:`torch.save` / ``torch.load(..., weights_only=True)``).
:func:`standardize` is its one-call form, "standardise by its own statistics"; it also takes numpy
arrays, which it standardises with numpy (numpy in, numpy out, numpy's own mean and std), so numpy
callers get exactly the numbers of ``(v - v.mean(0)) / v.std(0)``.

Conventions, shared by both: statistics over dimension 0 (rows), so ``X`` of shape ``(N, D)``
gives ``(D,)`` statistics and ``(N,)`` gives 0-dim ones; the population standard deviation
(``correction=0``) unless ``correction`` says otherwise (``1``: Bessel's correction); columns with
zero standard deviation get ``std = 1`` so that they are only centred.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["Standardizer", "column_stats", "standardize"]

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)


def column_stats(X: ArrayOrTensor, correction: int = 0) -> tuple[ArrayOrTensor, ArrayOrTensor]:
    """Per-column ``(mean, std)`` of ``X`` (``(N, D)`` or ``(N,)``), zero stds replaced by 1.

    Works on a floating tensor or numpy array and returns the same kind; ``correction`` is the
    difference ``N − (divisor of the variance)``: 0 for the population std, 1 for Bessel's.

    Raises:
        ValueError: if ``X`` is not 1-D or 2-D with at least one row, or contains NaN.
    """
    if X.ndim not in (1, 2) or X.shape[0] == 0:
        raise ValueError(f"X must have shape (N,) or (N, D) with N > 0, got {tuple(X.shape)}")
    if isinstance(X, np.ndarray):
        if np.isnan(X).any():
            raise ValueError("X contains NaN values")
        mean, std = X.mean(axis=0), X.std(axis=0, ddof=correction)
        return mean, np.where(std > 0, std, np.ones_like(std))
    if bool(torch.isnan(X).any()):
        raise ValueError("X contains NaN values")
    mean, std = X.mean(dim=0), X.std(dim=0, correction=correction)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def standardize(X: ArrayOrTensor, correction: int = 0) -> ArrayOrTensor:
    """``X`` standardised by its own column statistics (see :func:`column_stats`), same shape.

    A tensor goes through ``Standardizer(correction=correction).fit_transform``; a numpy array is
    standardised with numpy (integer arrays as float64) and comes back as a numpy array.
    """
    if isinstance(X, np.ndarray):
        if not np.issubdtype(X.dtype, np.floating):
            X = X.astype(np.float64)
        mean, std = column_stats(X, correction)
        return (X - mean) / std
    return Standardizer(correction=correction).fit_transform(X)


class Standardizer:
    """Per-column standardisation ``(x - mean) / std`` with statistics from training data.

    Statistics are over dimension 0 (rows) with the population standard deviation
    (``correction=0``, the default; pass ``correction=1`` for Bessel's correction); columns with
    zero standard deviation get ``std = 1`` so that they are only centred.

    Example:
        >>> s = Standardizer().fit(X_train)
        >>> Xs = s.transform(X_test)
        >>> torch.save(s.state_dict(), "scaler.pt")
        >>> s2 = Standardizer.from_state_dict(torch.load("scaler.pt", weights_only=True))
    """

    def __init__(
        self, mean: Tensor | None = None, std: Tensor | None = None, *, correction: int = 0
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        self.mean = mean
        self.std = std
        self.correction = correction

    @property
    def fitted(self) -> bool:
        """Whether statistics are set."""
        return self.mean is not None

    def fit(self, X: Tensor) -> Standardizer:
        """Compute per-column mean and std from ``X`` (shape ``(N, D)`` or ``(N,)``).

        Returns:
            ``self``.
        """
        X = torch.as_tensor(X)
        if X.ndim not in (1, 2) or X.shape[0] == 0:
            raise ValueError(f"X must have shape (N,) or (N, D) with N > 0, got {tuple(X.shape)}")
        if not X.is_floating_point():
            X = X.to(torch.get_default_dtype())
        mean, std = column_stats(X, self.correction)
        self.mean, self.std = mean.detach().clone(), std.detach().clone()
        return self

    def _check(self, X: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError("Standardizer is not fitted; call fit() first")
        X = torch.as_tensor(X)
        if X.shape[1:] != self.mean.shape:
            raise ValueError(
                f"X has shape {tuple(X.shape)}; expected (N, *{tuple(self.mean.shape)})"
            )
        return X

    def transform(self, X: Tensor) -> Tensor:
        """Return ``(X - mean) / std``."""
        X = self._check(X)
        return (X - self.mean.to(X)) / self.std.to(X)

    def fit_transform(self, X: Tensor) -> Tensor:
        """Fit on ``X`` and return it transformed."""
        return self.fit(X).transform(X)

    def inverse_transform(self, X: Tensor) -> Tensor:
        """Return ``X * std + mean`` (undo :meth:`transform`)."""
        X = self._check(X)
        return X * self.std.to(X) + self.mean.to(X)

    def inverse_transform_std(self, std: Tensor) -> Tensor:
        """Scale standard deviations in standardised units back to original units."""
        std = self._check(std)
        return std * self.std.to(std)

    def state_dict(self) -> dict[str, Tensor]:
        """Statistics as plain tensors, ``{"mean": ..., "std": ...}``."""
        if self.mean is None or self.std is None:
            raise RuntimeError("Standardizer is not fitted; call fit() first")
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> Standardizer:
        """Rebuild a fitted Standardizer from :meth:`state_dict` output."""
        missing = {"mean", "std"} - set(state)
        if missing:
            raise ValueError(f"state is missing key(s) {sorted(missing)}")
        mean, std = torch.as_tensor(state["mean"]), torch.as_tensor(state["std"])
        if mean.shape != std.shape:
            raise ValueError(f"mean shape {tuple(mean.shape)} != std shape {tuple(std.shape)}")
        return cls(mean.clone(), std.clone())

    def __repr__(self) -> str:
        if self.mean is None:
            return "Standardizer(unfitted)"
        return f"Standardizer(n_features={tuple(self.mean.shape)})"

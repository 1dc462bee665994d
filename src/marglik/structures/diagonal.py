"""Diagonal curvature block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from marglik.structures.base import CurvatureBlock, check_eps, check_rows, check_scale

__all__ = ["Diagonal"]


class Diagonal(CurvatureBlock):
    """Diagonal curvature ``H = diag(h)`` (diagonal GGN / Fisher, or layers KFAC cannot express).

    The posterior precision ``P = scale · diag(h) + diag(delta)`` is diagonal, so every operation is
    elementwise in ``d = scale · h + delta``: ``log det P = Σ log d``, ``J P⁻¹ Jᵀ = (J / d) Jᵀ``.

    Args:
        h: ``(p,)`` non-negative curvature diagonal.
    """

    def __init__(self, h: Tensor) -> None:
        if not isinstance(h, Tensor) or h.dim() != 1 or not h.is_floating_point():
            shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h must be a floating 1-d tensor of shape (p,), got {shape}")
        if not bool(torch.all(h >= 0)):
            raise ValueError(
                f"diagonal curvature h must be non-negative, got minimum {float(h.detach().min())}"
            )
        self.h = h

    @property
    def size(self) -> int:
        return self.h.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype

    @property
    def device(self) -> torch.device:
        return self.h.device

    def _precision_diag(self, scale: Tensor, delta: Tensor) -> Tensor:
        return check_scale(scale) * self.h + self._prepare_delta(delta)

    # ------------------------------------------------------------------ posterior operations
    def logdet(self, scale: Tensor, delta: Tensor) -> Tensor:
        return torch.log(self._precision_diag(scale, delta)).sum()

    def inv_quad(self, J: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_rows(J, self.size)
        d = self._precision_diag(scale, delta)
        return (J / d) @ J.mT

    def solve(self, v: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        self._check_rows(v, "v")
        return v / self._precision_diag(scale, delta)

    def sample(self, eps: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        check_eps(eps, self.size)
        return eps * self._precision_diag(scale, delta).rsqrt()

    def covariance_diag(self, scale: Tensor, delta: Tensor) -> Tensor:
        return self._precision_diag(scale, delta).reciprocal()

    # ------------------------------------------------------------------ curvature only
    def matvec(self, v: Tensor) -> Tensor:
        self._check_rows(v, "v")
        return v * self.h

    def diag(self) -> Tensor:
        return self.h.clone()

    def to_dense(self) -> Tensor:
        return torch.diag(self.h)

    def covariance_dense(self, scale: Tensor, delta: Tensor) -> Tensor:
        return torch.diag(self.covariance_diag(scale, delta))

    # ------------------------------------------------------------------ serialisation, devices
    def state_dict(self) -> dict[str, Tensor]:
        return self._state(h=self.h.detach().clone())

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> Diagonal:
        cls._check_kind(sd)
        return cls(sd["h"])

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> Diagonal:
        return Diagonal(fn(self.h))

"""The Gaussian weight prior p(θ) = N(μ0, P0⁻¹) with P0 = diag(δ) in one of three shapes.

The prior precision δ is a tensor of one of three shapes (MacKay 1992; Immer et al., ICML 2021):

- scalar, 0-d: one δ for all P parameters;
- per group, (G,): one δ per *group* of parameter tensors — by default each tensor is its own group
  ("layer-wise"), or any user-given grouping (all tensors of one subnetwork, one path of a layer);
- per parameter, (P,): one δ per entry ("diagonal").

:class:`Prior` is the one place that interprets these shapes: the expansion to P values, the
log-determinant log det P0 = Σ_p log δ_p, the scatter (θ − μ0)ᵀ P0 (θ − μ0), the log density,
one δ per block of a block-diagonal curvature, and the shapes a hyperparameter search starts from.
Every method takes an optional ``precision`` that overrides the stored one, so the evidence stays
differentiable in δ (the stored value is never needed to be a leaf).

A prior is *bound* to a parameter layout (:meth:`Prior.bind`): the names and sizes of the
posterior's parameter tensors. A per-group δ with as many values as there are groups is read as
per group even when G = P (then both readings agree).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PRIOR_STRUCTURES", "Prior", "as_model_dtype", "check_precision"]

#: Names of the three shapes, as used by ``optimize_prior_precision(prior_structure=...)``.
PRIOR_STRUCTURES = ("scalar", "layerwise", "diagonal")


#: The tensor last found valid, its version counter and whether zeros were allowed: one
#: evidence evaluation passes the same δ through several checks, and each check costs reductions.
_last_valid: tuple[weakref.ref, int, bool] | None = None


def check_precision(value: float | Tensor, allow_zero: bool = False) -> Tensor:
    """δ as a tensor, 0-d or 1-d, finite and positive (non-negative with ``allow_zero``).

    A tensor checked just before (the same object, not modified in place since) is not checked
    again.
    """
    global _last_valid
    if torch.is_tensor(value) and _last_valid is not None:
        ref, version, zero_ok = _last_valid
        if ref() is value and value._version == version and (allow_zero or not zero_ok):
            return value
    # a Python number: float64, exact; cast to the curvature's dtype where it is used
    try:
        value = torch.as_tensor(value, dtype=None if torch.is_tensor(value) else torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"prior_precision must be a number, a sequence of numbers or a tensor, "
                        f"got {type(value).__name__}: {value!r}") from err
    if value.ndim > 1 or value.numel() == 0:
        raise ValueError(
            f"prior_precision must be a scalar or a vector, got shape {tuple(value.shape)}"
        )
    bad = (value < 0).any() if allow_zero else (value <= 0).any()
    if not torch.isfinite(value).all() or bad:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"prior_precision must be {kind} and finite")
    _last_valid = (weakref.ref(value), value._version, allow_zero)
    return value


def as_model_dtype(value: Any, model: nn.Module) -> Any:
    """Python numbers (or a list / array of them) as a tensor of the model's floating dtype
    (tensors and anything else unchanged, for the checks to judge), so that a float64 model
    keeps σ = 0.7 or δ = 0.3 to rounding whatever torch's default dtype is
    (``torch.as_tensor(0.3)`` would round it to float32)."""
    if torch.is_tensor(value) or isinstance(value, (bool, str)) or value is None:
        return value
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        return value


class Prior:
    """Gaussian prior N(μ0, diag(δ)⁻¹) over the posterior's parameter vector θ (P,).

    Args:
        precision: δ > 0: a scalar, one value per group, or one per parameter.
        mean: μ0: a scalar or one value per parameter.
        groups: parameter-tensor names per group, e.g. ``[["0.weight", "0.bias"], ["2.weight"]]``;
            every tensor of the layout in exactly one group. Default: one group per tensor.
        allow_zero: accept δ = 0 (an improper flat prior; for MAP training, not for Laplace).

    Example:
        >>> prior = Prior(torch.tensor([1.0, 10.0]), groups=[["0.weight", "0.bias"], ["2.weight"]])
        >>> prior.bind(["0.weight", "0.bias", "2.weight"], [6, 2, 2]).expand().shape
        torch.Size([10])
    """

    def __init__(
        self,
        precision: float | Tensor = 1.0,
        mean: float | Tensor = 0.0,
        groups: Sequence[Sequence[str]] | None = None,
        allow_zero: bool = False,
    ):
        self.allow_zero = allow_zero
        self._precision = check_precision(precision, allow_zero)
        self._mean = torch.as_tensor(mean)
        if self._mean.ndim > 1:
            raise ValueError(
                f"prior_mean must be a scalar or a vector, got {tuple(self._mean.shape)}"
            )
        self.groups = None if groups is None else [list(g) for g in groups]
        self.names: list[str] | None = None
        self.numel: list[int] = []
        self._group_of_tensor: list[int] = []

    # ---- layout ---------------------------------------------------------------------------------
    def bind(self, names: Sequence[str], numel: Sequence[int]) -> Prior:
        """Attach the layout: parameter-tensor ``names`` and their sizes ``numel`` (entries in θ).

        Checks that the groups partition the tensors and that δ and μ0 have a valid shape.
        """
        names, numel = list(names), [int(n) for n in numel]
        if self.groups is None:
            group_of = list(range(len(names)))
        else:
            index = {}
            for g, members in enumerate(self.groups):
                for name in members:
                    if name in index:
                        raise ValueError(f"parameter {name!r} is in two prior groups")
                    index[name] = g
            unknown = sorted(set(index) - set(names))
            missing = [n for n in names if n not in index]
            if unknown or missing:
                raise ValueError(
                    "prior groups must cover each posterior parameter tensor once: "
                    + (f"not in the posterior {unknown}; " if unknown else "")
                    + (f"in no group {missing}" if missing else "")
                )
            if any(not members for members in self.groups):
                raise ValueError("prior groups must not be empty")
            group_of = [index[n] for n in names]
        self.names, self.numel, self._group_of_tensor = names, numel, group_of
        self._precision = self._single(self._precision)
        self._check(self._precision)
        if self._mean.numel() not in (1, self.size):
            raise ValueError(f"prior_mean must be a scalar or have {self.size} values")
        return self

    @property
    def bound(self) -> bool:
        return self.names is not None

    @property
    def size(self) -> int:
        """P, the number of parameters the prior covers."""
        return sum(self.numel)

    @property
    def n_groups(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.numel)

    @property
    def numel_per_group(self) -> list[int]:
        counts = [0] * self.n_groups
        for g, n in zip(self._group_of_tensor, self.numel):
            counts[g] += n
        return counts

    def _require_bound(self) -> None:
        if not self.bound:
            raise RuntimeError("the prior has no parameter layout yet: the posterior binds it")

    # ---- values ---------------------------------------------------------------------------------
    @property
    def precision(self) -> Tensor:
        """δ as given: 0-d, (G,) or (P,)."""
        return self._precision

    @precision.setter
    def precision(self, value: float | Tensor) -> None:
        value = check_precision(value, self.allow_zero)
        if self.bound:
            value = self._single(value)
            self._check(value)
        self._precision = value

    @property
    def mean(self) -> Tensor:
        """μ0: 0-d or (P,)."""
        return self._mean

    @mean.setter
    def mean(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value)
        if value.ndim > 1 or (self.bound and value.numel() not in (1, self.size)):
            raise ValueError(f"prior_mean must be a scalar or have {self.size} values")
        self._mean = value

    def _single(self, delta: Tensor) -> Tensor:
        """A one-element δ of shape (1,) as the scalar it means (laplace-torch's convention).

        Kept as (1,) where the layout has one group or one parameter (both readings agree).
        """
        if delta.ndim == 1 and delta.numel() == 1 and 1 not in (self.n_groups, self.size):
            return delta.reshape(())
        return delta

    def _check(self, delta: Tensor) -> None:
        if delta.ndim == 1 and delta.numel() not in (self.n_groups, self.size):
            raise ValueError(
                f"prior_precision has {delta.numel()} values: give a scalar, {self.n_groups} "
                f"(one per {'group' if self.groups is not None else 'parameter tensor'}) or "
                f"{self.size} (one per parameter)"
            )

    def _resolve(self, precision: Tensor | None) -> Tensor:
        if precision is None:
            delta = self._precision
        else:
            delta = check_precision(precision, self.allow_zero)
        if self.bound:
            delta = self._single(delta)
        self._check(delta)
        return delta

    def kind(self, precision: Tensor | None = None) -> str:
        """``"scalar" | "group" | "parameter"`` for δ (the stored one by default)."""
        self._require_bound()
        delta = self._resolve(precision)
        if delta.ndim == 0:
            return "scalar"
        if delta.numel() == self.n_groups and (self.groups is not None or
                                               self.n_groups != self.size):
            return "group"  # user groups: δ in their order, even when each holds one entry
        return "parameter"

    def _group_index(self, device: torch.device) -> Tensor:
        """Group of every parameter, (P,)."""
        groups = torch.tensor(self._group_of_tensor, device=device)
        return groups.repeat_interleave(torch.tensor(self.numel, device=device))

    def expand(self, precision: Tensor | None = None) -> Tensor:
        """δ as 0-d (scalar) or per parameter (P,)."""
        delta = self._resolve(precision)
        if self.kind(delta) != "group":
            return delta
        if self.groups is None:  # one group per tensor
            return delta.repeat_interleave(torch.tensor(self.numel, device=delta.device))
        return delta[self._group_index(delta.device)]

    def per_tensor(self, precision: Tensor | None = None) -> list[Tensor]:
        """δ for each parameter tensor: 0-d where one value covers it, else (numel,)."""
        delta = self._resolve(precision)
        kind = self.kind(delta)
        if kind == "scalar":
            return [delta] * len(self.numel)
        if kind == "group":
            return [delta[g] for g in self._group_of_tensor]
        return list(delta.split(self.numel))

    def per_block(self, offsets: Sequence[int], precision: Tensor | None = None) -> list[Tensor]:
        """One δ per block [offsets[i], offsets[i+1]) of a block-diagonal precision.

        0-d where the block lies inside one group (so a Kronecker block keeps its eigenvalue
        form), else the block's slice of the per-parameter δ.
        """
        delta = self._resolve(precision)
        if self.kind(delta) != "group":
            return [delta if delta.ndim == 0 else delta[a:b] for a, b in zip(offsets, offsets[1:])]
        bounds = [0]
        for n in self.numel:
            bounds.append(bounds[-1] + n)
        expanded = None
        out = []
        for start, stop in zip(offsets[:-1], offsets[1:]):
            first = next(i for i in range(len(self.numel)) if bounds[i] <= start < bounds[i + 1])
            last = first
            while bounds[last + 1] < stop:
                last += 1
            groups = set(self._group_of_tensor[first : last + 1])
            if len(groups) == 1:
                out.append(delta[groups.pop()])
            else:  # the block spans several groups (e.g. a full H): per-parameter values
                if expanded is None:
                    expanded = self.expand(delta)
                out.append(expanded[start:stop])
        return out

    # ---- densities ------------------------------------------------------------------------------
    def log_det(self, precision: Tensor | None = None) -> Tensor:
        """log det P0 = Σ_p log δ_p (0-d)."""
        delta = self._resolve(precision)
        if self.kind(delta) == "group":
            counts = torch.tensor(self.numel_per_group, device=delta.device)
            return (counts * delta.log()).sum()
        return delta.log().sum() if delta.ndim else self.size * delta.log()

    def scatter(self, theta: Tensor, precision: Tensor | None = None) -> Tensor:
        """(θ − μ0)ᵀ P0 (θ − μ0) for θ (P,): 0-d."""
        delta = self._resolve(precision)
        diff = theta - self._mean.to(theta)
        if self.kind(delta) == "group":
            per_tensor = torch.stack([part.sum() for part in diff.square().split(self.numel)])
            if self.groups is None:
                squares = per_tensor
            else:
                index = torch.tensor(self._group_of_tensor, device=per_tensor.device)
                squares = per_tensor.new_zeros(self.n_groups).index_add(0, index, per_tensor)
            return (delta.to(squares) * squares).sum()
        return (self.expand(delta).to(diff) * diff.square()).sum()

    def log_prob(self, theta: Tensor, precision: Tensor | None = None) -> Tensor:
        """log N(θ; μ0, P0⁻¹) for θ (P,): 0-d."""
        return 0.5 * (
            self.log_det(precision).to(theta)
            - self.size * math.log(2 * math.pi)
            - self.scatter(theta, precision)
        )

    # ---- hyperparameter search ------------------------------------------------------------------
    def shape(self, structure: str) -> tuple[int, ...]:
        """Shape of δ for ``"scalar"`` (), ``"layerwise"`` (G,) or ``"diagonal"`` (P,)."""
        self._require_bound()
        shapes = {"scalar": (), "layerwise": (self.n_groups,), "diagonal": (self.size,)}
        if structure not in shapes:
            raise ValueError(
                f"unknown prior_structure {structure!r}: use one of {PRIOR_STRUCTURES}"
            )
        return shapes[structure]

    def initial(self, shape: tuple[int, ...], start: Tensor | None = None) -> Tensor:
        """A starting δ of ``shape`` from ``start`` (default: the stored δ).

        A single value is broadcast, a finer δ gives its geometric mean for a scalar, and a
        per-group δ is expanded for a per-parameter one.
        """
        start = (self._precision if start is None else check_precision(start)).detach()
        if tuple(start.shape) == shape:
            return start
        if start.numel() == 1:
            return start.reshape(()).expand(shape)
        if shape == ():
            return start.log().mean().exp()
        if shape == (self.size,):
            return self.expand(start)
        raise ValueError(f"cannot start a prior of shape {shape} from {tuple(start.shape)} values")

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors, lists and strings (``torch.load(weights_only=True)``)."""
        return {"precision": self._precision, "mean": self._mean, "groups": self.groups}

    @classmethod
    def from_state_dict(cls, state: dict) -> Prior:
        return cls(state["precision"], state["mean"], state.get("groups"))

    def __repr__(self) -> str:
        shape = tuple(self._precision.shape)
        groups = "per tensor" if self.groups is None else f"{len(self.groups)} groups"
        return f"Prior(precision shape {shape}, {groups}, bound={self.bound})"

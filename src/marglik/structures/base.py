"""Abstract curvature block and the checks every structure shares.

A *curvature block* holds a positive semi-definite matrix ``H_b`` (``p × p``) for one contiguous
slice of the flattened parameter vector (a layer, a parameter group, or all parameters). The
posterior precision of the block is built on the fly from two hyperparameters,

    P_b = scale · H_b + diag(delta),

where ``scale`` is a 0-d tensor (it carries ``1/T`` and noise rescaling such as ``(σ_fit/σ)²``) and
``delta`` is the prior precision, a 0-d tensor or a ``(p,)`` tensor (Laplace Redux, Daxberger et
al., NeurIPS 2021; Immer et al., ICML 2021). Neither hyperparameter is stored in the block: every
method takes them as arguments, so the log-determinant, solves, quadratic forms and samples are
differentiable in both, and a hyperparameter step reuses the block's cached factorisation.

Serialisation: :meth:`CurvatureBlock.state_dict` returns plain tensors only, among them an ``int64``
0-d tensor ``"kind"`` with the class's type code (see :data:`KIND_CODES`).
:func:`block_from_state_dict` dispatches on it, so a saved block survives ``torch.save`` /
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["CurvatureBlock", "KIND_CODES", "block_from_state_dict"]

#: Type codes stored as ``state_dict()["kind"]``; fixed forever (saved files depend on them).
KIND_CODES: dict[str, int] = {
    "Dense": 1,
    "Diagonal": 2,
    "Kronecker": 3,
    "LowRank": 4,
    "BlockDiagonal": 5,
}

_REGISTRY: dict[int, type[CurvatureBlock]] = {}

BlockT = TypeVar("BlockT", bound="CurvatureBlock")


class CurvatureBlock(ABC):
    """A PSD curvature matrix ``H_b`` (``p × p``) of one contiguous parameter slice.

    Subclasses represent ``H_b`` in a structured form (dense, diagonal, Kronecker, low rank, block
    diagonal) and implement the posterior-precision operations for
    ``P_b = scale · H_b + diag(delta)`` without materialising ``p × p`` matrices where the structure
    allows it.

    Hyperparameter conventions shared by all methods:
        scale: 0-d tensor (or a one-element tensor / Python number), ``scale >= 0``.
        delta: 0-d tensor (shared prior precision) or ``(p,)`` tensor (one per parameter), all
            ``> 0``. A one-element tensor of shape ``(1,)`` counts as a scalar.
    """

    #: Type code written to ``state_dict()["kind"]``.
    kind: ClassVar[int]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = KIND_CODES.get(cls.__name__)
        if code is not None and "kind" not in cls.__dict__:
            cls.kind = code
        if "kind" in cls.__dict__:
            _REGISTRY[cls.kind] = cls

    # ------------------------------------------------------------------ basic properties
    @property
    @abstractmethod
    def size(self) -> int:
        """Number of parameters ``p`` covered by the block."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating dtype of the stored curvature."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the stored curvature."""

    # ------------------------------------------------------------------ posterior operations
    @abstractmethod
    def logdet(self, scale: Tensor, delta: Tensor) -> Tensor:
        """Log-determinant of the posterior precision.

        Args:
            scale: 0-d curvature scale.
            delta: prior precision, 0-d or ``(p,)``.

        Returns:
            0-d tensor ``log det(scale · H + diag(delta))``.
        """

    @abstractmethod
    def inv_quad(self, J: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        """Batched quadratic form ``J P⁻¹ Jᵀ`` (predictive covariances).

        Args:
            J: ``(..., K, p)`` rows to contract (e.g. Jacobians, ``K`` outputs).
            scale: 0-d curvature scale.
            delta: prior precision, 0-d or ``(p,)``.

        Returns:
            ``(..., K, K)`` tensor ``J P⁻¹ Jᵀ``.
        """

    @abstractmethod
    def solve(self, v: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        """Apply the posterior covariance: ``P⁻¹ v``.

        Args:
            v: ``(..., p)`` vectors.
            scale: 0-d curvature scale.
            delta: prior precision, 0-d or ``(p,)``.

        Returns:
            ``(..., p)`` tensor ``P⁻¹ v``.
        """

    @abstractmethod
    def sample(self, eps: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
        """Map standard-normal noise to zero-mean samples with covariance ``P⁻¹``.

        Each row ``ε`` is mapped to ``L ε`` for a square root ``L`` with ``L Lᵀ = P⁻¹``, so the
        output is ``eps @ Lᵀ``; with ``eps = I`` (``n = p``) the result ``X`` satisfies
        ``Xᵀ X = P⁻¹``.

        Args:
            eps: ``(n, p)`` standard-normal draws.
            scale: 0-d curvature scale.
            delta: prior precision, 0-d or ``(p,)``.

        Returns:
            ``(n, p)`` samples (add the posterior mean yourself).
        """

    @abstractmethod
    def covariance_diag(self, scale: Tensor, delta: Tensor) -> Tensor:
        """Diagonal of the posterior covariance ``P⁻¹`` (marginal variances).

        Args:
            scale: 0-d curvature scale.
            delta: prior precision, 0-d or ``(p,)``.

        Returns:
            ``(p,)`` tensor ``diag(P⁻¹)``.
        """

    # ------------------------------------------------------------------ curvature only
    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        """Curvature product ``H v`` (no prior, no scale).

        Args:
            v: ``(..., p)`` vectors.

        Returns:
            ``(..., p)`` tensor ``H v``.
        """

    @abstractmethod
    def diag(self) -> Tensor:
        """Diagonal of ``H`` as a ``(p,)`` tensor."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """``H`` as a dense ``(p, p)`` tensor (tests and small models only)."""

    def precision_dense(self, scale: Tensor, delta: Tensor) -> Tensor:
        """Dense posterior precision ``scale · H + diag(delta)``, shape ``(p, p)`` (tests only)."""
        scale = check_scale(scale)
        delta = self._prepare_delta(delta)
        return scale * self.to_dense() + torch.diag(delta.expand(self.size))

    def covariance_dense(self, scale: Tensor, delta: Tensor) -> Tensor:
        """Dense posterior covariance ``P⁻¹``, shape ``(p, p)`` (tests only, ``O(p³)``)."""
        chol = torch.linalg.cholesky(self.precision_dense(scale, delta))
        return torch.cholesky_inverse(chol)

    # ------------------------------------------------------------------ serialisation, devices
    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Plain-tensor state, including the 0-d ``int64`` type code under ``"kind"``."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls: type[BlockT], sd: dict[str, Tensor]) -> BlockT:
        """Rebuild a block of this class from :meth:`state_dict` output."""

    @abstractmethod
    def _apply(self: BlockT, fn: Callable[[Tensor], Tensor]) -> BlockT:
        """New block with ``fn`` applied to every stored tensor (including caches)."""

    def to(
        self: BlockT,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> BlockT:
        """Return a copy on ``device`` and/or with floating ``dtype`` (cached factors move along).

        Args:
            device: target device, or a dtype (as in ``Tensor.to(torch.float32)``).
            dtype: target floating dtype.
        """
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise ValueError("to(): dtype given twice")
            device, dtype = None, device
        return self._apply(lambda t: t.to(device=device, dtype=dtype))

    # ------------------------------------------------------------------ helpers for subclasses
    def _prepare_delta(self, delta: Tensor | float) -> Tensor:
        """Validate ``delta``; return it as a 0-d or ``(p,)`` tensor."""
        return check_delta(delta, self.size, dtype=self.dtype, device=self.device)

    def _check_rows(self, J: Tensor, name: str = "J") -> None:
        check_last_dim(J, self.size, name)

    def _state(self, **tensors: Tensor) -> dict[str, Tensor]:
        sd = {"kind": torch.tensor(self.kind, dtype=torch.int64)}
        sd.update(tensors)
        return sd

    @classmethod
    def _check_kind(cls, sd: dict[str, Tensor]) -> None:
        if "kind" not in sd:
            raise ValueError(f"{cls.__name__}.from_state_dict: missing type code 'kind'")
        code = int(sd["kind"])
        if code != cls.kind:
            raise ValueError(
                f"{cls.__name__}.from_state_dict: state dict has kind {code} "
                f"({_kind_name(code)}), expected {cls.kind}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device})"


def _kind_name(code: int) -> str:
    cls = _REGISTRY.get(code)
    return cls.__name__ if cls is not None else "unknown"


def block_from_state_dict(sd: dict[str, Tensor]) -> CurvatureBlock:
    """Rebuild any curvature block from its :meth:`CurvatureBlock.state_dict`.

    Args:
        sd: plain-tensor dict with a 0-d integer ``"kind"`` type code (see :data:`KIND_CODES`).

    Returns:
        The block, of the class the type code names.
    """
    if "kind" not in sd:
        raise ValueError("block_from_state_dict: missing type code 'kind'")
    code = int(sd["kind"])
    cls = _REGISTRY.get(code)
    if cls is None:
        raise ValueError(f"block_from_state_dict: unknown block type code {code}")
    return cls.from_state_dict(sd)


# ---------------------------------------------------------------------- validation functions
def check_scale(scale: Tensor | float) -> Tensor:
    """Validate the curvature scale; return it as a 0-d tensor (autograd preserved)."""
    scale = torch.as_tensor(scale)
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar (0-d) tensor, got shape {tuple(scale.shape)}")
    scale = scale.reshape(())
    if not bool(scale >= 0):
        raise ValueError(f"scale must be non-negative, got {float(scale)}")
    return scale


def check_delta(
    delta: Tensor | float,
    size: int,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Validate a prior precision for a block of ``size`` parameters.

    Args:
        delta: 0-d (or one-element) tensor, or a ``(size,)`` tensor; every entry must be ``> 0``.
        size: number of parameters ``p``.
        dtype: dtype for Python numbers (tensors keep theirs).
        device: device for Python numbers.

    Returns:
        ``delta`` as a 0-d tensor or a ``(size,)`` tensor (autograd preserved).
    """
    if not isinstance(delta, Tensor):
        delta = torch.as_tensor(delta, dtype=dtype, device=device)
    if delta.numel() == 1 and delta.dim() <= 1:
        delta = delta.reshape(())
    elif delta.shape != (size,):
        raise ValueError(
            "prior precision delta must be a scalar (0-d) tensor or have shape "
            f"({size},) (one value per parameter), got shape {tuple(delta.shape)}"
        )
    if not bool(torch.all(delta > 0)):
        raise ValueError(
            f"prior precision delta must be positive, got minimum {float(delta.detach().min())}"
        )
    return delta


def check_last_dim(x: Tensor, size: int, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor whose last dimension is ``size``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(
            f"{name} must have last dimension {size} (the block size), got shape {tuple(x.shape)}"
        )


def check_rows(J: Tensor, size: int) -> None:
    """Validate a ``(..., K, p)`` input of :meth:`CurvatureBlock.inv_quad`."""
    check_last_dim(J, size, "J")
    if J.dim() < 2:
        raise ValueError(f"J must have shape (..., K, {size}), got shape {tuple(J.shape)}")


def check_eps(eps: Tensor, size: int) -> None:
    """Validate the ``(n, p)`` noise of :meth:`CurvatureBlock.sample`."""
    check_last_dim(eps, size, "eps")
    if eps.dim() != 2:
        raise ValueError(f"eps must have shape (n, {size}), got shape {tuple(eps.shape)}")


def check_square(M: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``M`` is a square floating matrix."""
    if not isinstance(M, Tensor) or M.dim() != 2 or M.shape[0] != M.shape[1]:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"{name} must be a square matrix, got {shape}")
    if not M.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {M.dtype}")


def sym_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a PSD matrix with eigenvalues clamped at 0.

    LAPACK's divide-and-conquer solver can return NaN in single precision for exactly singular
    matrices (seen with MKL and one thread on a 784 × 784 KFAC input factor whose 99 rows for
    always-black pixels are zero); a decomposition that is not finite is redone in float64, and
    one that is still not finite raises.

    Args:
        M: ``(..., n, n)`` symmetric PSD matrix (symmetrised before decomposing).

    Returns:
        ``(evals, evecs)`` with ``evals`` ``(..., n)`` ≥ 0 and orthonormal ``evecs``
        ``(..., n, n)``, in ``M``'s dtype.

    Raises:
        FloatingPointError: ``M`` holds non-finite values or its decomposition is not finite
            even in float64.
    """
    evals, evecs = _finite_eigh(0.5 * (M + M.mT), vectors=True)
    return evals.clamp(min=0), evecs


def sym_eigvalsh(M: Tensor) -> Tensor:
    """The eigenvalues of :func:`sym_eigh` alone, (..., n), clamped at 0 (cheaper)."""
    return _finite_eigh(0.5 * (M + M.mT), vectors=False).clamp(min=0)


def _finite_eigh(S: Tensor, vectors: bool) -> Any:
    """``eigh`` / ``eigvalsh`` of the symmetric ``S``, redone in float64 when not finite."""
    def decompose(X: Tensor) -> Any:
        return tuple(torch.linalg.eigh(X)) if vectors else torch.linalg.eigvalsh(X)

    if not bool(torch.isfinite(S).all()):
        raise FloatingPointError(f"cannot decompose a {tuple(S.shape)} matrix with non-finite "
                                 "entries (a curvature or kernel overflowed or is NaN)")
    try:
        out = decompose(S)
        if _finite(out):
            return out
    except torch.linalg.LinAlgError:
        if S.dtype == torch.float64:
            raise
    out = decompose(S.to(torch.float64)) if S.dtype != torch.float64 else out
    if not _finite(out):
        raise FloatingPointError(f"the eigendecomposition of a {tuple(S.shape)} matrix is not "
                                 "finite, even in float64")
    return tuple(t.to(S.dtype) for t in out) if vectors else out.to(S.dtype)


def _finite(out: Tensor | tuple[Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (out if isinstance(out, tuple) else (out,)))

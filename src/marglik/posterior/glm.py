"""The GLM (linearised) predictive f(x) ~ N(f(x; θ*), J(x) Σ J(x)ᵀ).

Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via local linearization",
AISTATS 2021. Two ways to the functional covariance J Σ Jᵀ:

- ``"layerwise"`` (:mod:`marglik.posterior.layerwise` records,
  :mod:`marglik.posterior.layerwise_covariance` contracts): from layer inputs and output
  gradients, contracted against the Kronecker / diagonal factors without forming J, and against
  a dense block's cached Cholesky factor by one triangular solve per chunk — for the ``"kron"``,
  ``"diag"`` and ``"full"`` structures over whole tensors (all weights, last layer, named
  modules);
- ``"generic"``: per-sample Jacobians J (B, D, P) with ``torch.func``, then the posterior's
  ``inv_quad`` — for every structure and subset.

``"auto"`` takes the layer-wise path where it applies. Inputs are processed in chunks whose size
bounds the numbers held at once (about :data:`MAX_ELEMENTS`; :data:`LAYERWISE_MAX_ELEMENTS` on
the layer-wise path), so memory stays bounded for any batch size; the joint covariance over a
batch is computed in one piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.curvature.batches import DICT_KEY_X, Inputs, batch_size, call_model, slice_inputs
from marglik.posterior.jacobians import per_sample_jacobians
from marglik.posterior.layerwise import (
    LayerwisePlan,
    layerwise_plan,
    per_sample_footprint,
    record,
)
from marglik.posterior.layerwise_covariance import functional_covariance
from marglik.predictive import BACKENDS
from marglik.predictive.links import zero_sum_basis

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace


#: Default bound on the numbers (Jacobian entries, recorded activations) held per chunk.
MAX_ELEMENTS = 2**24
#: The same for the layer-wise path (recorded activations and column gradients; 256 MB in
#: float32): larger chunks make the per-column backward passes and the per-layer products
#: batched matrix products over several inputs (a ResNet-18 gets chunks of 3, not 1).
LAYERWISE_MAX_ELEMENTS = 2**26


def _n_inputs(la: Laplace, x: Inputs) -> int:
    """Batch size B of x: a tensor (B, ...), or a dict / tuple of such tensors."""
    return batch_size(x, getattr(la, "dict_key_x", DICT_KEY_X))


def jacobians(la: Laplace, x: Inputs, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Model outputs f (B, ...) and Jacobians J (B, D, P) of the flattened outputs (generic)."""
    f = call_model(la.model, x)
    J = per_sample_jacobians(la.model, la.subset, x, f.shape[1:], f.dtype, create_graph)
    return f, (J if create_graph else J.detach())  # no graph to the other weights


def resolve_backend(la: Laplace, backend: str = "auto") -> LayerwisePlan | None:
    """The layer-wise plan, or None for the generic path."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend == "generic":
        return None
    plan = layerwise_plan(la)
    if plan is None and backend == "layerwise":
        raise ValueError(
            "the layer-wise predictive needs a 'kron', 'diag' or 'full' posterior over whole "
            f"parameter tensors; this one has hessian_structure={la.hessian_structure!r}"
            + (" and a subnetwork given by indices" if la.subset.index is not None else "")
        )
    return plan


def chunk_length(la: Laplace, x: Inputs, plan: LayerwisePlan | None, chunk_size: int | None,
                 max_elements: int | None = None) -> int:
    """Number of inputs per chunk: ``chunk_size`` or the most that fit ``max_elements``
    (default :data:`MAX_ELEMENTS`, :data:`LAYERWISE_MAX_ELEMENTS` for a layer-wise plan)."""
    if chunk_size is not None:
        return int(chunk_size)
    if max_elements is None:
        max_elements = MAX_ELEMENTS if plan is None else LAYERWISE_MAX_ELEMENTS
    if plan is None:
        with torch.no_grad():
            D = call_model(la.model, slice_inputs(x, 0, 1))[0].numel()
        per_input = 3 * D * la.n_params + 4 * D * D
    else:
        per_input, _ = per_sample_footprint(la, plan, slice_inputs(x, 0, 1))
    return max(1, min(_n_inputs(la, x), max_elements // max(1, per_input)))


def glm_chunks(la: Laplace, x: Inputs, plan: LayerwisePlan | None, chunk: int,
               create_graph: bool = False, centred: bool = False
               ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (f (n, ...), J Σ Jᵀ (n, D, D)) for consecutive chunks of x (``centred``: see
    :func:`moments`)."""
    for start in range(0, _n_inputs(la, x), chunk):
        xc = slice_inputs(x, start, start + chunk)
        yield moments(la, xc, plan, joint=False, create_graph=create_graph, centred=centred)


def moments(la: Laplace, x: Inputs, plan: LayerwisePlan | None, joint: bool = False,
            create_graph: bool = False, centred: bool = False) -> tuple[Tensor, Tensor]:
    """Mean f (B, ...) and J Σ Jᵀ: (B, D, D), or (B·D, B·D) with ``joint=True``, for one chunk.

    ``centred`` (per-input covariances of outputs (B, C), C ≥ 2): P J Σ Jᵀ P instead, with
    P = I − 11ᵀ/C = V Vᵀ (:func:`~marglik.predictive.links.zero_sum_basis`), from the C − 1
    output columns Vᵀ J: C − 1 backward passes and Jacobian contractions instead of C.
    """
    if plan is None:
        f, J = jacobians(la, x, create_graph)
        V = centring_basis(f, centred and not joint, J.dtype)
        if V is not None:
            J = V.mT @ J  # (B, C − 1, P)
        P = J.shape[-1]
        if joint:
            cov = la.functional_variance(J.reshape(1, -1, P))[0]
        else:
            cov = la.functional_variance(J)
        if not create_graph:
            f = f.detach()
    else:
        basis = partial(centring_basis, centred=centred and not joint, dtype=la.H.dtype)
        f, data, J_other, V = record(la, plan, x, create_graph, basis)
        D = f[0].numel() if V is None else V.shape[1]
        cov = functional_covariance(la, plan, data, J_other, f.shape[0], D, joint)
    if V is not None:
        cov = V @ cov @ V.mT
    return f.to(cov.dtype), cov


def centring_basis(f: Tensor, centred: bool, dtype: torch.dtype) -> Tensor | None:
    """V (C, C − 1) for outputs f (B, C), C ≥ 2, where ``centred``; else None."""
    if not centred or f.ndim != 2 or f.shape[1] < 2:
        return None
    return zero_sum_basis(f.shape[1], dtype, f.device)


def glm_moments(la: Laplace, x: Inputs, joint: bool = False, chunk_size: int | None = None,
                backend: str = "auto", create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the linearised outputs.

    Args:
        x: inputs (B, ...), or a dict / tuple of such tensors (:mod:`marglik.curvature.batches`).
        joint: full covariance over the batch instead of one per input.
        chunk_size: inputs per chunk (default: bounded by :func:`chunk_length`).
        backend: ``"auto" | "layerwise" | "generic"``.
        create_graph: keep the graph to x (for ``enable_backprop``).

    Returns:
        ``joint=False``: f (B, ...) and per-input covariances (B, D, D) of the D flattened
        outputs; ``joint=True``: f (B, ...) and the covariance (B·D, B·D), ordered input-major.
    """
    la.require_fit()
    if joint:
        plan = resolve_backend(la, backend)
        return moments(la, x, plan, joint=True, create_graph=create_graph)
    means, covs = zip(*glm_moment_chunks(la, x, chunk_size, backend, create_graph))
    return torch.cat(means), torch.cat(covs)


def glm_moment_chunks(la: Laplace, x: Inputs, chunk_size: int | None = None,
                      backend: str = "auto", create_graph: bool = False, centred: bool = False
                      ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (f (n, ...), J Σ Jᵀ (n, D, D)) for consecutive chunks of x (B, ...).

    ``chunk_size`` inputs per chunk, by default as many as :func:`chunk_length` allows.
    """
    la.require_fit()
    plan = resolve_backend(la, backend)
    yield from glm_chunks(la, x, plan, chunk_length(la, x, plan, chunk_size), create_graph,
                          centred)

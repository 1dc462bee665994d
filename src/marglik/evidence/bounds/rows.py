"""The rows of the function-space evidence: Λ_n^½ J_n for every training point, and the parameter
blocks that partition their columns.

The Laplace log-determinant in function space (Immer, Korzepa & Bauer, AISTATS 2021) is

    log det(P0 + s·Σ_n J_nᵀ Λ_n J_n) − log det P0 = log det(I_{NC} + s·G P0⁻¹ Gᵀ),

with G (N·C × P) stacking the rows G_n = Λ_n^½ J_n (C × P) and s = (σ_rows/σ)²/T. Here Λ_n^½ is
the *symmetric* (principal) square root of the output Hessian, Λ_n^½ = Q diag(√λ) Qᵀ from
Λ_n = Q diag(λ) Qᵀ, so that row c of G_n belongs to output c:

- Gaussian: Λ = diag(1/σ²), Λ^½ = diag(1/σ) — row c is J_{n,c}/σ_c;
- Bernoulli (C = 1): Λ^½ = √(p(1−p));
- softmax: Λ = diag(p) − p pᵀ is not diagonal (rank C − 1), and row c of its symmetric root,
  (Λ^½ J_n)_c = Σ_a (Λ^½)_{ca} J_{n,a}, mixes the logits' Jacobians. Any factor V with
  V Vᵀ = Λ gives the same exact evidence (Sylvester), but blocks over the columns of V are a
  different bound for each V: the output-partitioned bound is defined with this root.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marglik.curvature.batches import batches, call_model
from marglik.curvature.per_sample import per_sample_column_grads
from marglik.curvature.runtime import eval_mode

if TYPE_CHECKING:
    from marglik.posterior.laplace import Laplace

__all__ = ["PARAMETER_BLOCKS", "function_space_rows", "parameter_blocks", "symmetric_root"]


def symmetric_root(hessian: Tensor) -> Tensor:
    """Principal square root of symmetric PSD matrices, Q diag(√max(λ, 0)) Qᵀ.

    Args:
        hessian: Λ (..., C, C).

    Returns:
        Λ^½ (..., C, C), symmetric.
    """
    evals, evecs = torch.linalg.eigh(hessian)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT


def function_space_rows(la: Laplace, data: Iterable) -> Tensor:
    """G_n = Λ_n^½ J_n (C × P) of every point of ``data``, at the posterior's weights: (N, C, P).

    Λ is ``la.likelihood``'s output Hessian (at its current σ for regression) and J the
    Jacobian of the outputs (N, C) w.r.t. the posterior's parameters ``la.subset``; the rows are
    per-sample gradients of the outputs weighted by the columns of the symmetric root
    (``torch.func``, vmapped). The model runs in eval mode and is left as it was.

    Raises:
        ValueError: outputs that are not (N, C) (shared positions are not supported here).
    """
    model, subset = la.model, la.subset
    parts = []
    with eval_mode(model, subset.names):
        for x, y in batches(data, model, la.dict_key_x, la.dict_key_y):
            with torch.no_grad():
                f = call_model(model, x)
            if not isinstance(f, Tensor) or f.ndim != 2:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"the function-space bounds need model outputs of shape (N, C), "
                                 f"got {shape}")
            f, y = la.likelihood.validate(f, y)
            root = symmetric_root(la.likelihood.hessian(f, y).to(f))  # (N, C, C)
            U = root.movedim(-1, 0)  # column k of the root for every point: (C, N, C)
            parts.append(per_sample_column_grads(model, subset, x, U).transpose(0, 1))
    if not parts:
        raise ValueError("the data loader is empty")
    return torch.cat(parts).detach().to(la.dtype)


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


#: how a parameter partition is named -> the tensor-name groups it gives for (names, prior groups)
PARAMETER_BLOCKS = {
    "tensors": lambda names, groups: [[n] for n in names],
    "layers": lambda names, groups: [
        [n for n in names if _module_of(n) == m] for m in dict.fromkeys(map(_module_of, names))
    ],
    "prior": lambda names, groups: [[n] for n in names] if groups is None else groups,
}


def parameter_blocks(la: Laplace, parameters: str | Sequence[Sequence[str]] | None
                     ) -> tuple[list[Tensor] | None, list[int | None]]:
    """Column blocks of the P posterior parameters, and the prior group each lies in.

    Args:
        parameters: ``None`` (one block: the full GGN), ``"tensors"`` (each parameter tensor),
            ``"layers"`` (the tensors of each module), ``"prior"`` (the prior's groups),
            ``"diag"`` (every parameter alone) or a list of tensor-name lists that partition
            the posterior's tensors.

    Returns:
        (blocks, groups): the column indices of each block (``None`` for ``"diag"``: P blocks
        of one) and, per block, the index of the prior group it lies in (``None`` where it
        spans groups; for ``"diag"`` an empty list).
    """
    names = list(la.subset.names)
    numel = la.subset.numel_per_tensor
    prior_groups = la.prior.groups
    group_of = ({n: i for i, n in enumerate(names)} if prior_groups is None
                else {n: g for g, members in enumerate(prior_groups) for n in members})
    if parameters == "diag":
        return None, []
    if parameters is None:
        spans = {group_of[n] for n in names}
        return [torch.arange(la.n_params)], [spans.pop() if len(spans) == 1 else None]
    if isinstance(parameters, str):
        if parameters not in PARAMETER_BLOCKS:
            raise ValueError(f"unknown parameter partition {parameters!r}: use None, 'diag', "
                             f"one of {sorted(PARAMETER_BLOCKS)} or lists of tensor names")
        named = PARAMETER_BLOCKS[parameters](names, prior_groups)
    else:
        named = [list(block) for block in parameters]
    flat = [n for block in named for n in block]
    if sorted(flat) != sorted(names) or any(not block for block in named):
        raise ValueError(f"parameter blocks must partition the posterior's tensors {names} into "
                         f"non-empty blocks, got {named}")
    offsets = torch.tensor([0, *numel]).cumsum(0).tolist()
    where = {n: torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}
    blocks, groups = [], []
    for block in named:
        blocks.append(torch.cat([where[n] for n in sorted(block, key=names.index)]))
        spans = {group_of[n] for n in block}
        groups.append(spans.pop() if len(spans) == 1 else None)
    return blocks, groups

"""Passes over the training data for the function-space posterior, and the choice of its points.

One pass (:func:`data_pass`) runs the network on every batch and gathers, as asked: the data-fit
statistics over all N points; the Jacobian rows J_n (D × P) and output-Hessian factors W_n
(:func:`~marglik.posterior.function_space.sample_factor`) at chosen points; and the per-group
cross-kernels J(x_n) J_Zᵀ against given inducing rows J_Z (Nyström). Jacobians come from
``torch.func`` per batch (:func:`~marglik.posterior.jacobians.per_sample_jacobians`), so at most
one batch of rows beyond the kept ones is held at a time and no P × P matrix is formed.

A subset of M points is chosen by :func:`choose_subset` — uniformly at random, or balanced over
classes — by global position in the loader, which a second pass must reproduce: the targets seen
in each pass are compared, and a loader that reorders its data (``shuffle=True``) is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from marglik.curvature.batches import batch_size, batches, call_model, tree_map
from marglik.curvature.columns import hessian_factor
from marglik.curvature.subsets import ParameterSubset
from marglik.likelihoods import Gaussian, Likelihood
from marglik.posterior.function_space import group_kernels, sample_factor
from marglik.posterior.jacobians import per_sample_jacobians
from marglik.posterior.prior import Prior

__all__ = ["SUBSET_METHODS", "PassResult", "check_subset_options", "choose_subset", "data_pass",
           "parameter_groups"]

#: how the M points of a subset are chosen
SUBSET_METHODS = ("random", "class")


@dataclass
class PassResult:
    """What one pass over the data gathered.

    Attributes:
        statistics: the likelihood's summed data-fit statistics over all N points.
        n_data: N.
        targets: the targets of all points, concatenated (detached), for choosing subsets.
        out_shape: the shape of one output f(x_n).
        jacobians: J at the chosen points, (n, D, P), or None.
        factors: W at the chosen points (at every point with ``cross``), (n, D, K), or None.
        cross: per-group kernels J(X) J_Zᵀ, (G, N·D, M·D), or None.
    """

    statistics: dict[str, Tensor] = field(default_factory=dict)
    n_data: int = 0
    targets: Tensor | None = None
    out_shape: torch.Size | None = None
    jacobians: Tensor | None = None
    factors: Tensor | None = None
    cross: Tensor | None = None


def _take(x, index: Tensor):
    """Samples ``index`` of inputs x (tensor, dict or tuple sharing the batch dimension)."""
    return tree_map(lambda t: t[index] if t.ndim > 0 else t, x)


def data_pass(
    model: nn.Module,
    likelihood: Likelihood,
    loader: Iterable,
    subset: ParameterSubset,
    dict_keys: tuple[str, str],
    select: Tensor | str | None = None,
    cross: tuple[Tensor, Tensor, int] | None = None,
    expected_targets: Tensor | None = None,
    create_graph: bool = False,
) -> PassResult:
    """One pass over ``loader`` (run it in eval mode).

    Args:
        dict_keys: (dict_key_x, dict_key_y) for mapping batches.
        select: ``"all"``, sorted global indices (M,) of the points whose Jacobians and factors
            to keep, or None (statistics only).
        cross: (J_Z (M·D, P), group of every parameter (P,), number of groups) for the
            Nyström cross-kernels; the factors are then kept at every point.
        expected_targets: the targets of an earlier pass, to check that the loader yields the
            same data in the same order.
        create_graph: keep the graph to tensors the forward pass uses besides the posterior's
            weights (registered hyperparameters): statistics, Jacobians, factors and kernels.
    """
    out = PassResult()
    jac, fac, crs, targets, sums = [], [], [], [], {}
    gaussian = isinstance(likelihood, Gaussian)
    offset = 0
    for x, y in batches(loader, model, *dict_keys):
        n = batch_size(x, dict_keys[0])
        with torch.set_grad_enabled(create_graph):
            f = call_model(model, x)
        f, y = likelihood.validate(f, y)
        if f.ndim < 2:
            raise ValueError(f"model outputs must have shape (N, ..., C), got {tuple(f.shape)}")
        if expected_targets is not None and not _same(expected_targets, offset, y):
            raise ValueError("the data loader gave other targets in a second pass: the "
                             "function-space posterior needs the same order in every pass "
                             "(shuffle=False)")
        out.out_shape = f.shape[1:]
        for key, value in likelihood.statistics(f if create_graph else f.detach(), y).items():
            sums[key] = sums[key] + value if key in sums else value
        targets.append(y.detach())
        if select is not None or cross is not None:
            rows = _rows(select, offset, n, y.device)
            if rows is not None and rows.numel():
                xs, fs, ys = _take(x, rows), f[rows], y[rows]
                jac.append(per_sample_jacobians(model, subset, xs, fs.shape[1:], fs.dtype,
                                                create_graph))
            if not gaussian and ((rows is not None and rows.numel()) or cross is not None):
                fk, yk = (f, y) if cross is not None else (fs, ys)
                fk = fk if create_graph else fk.detach()
                fac.append(sample_factor(hessian_factor(likelihood, fk, yk)))
            if cross is not None:
                J_Z, groups, n_groups = cross
                J_b = per_sample_jacobians(model, subset, x, f.shape[1:], f.dtype, create_graph)
                crs.append(group_kernels(J_b.reshape(-1, J_b.shape[-1]), J_Z, groups, n_groups))
        offset += n
    if offset == 0:
        raise ValueError("the data loader is empty")
    out.statistics, out.n_data, out.targets = sums, offset, torch.cat(targets)
    if expected_targets is not None and offset != len(expected_targets):
        raise ValueError(f"the data loader gave {offset} points in a second pass, "
                         f"{len(expected_targets)} in the first")
    out.jacobians = torch.cat(jac) if jac else None
    out.factors = torch.cat(fac) if fac else None
    out.cross = torch.cat(crs, 1) if crs else None
    return out


def _rows(select: Tensor | str | None, offset: int, n: int, device: torch.device
          ) -> Tensor | None:
    """Positions within the batch [offset, offset + n) of the selected global indices."""
    if select is None:
        return None
    if isinstance(select, str):
        return torch.arange(n, device=device)
    inside = select[(select >= offset) & (select < offset + n)]
    return (inside - offset).to(device)


def _same(expected: Tensor, offset: int, y: Tensor) -> bool:
    part = expected[offset : offset + len(y)]
    return part.shape == y.shape and torch.equal(part.to(y), y.detach())


def choose_subset(n_data: int, m: int, method: str, targets: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """M distinct indices in [0, N), sorted: ``"random"`` (uniform without replacement) or
    ``"class"`` (balanced: each class gets ⌊M/K⌋ or ⌈M/K⌉ points, K the classes present;
    a class with fewer points gives all of them and the rest is shared by the others).

    Args:
        targets: class labels (N,) for ``"class"``.

    Raises:
        ValueError: M not in [1, N], an unknown method, or targets that are not one label
            per point.
    """
    if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= n_data:
        raise ValueError(f"n_subset must be an integer in [1, {n_data}] (the number of "
                         f"training points), got {m!r}")
    if method not in SUBSET_METHODS:
        raise ValueError(f"unknown subset_method {method!r}: use one of {SUBSET_METHODS}")
    if method == "random":
        return torch.randperm(n_data, generator=generator)[:m].sort().values
    if targets is not None and targets.numel() == n_data:  # binary targets may be (N, 1)
        targets = targets.reshape(n_data)
    if targets is None or targets.shape != (n_data,):
        got = None if targets is None else tuple(targets.shape)
        raise ValueError("subset_method='class' needs one class label per point (targets of "
                         f"shape ({n_data},)), got {got}")
    labels = targets.detach().cpu().round().long()
    classes, counts = labels.unique(return_counts=True)
    quota = _balanced_quota(counts.tolist(), m)
    perm = torch.randperm(n_data, generator=generator)
    shuffled = labels[perm]
    chosen = [perm[shuffled == c][:q] for c, q in zip(classes.tolist(), quota)]  # per class
    return torch.cat(chosen).sort().values


def _balanced_quota(counts: list[int], m: int) -> list[int]:
    """Points per class: as equal as possible, never more than a class has (water filling)."""
    quota = [0] * len(counts)
    open_ = list(range(len(counts)))
    left = m
    while open_:
        share = left // len(open_)
        small = [k for k in open_ if counts[k] <= share]
        if not small:
            extra = left - share * len(open_)
            for i, k in enumerate(open_):
                quota[k] = share + (1 if i < extra else 0)
            break
        for k in small:
            quota[k] = counts[k]
            left -= counts[k]
            open_.remove(k)
    return quota


def parameter_groups(prior: Prior) -> Tensor:
    """The prior group of every parameter of θ, (P,), for a bound prior."""
    if prior.groups is None:
        of_tensor = list(range(len(prior.names)))
    else:
        index = {name: g for g, members in enumerate(prior.groups) for name in members}
        of_tensor = [index[name] for name in prior.names]
    return torch.tensor(of_tensor).repeat_interleave(torch.tensor(prior.numel))


def check_subset_options(n_subset: int | None, method: str, nystrom: bool, task: str) -> None:
    """Raise a clear error for invalid ``n_subset`` / ``subset_method`` / ``nystrom``."""
    if n_subset is not None and (not isinstance(n_subset, int) or isinstance(n_subset, bool)
                                 or n_subset < 1):
        raise ValueError(f"n_subset must be a positive integer or None, got {n_subset!r}")
    if method not in SUBSET_METHODS:
        raise ValueError(f"unknown subset_method {method!r}: use one of {SUBSET_METHODS}")
    if method == "class" and task not in ("classification", "binary"):
        raise ValueError("subset_method='class' balances classes: it needs a classification "
                         f"or binary likelihood, not {task}")
    if not isinstance(nystrom, bool):
        raise TypeError(f"nystrom must be True or False, got {nystrom!r}")
    if nystrom and n_subset is None:
        raise ValueError("nystrom=True needs n_subset=M, the number of inducing points")

"""Shape functions of LA-NAM with credible bands from the linearised Laplace posterior.

For subnetwork g with parameters θ_g, the linearised posterior (Immer, Korzepa & Bauer, AISTATS
2021) restricted to θ_g (Bouchiat et al., AABI 2023) gives

    f_g(x) ~ N(f_g(x; θ*),  J_g(x) Σ_gg J_g(x)ᵀ),     J_g(x) = ∂f_g(x)/∂θ_g  (C × P_g),

with Σ_gg the block of the posterior covariance Σ = P⁻¹ belonging to θ_g. An additive model is
identified only up to constants, so shape functions are *centred* on reference inputs X_ref
(the training data): f̃_g(x) = f_g(x) − mean_n f_g(x_n), whose Jacobian is J_g(x) − mean_n
J_g(x_n) and whose band follows from it exactly. Everything is vectorised: one Jacobian of
s(x) = Σ_g f̃_g(x) gives every J_g at once (each entry of θ belongs to one subnetwork), and the
per-group quadratic forms are one masked product and one ``index_add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, jacrev

from marglik.applications.additive.model import AdditiveNet
from marglik.posterior import Laplace

__all__ = [
    "ShapeFunctions",
    "contributions_at",
    "feature_grid",
    "group_moments",
    "shape_functions",
]


@dataclass
class ShapeFunctions:
    """Centred shape functions on a grid: ``grid`` (M, D), ``mean`` and ``std`` (M, G, C)."""

    grid: Tensor
    mean: Tensor
    std: Tensor


def feature_grid(X: Tensor, n_points: int = 100) -> Tensor:
    """An (n_points, D) grid whose column d runs evenly over the range of X[:, d]."""
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    lo, hi = X.min(0).values, X.max(0).values
    t = torch.linspace(0, 1, n_points, dtype=X.dtype, device=X.device)[:, None]
    return lo + t * (hi - lo)


def _check_posterior(la: Laplace, model: AdditiveNet) -> None:
    if not isinstance(model, AdditiveNet):
        raise TypeError(f"model must be an AdditiveNet, got {type(model).__name__}")
    if not la.is_fitted:
        raise ValueError("the Laplace posterior is not fitted")
    names = [n for n, _ in model.named_parameters()]
    if list(la.subset.names) != names:
        raise ValueError("the posterior must cover all parameters of the additive model "
                         "(subset_of_weights='all')")


def contributions_at(model: AdditiveNet, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``model.contributions(x)`` (N, G, C) with the parameters ``params`` (a functional call,
    so the model itself is not touched)."""
    wrapped = {f"model.{n}": t for n, t in params.items()}
    return functional_call(_Contributions(model), wrapped, (x,))


class _Contributions(torch.nn.Module):
    """Wraps an AdditiveNet so that a functional call runs ``contributions`` (not ``forward``)."""

    def __init__(self, model: AdditiveNet):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.contributions(x)


def _jacobian(model: AdditiveNet, x: Tensor, x_ref: Tensor | None) -> tuple[Tensor, Tensor]:
    """Centred contributions (M, G, C) and the Jacobian of their sum over g, (M, C, P).

    J(x) − mean_n J(x_n): the grid Jacobian (M·C rows through M inputs) minus the Jacobian of
    the reference mean (C rows through N inputs), so memory does not grow with M·N.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}

    def summed(p: dict[str, Tensor], inputs: Tensor) -> tuple[Tensor, Tensor]:
        c = contributions_at(model, p, inputs)
        return c.sum(1), c

    jac, values = jacrev(summed, has_aux=True)(params, x)
    J = torch.cat([jac[n].flatten(2) for n in params], dim=2)
    if x_ref is not None:
        jac_ref, ref = jacrev(lambda p: tuple(t.mean(0) for t in summed(p, x_ref)),
                              has_aux=True)(params)
        J = J - torch.cat([jac_ref[n].flatten(1) for n in params], dim=1)
        values = values - ref
    return values, J


def group_moments(la: Laplace, model: AdditiveNet, x: Tensor,
                  x_ref: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and variance of every subnetwork's (centred) output under the linearised posterior.

    Args:
        la: fitted Laplace over all parameters of ``model`` (any Hessian structure; ``"full"``
            forms the dense covariance, small models only).
        model: the :class:`AdditiveNet` at θ*.
        x: inputs (M, D).
        x_ref: reference inputs (N, D) to centre on (None: no centring).

    Returns:
        mean (M, G, C) and variance (M, G, C): f_g(x; θ*) (centred) and
        J_g(x) Σ_gg J_g(x)ᵀ (diagonal over the C outputs).
    """
    _check_posterior(la, model)
    values, J = _jacobian(model, x.to(la.mean.dtype), None if x_ref is None
                          else x_ref.to(la.mean.dtype))
    gid = model.group_of_parameters().to(J.device)
    n_groups = model.n_groups + 1
    if la.hessian_structure == "diag":
        terms = J.square() * la.posterior_variance.to(J)
    else:
        cov = la.posterior_covariance.to(J)
        same = gid[:, None] == gid[None, :]
        terms = J * (J @ (cov * same))
    var = terms.new_zeros(*terms.shape[:2], n_groups).index_add_(2, gid, terms)
    return values.detach(), var[..., : model.n_groups].transpose(1, 2).clamp_min(0).detach()


def shape_functions(la: Laplace, model: AdditiveNet, X_ref: Tensor,
                    n_points: int = 100, grid: Tensor | None = None) -> ShapeFunctions:
    """Centred feature shape functions f̃_d on a grid, mean ± std from J_d Σ_dd J_dᵀ.

    Args:
        la, model: the fitted posterior and model.
        X_ref: the inputs (N, D) the functions are centred on (the training data).
        n_points: grid size when ``grid`` is None (:func:`feature_grid` over X_ref's range).
        grid: an explicit grid (M, D), column d for feature d.

    Returns:
        :class:`ShapeFunctions` with mean and std (M, D, C) of the D feature subnetworks.
    """
    grid = feature_grid(X_ref, n_points) if grid is None else grid
    if grid.dim() != 2 or grid.shape[1] != model.n_features:
        raise ValueError(f"grid must have shape (M, {model.n_features}), got {tuple(grid.shape)}")
    mean, var = group_moments(la, model, grid, X_ref)
    d = model.n_features
    return ShapeFunctions(grid, mean[:, :d], var[:, :d].sqrt())

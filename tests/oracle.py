"""Brute-force references for the tests (never used by the library).

Dense per-sample Jacobians and output Hessians from ``torch.func``, explicit GGN sums, slogdet and
matrix inverses. Everything here is written for clarity on tiny float64 models, not for speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap


def parameter_slices(model: nn.Module) -> dict[str, slice]:
    """name -> slice of the flat parameter vector θ, in ``named_parameters`` order."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def parameter_dict(model: nn.Module, names: list[str] | None = None) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    return {n: params[n].detach() for n in names}


def jacobians(model: nn.Module, x: Tensor, names: list[str] | None = None) -> Tensor:
    """Per-sample Jacobians of the flattened outputs: (N, D, P)."""
    params = parameter_dict(model, names)

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return torch.cat([j.reshape(*j.shape[:2], -1) for j in jac.values()], dim=2)  # 0-d too


def output_hessians(nll: Callable[[Tensor, Tensor], Tensor], f: Tensor, y: Tensor) -> Tensor:
    """Per-sample Hessians of nll(f_n, y_n) w.r.t. the flattened outputs: (N, D, D)."""
    shape = f.shape[1:]

    def single(fi: Tensor, yi: Tensor) -> Tensor:
        return nll(fi.reshape(1, *shape), yi.unsqueeze(0))

    return vmap(hessian(single))(f.reshape(f.shape[0], -1), y)


def output_gradients(nll: Callable[[Tensor, Tensor], Tensor], f: Tensor, y: Tensor) -> Tensor:
    shape = f.shape[1:]

    def single(fi: Tensor, yi: Tensor) -> Tensor:
        return nll(fi.reshape(1, *shape), yi.unsqueeze(0))

    return vmap(torch.func.grad(single))(f.reshape(f.shape[0], -1), y)


def ggn(model: nn.Module, x: Tensor, y: Tensor, nll, names: list[str] | None = None) -> Tensor:
    """Σ_n J_nᵀ Λ_n J_n with Λ from autograd: (P, P)."""
    J = jacobians(model, x, names)
    with torch.no_grad():
        f = model(x)
    L = output_hessians(nll, f, y)
    return torch.einsum("ndp,nde,neq->pq", J, L, J)


def empirical_fisher(
    model: nn.Module, x: Tensor, y: Tensor, nll, names: list[str] | None = None
) -> Tensor:
    J = jacobians(model, x, names)
    with torch.no_grad():
        f = model(x)
    g = torch.einsum("ndp,nd->np", J, output_gradients(nll, f, y))
    return g.T @ g


def laplace_evidence(
    log_lik: Tensor, theta: Tensor, H: Tensor, delta: Tensor, mu0: Tensor | float = 0.0
) -> Tensor:
    """log p(D|θ) − ½(θ−μ0)ᵀP0(θ−μ0) − ½(log det(H + P0) − log det P0) with explicit matrices."""
    P0 = torch.diag(delta.expand(theta.shape))
    diff = theta - mu0
    return (
        log_lik
        - 0.5 * diff @ P0 @ diff
        - 0.5 * (torch.linalg.slogdet(H + P0)[1] - torch.linalg.slogdet(P0)[1])
    )


def gaussian_log_density(y: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """log N(y | mean, cov) with an explicit inverse and slogdet."""
    d = y - mean
    return -0.5 * (
        d @ torch.linalg.inv(cov) @ d
        + torch.linalg.slogdet(cov)[1]
        + len(y) * math.log(2 * math.pi)
    )


# likelihoods as plain functions (sum over everything), independent of marglik
def gaussian_nll(sigma: float | Tensor = 1.0):
    def nll(f: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(f.shape)
        return 0.5 * (((f - y) / sigma) ** 2).sum()

    return nll


def categorical_nll(f: Tensor, y: Tensor) -> Tensor:
    return -torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).sum()


def bernoulli_nll(f: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(
        f, y.reshape(f.shape), reduction="sum"
    )

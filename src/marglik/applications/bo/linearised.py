"""The linearised-Laplace model as a Gaussian process over candidate points (no BoTorch needed).

Kristiadi, Immer, Eschenhagen & Fortuin, "Promises and pitfalls of the linearized Laplace in
Bayesian optimization", AABI 2023; the predictive is the GLM predictive of Immer, Korzepa &
Bauer (AISTATS 2021). Around the MAP weights θ* the network is replaced by its linearisation

    f_lin(x; θ) = f(x; θ*) + J(x) (θ − θ*),    θ ~ N(θ*, Σ),    J(x) = ∂f(x; θ)/∂θ |θ* (D × P),

a Gaussian process with mean f(x; θ*) and kernel J(x) Σ J(x')ᵀ (the empirical NTK under Σ). For
a t-batch of q candidates X (q, d) the joint predictive of the q·D outputs is

    mean = f(X; θ*) (q, D),    cov = J_X Σ J_Xᵀ (+ σ² I with observation noise) (q·D, q·D),

input-major (row i·D + c is output c at x_i), J_X (q·D, P) the stacked Jacobians. Both are
differentiable in X, which gradient-based acquisition optimisation needs: the Jacobians come
from ``torch.func`` (vmap over points of jacrev over the weights), which composes with
autograd to X; J Σ Jᵀ is the posterior's ``functional_variance`` (its structure's ``inv_quad``,
batched), so every t-batch costs O(q·D) Jacobian rows and the batches never meet — no (b·q)²
covariance is formed.

Function samples (Thompson sampling): θ_s ~ q(θ) gives f_s(x) = f(x; θ*) + J(x) v_s with
v_s = θ_s − θ*, one Jacobian-vector product (``torch.func.jvp``) per evaluation, so a sample is
a deterministic, differentiable function of x that can be evaluated anywhere and maximised.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from marglik.curvature.runtime import eval_mode
from marglik.posterior.laplace import Laplace


def check_candidates(X: Tensor, n_features: int | None = None) -> Tensor:
    """X as a floating tensor (..., q, d) with finite entries, or a clear error."""
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a torch.Tensor of shape (..., q, d), got {type(X).__name__}")
    if X.ndim < 2:
        raise ValueError(f"X must have shape (..., q, d) with at least 2 dimensions, got "
                         f"{tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"X must be a floating tensor, got dtype {X.dtype}")
    if n_features is not None and X.shape[-1] != n_features:
        raise ValueError(f"X has {X.shape[-1]} features in its last dimension; the model was "
                         f"trained on {n_features}")
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN/inf values")
    return X


def _subset_params(la: Laplace) -> dict[str, Tensor]:
    """The posterior's weight tensors θ*, detached (whole tensors only)."""
    la.require_fit()
    if la.subset.index is not None:
        raise ValueError("the BO surrogate needs a posterior over whole parameter tensors "
                         "(subset_of_weights 'all', 'last_layer' or a list of names), not a "
                         "subnetwork given by indices")
    return {n: p.detach() for n, p in la.subset.parameters(la.model).items()}


def parameter_jacobians(model: nn.Module, params: dict[str, Tensor], X: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """Outputs f (N, D) and Jacobians J (N, D, P) w.r.t. ``params`` at inputs X (N, d).

    ``torch.func`` (vmap over the N points of jacrev over the weights); both results keep their
    graph to X, so ∂/∂X of anything built from them is exact. Run the model in eval mode.
    """
    N = X.shape[0]

    def f_single(p: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)
        return out, out

    jac, f = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(params, X)
    D = f.shape[-1]
    J = torch.cat([jac[n].reshape(N, D, -1) for n in params], dim=-1)
    return f, J


def joint_moments(la: Laplace, X: Tensor) -> tuple[Tensor, Tensor]:
    """Joint GLM predictive of t-batches: mean (..., q, D) and J Σ Jᵀ (..., q·D, q·D).

    Args:
        la: a fitted :class:`~marglik.Laplace` posterior over whole weight tensors (any
            Hessian structure: its ``functional_variance`` does the contraction).
        X: candidates (..., q, d); the leading dimensions are t-batches, each with its own
            joint covariance over its q points (input-major, D outputs per point).

    Returns:
        mean f(X; θ*) (..., q, D) and covariance J_X Σ J_Xᵀ (..., q·D, q·D) in the posterior's
        dtype, differentiable in X. No observation noise (see :func:`add_noise`).
    """
    X = check_candidates(X)
    params = _subset_params(la)
    batch, (q, d) = X.shape[:-2], X.shape[-2:]
    with eval_mode(la.model, requires_grad=None):
        f, J = parameter_jacobians(la.model, params, X.reshape(-1, d).to(la.mean.dtype))
    D, P = f.shape[-1], J.shape[-1]
    cov = la.functional_variance(J.reshape(*batch, q * D, P))
    return f.reshape(*batch, q, D).to(cov.dtype), cov


def noise_variance(la: Laplace, D: int) -> Tensor:
    """σ² per output (D,), from the posterior's Gaussian likelihood (scalar or per-output σ)."""
    sigma = la.sigma_noise
    if sigma is None:
        raise ValueError("observation noise needs a regression (Gaussian) posterior")
    return sigma.detach().to(la.dtype).reshape(-1).expand(D).square()


def add_noise(cov: Tensor, noise: Tensor) -> Tensor:
    """cov + diag(noise) for cov (..., q·D, q·D) and noise (q·D,) or broadcastable (..., q·D)."""
    return cov + torch.diag_embed(noise.to(cov).expand(cov.shape[:-1]))


def weight_perturbations(la: Laplace, n_samples: int,
                         generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """v_s = θ_s − θ* for θ_s ~ q(θ), as a dict of (n_samples, *shape) tangents per tensor."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    params = _subset_params(la)
    v = (la.sample(n_samples, generator=generator) - la.mean.to(la.dtype)).to(la.mean.dtype)
    sizes = [p.numel() for p in params.values()]
    return {n: c.reshape(n_samples, *p.shape)
            for (n, p), c in zip(params.items(), v.split(sizes, dim=1))}


class LinearisedFunctionSamples(nn.Module):
    """S posterior functions of the linearised model, f_s(x) = f(x; θ*) + J(x) v_s.

    Kristiadi et al. (AABI 2023) use such samples for Thompson sampling. The samples are fixed
    at construction (θ_s ~ q(θ) once), so each f_s is a deterministic function of x,
    differentiable in x (one ``torch.func.jvp`` per call, batched over samples).
    The network is copied, so later training of the surrogate leaves the samples as they were.

    Args:
        la: a fitted :class:`~marglik.Laplace` posterior over whole weight tensors.
        n_samples: S.
        generator: for reproducible draws.
    """

    def __init__(self, la: Laplace, n_samples: int, generator: torch.Generator | None = None):
        super().__init__()
        self.tangents = weight_perturbations(la, n_samples, generator)
        self.net = _frozen_copy(la.model)  # θ* of the copy: later training cannot move it
        params = dict(self.net.named_parameters())
        self.params = {n: params[n] for n in self.tangents}
        self.n_samples = n_samples

    def _jvp(self, x: Tensor, tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(self.net, p, (x,))

        return jvp(f, (self.params,), (tangent,))

    def forward(self, X: Tensor) -> Tensor:
        """All samples at all points: X (..., d) → (S, ..., D)."""
        X = check_candidates(X[..., None, :])[..., 0, :]
        lead, d = X.shape[:-1], X.shape[-1]
        x = X.reshape(-1, d).to(next(iter(self.params.values())).dtype)
        f, Jv = vmap(lambda t: self._jvp(x, t))(self.tangents)
        out = f + Jv  # (S, N, D); f is the same for every s
        return out.reshape(self.n_samples, *lead, -1)

    def paired(self, X: Tensor) -> Tensor:
        """Sample s at its own points: X (..., S, d) → (..., S, D) with entry s = f_s(X[..., s, :]).

        The sample-then-optimise path maximises all S samples at once through this (their sum is
        separable, so one joint optimisation over the S points finds each sample's maximiser).
        """
        X = check_candidates(X)
        if X.shape[-2] != self.n_samples:
            raise ValueError(f"X must have one point per sample in dimension -2 "
                             f"({self.n_samples}), got {tuple(X.shape)}")
        lead, d = X.shape[:-2], X.shape[-1]
        x = X.reshape(-1, self.n_samples, d).transpose(0, 1)  # (S, B, d)
        x = x.to(next(iter(self.params.values())).dtype)
        f, Jv = vmap(self._jvp)(x, self.tangents)  # (S, B, D)
        return (f + Jv).transpose(0, 1).reshape(*lead, self.n_samples, -1)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode without gradients to its weights."""
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net

"""Hyperparameters given as Python floats keep the model's precision (found by
``benchmarks/functional_agreement.py``).

A float64 model with torch's default dtype left at float32 (what a user gets without
``torch.set_default_dtype``): σ = 0.7 and δ = 0.3 are not float32 numbers. The posterior
should compute in float64 to rounding, as laplace-torch 0.3 does on the same problem (1e-13),
but ``check_sigma`` (``likelihoods/gaussian.py``) and ``check_precision``
(``posterior/prior.py``) turn a Python float into a tensor of the *default* dtype, so σ and δ
are rounded to float32 and the predictive covariance is off by about 1e-8 relative. The
conftest sets the default dtype to float64 for every other test, which hides this.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import marglik

SIGMA, DELTA = 0.7, 0.3


@pytest.fixture
def float32_default():
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float64)


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return model, x, y, xt


def dense_covariance(model, x, xt):
    """J* (δI + JᵀJ/σ²)⁻¹ J*ᵀ per test input, from torch.func Jacobians and an explicit inverse."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def jac(inputs):
        def f(flat):
            parts = dict(zip(names, (t.reshape(s) for t, s in
                                     zip(flat.split([s.numel() for s in shapes]), shapes))))
            return functional_call(model, parts, (inputs,)).reshape(-1)
        return jacrev(f)(theta)

    J, Jt = jac(x), jac(xt)
    prec = DELTA * torch.eye(theta.numel(), dtype=torch.float64) + J.T @ J / SIGMA**2
    return torch.einsum("bp,pq,bq->b", Jt, torch.linalg.inv(prec), Jt)


@pytest.mark.xfail(strict=True, reason="σ and δ given as floats are stored in the default "
                   "dtype (float32), not the model's: ~1e-8 relative error in float64")
@pytest.mark.parametrize("kind", ["Laplace", "FunctionalLaplace"])
def test_float_hyperparameters_keep_float64(float32_default, kind):
    model, x, y, xt = problem()
    kwargs = {"hessian_structure": "full"} if kind == "Laplace" else {}
    la = getattr(marglik, kind)(model, "regression", prior_precision=DELTA,
                                sigma_noise=SIGMA, **kwargs)
    la.fit([(x, y)])
    _, var = la(xt)
    ref = dense_covariance(model, x, xt)
    assert torch.allclose(var.reshape(-1), ref, rtol=1e-12, atol=0)

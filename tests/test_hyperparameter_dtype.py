"""Hyperparameters given as Python floats keep the model's precision (found by
``benchmarks/functional_agreement.py``).

A float64 model with torch's default dtype left at float32 (what a user gets without
``torch.set_default_dtype``): σ = 0.7 and δ = 0.3 are not float32 numbers. The posterior
computes in float64 to rounding, as laplace-torch 0.3 does on the same problem (1e-13): Python
numbers become tensors of the *model's* dtype (``BasePosterior._number_as_tensor``), not of the
default dtype, which rounded them to float32 (about 1e-8 relative error in the predictive
covariance) until 2026-12-06. The conftest sets the default dtype to float64 for every other
test, which hid this.
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


@pytest.mark.parametrize("kind", ["Laplace", "FunctionalLaplace"])
def test_float_hyperparameters_take_the_model_dtype(float32_default, kind):
    """Python floats become tensors of the model's dtype (float32 model: float32, float64:
    float64), at construction, through the setters and through log_marginal_likelihood."""
    model, x, y, _ = problem()
    for dtype in (torch.float32, torch.float64):
        la = getattr(marglik, kind)(model.to(dtype), "regression", prior_precision=DELTA,
                                    sigma_noise=SIGMA)
        assert la.prior_precision.dtype == dtype and la.sigma_noise.dtype == dtype
        la.fit([(x.to(dtype), y.to(dtype))])
        la.prior_precision, la.sigma_noise = 0.5, 0.9
        assert la.prior_precision.dtype == dtype and la.sigma_noise.dtype == dtype
        assert la.sigma_noise.item() == torch.tensor(0.9, dtype=dtype).item()
        value = la.log_marginal_likelihood(DELTA, SIGMA)  # floats: accepted and kept
        assert value.dtype == dtype
        assert la.prior_precision.dtype == dtype and la.sigma_noise.dtype == dtype
        if dtype == torch.float64:  # kept exactly, not rounded to float32
            assert float(la.prior_precision) == DELTA and float(la.sigma_noise) == SIGMA
        expected = la.log_marginal_likelihood(torch.tensor(DELTA, dtype=dtype),
                                              torch.tensor(SIGMA, dtype=dtype))
        assert value.item() == expected.item()


def test_sequences_take_the_model_dtype_and_bad_types_get_a_clear_error(float32_default):
    model, x, y, _ = problem()
    la = marglik.Laplace(model, "regression", prior_precision=[0.3, 1.0, 2.0, 3.0])
    assert la.prior_precision.dtype == torch.float64  # the model's, not the default float32
    assert la.prior_precision[0].item() == 0.3
    with pytest.raises(TypeError, match="prior_precision must be a number"):
        marglik.Laplace(model, "regression", prior_precision="large")

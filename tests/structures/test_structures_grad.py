"""Autograd flows to the hyperparameters: analytic trace forms and finite-difference gradchecks."""

import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _leaves(problem):
    scale = problem.scale.clone().requires_grad_(True)
    theta = problem.theta.clone().requires_grad_(True)
    return scale, theta


def test_logdet_gradients_match_trace_forms(problem):
    """d log det P / d scale = tr(P⁻¹ H); d log det P / d delta_i = (P⁻¹)_ii."""
    block, Sigma, H = problem.case.block, problem.Sigma, problem.case.H
    scale, theta = _leaves(problem)
    g_scale, g_theta = torch.autograd.grad(
        block.logdet(scale, problem.delta_of(theta)), (scale, theta)
    )
    assert_close(g_scale, torch.trace(Sigma @ H), **TOL)
    # Chain rule through the (trivial) map theta -> delta, weighted by diag(P⁻¹) from the oracle.
    theta_ = theta.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        (problem.delta_of(theta_).expand(problem.case.p) * torch.diagonal(Sigma)).sum(), theta_
    )
    assert_close(g_theta, expected, **TOL)
    if problem.kind == "scalar":
        assert_close(g_theta, torch.trace(Sigma), **TOL)


def test_inv_quad_gradient_matches_analytic(problem):
    """d (J P⁻¹ Jᵀ) / d scale = −J P⁻¹ H P⁻¹ Jᵀ (summed against a weight matrix)."""
    block, Sigma, H, p = problem.case.block, problem.Sigma, problem.case.H, problem.case.p
    J = torch.randn(3, p, dtype=torch.float64)
    Wt = torch.randn(3, 3, dtype=torch.float64)
    scale, theta = _leaves(problem)
    out = (block.inv_quad(J, scale, problem.delta_of(theta)) * Wt).sum()
    (g_scale,) = torch.autograd.grad(out, scale)
    assert_close(g_scale, -((J @ Sigma @ H @ Sigma @ J.T) * Wt).sum(), **TOL)


def test_gradcheck_all_methods(problem):
    block, p = problem.case.block, problem.case.p
    J = torch.randn(2, 3, p, dtype=torch.float64)
    v = torch.randn(2, p, dtype=torch.float64)
    eps = torch.randn(3, p, dtype=torch.float64)
    scale, theta = _leaves(problem)

    def fn(scale, theta):
        delta = problem.delta_of(theta)
        return (
            block.logdet(scale, delta),
            block.inv_quad(J, scale, delta),
            block.solve(v, scale, delta),
            block.sample(eps, scale, delta),
            block.covariance_diag(scale, delta),
        )

    assert gradcheck(fn, (scale, theta), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_kronecker_constant_vector_gradient_goes_to_first_entry():
    from marglik.structures import Kronecker

    g = torch.Generator().manual_seed(11)
    G = torch.randn(2, 2, generator=g, dtype=torch.float64)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    block = Kronecker(G @ G.T, A @ A.T)
    scale = torch.tensor(0.9, dtype=torch.float64)
    delta = torch.full((6,), 0.7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(block.logdet(scale, delta), delta)
    Sigma = torch.linalg.inv(
        scale * torch.kron(G @ G.T, A @ A.T) + 0.7 * torch.eye(6, dtype=torch.float64)
    )
    expected = torch.zeros(6, dtype=torch.float64)
    expected[0] = torch.trace(Sigma)
    assert_close(grad, expected, **TOL)

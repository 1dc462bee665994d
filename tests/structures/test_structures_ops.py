"""Every structure against dense oracles: curvature, logdet, quadratic forms, solves, samples."""

import torch
from torch.testing import assert_close

TOL = {"rtol": 1e-10, "atol": 1e-12}


def test_to_dense_and_diag(case):
    assert case.block.size == case.p
    assert case.block.dtype == torch.float64
    assert case.block.device == torch.device("cpu")
    assert_close(case.block.to_dense(), case.H, **TOL)
    assert_close(case.block.diag(), torch.diagonal(case.H), **TOL)


def test_matvec_batched(case):
    v = torch.randn(3, 2, case.p, dtype=torch.float64)
    assert_close(case.block.matvec(v), v @ case.H.T, **TOL)
    assert_close(case.block.matvec(v[0, 0]), case.H @ v[0, 0], **TOL)


def test_logdet(problem):
    block = problem.case.block
    sign, expected = torch.linalg.slogdet(problem.P)
    assert sign == 1
    out = block.logdet(problem.scale, problem.delta)
    assert out.shape == ()
    assert_close(out, expected, **TOL)


def test_inv_quad_batched(problem):
    block, p = problem.case.block, problem.case.p
    J = torch.randn(3, 2, 4, p, dtype=torch.float64)
    out = block.inv_quad(J, problem.scale, problem.delta)
    assert out.shape == (3, 2, 4, 4)
    assert_close(out, J @ problem.Sigma @ J.mT, **TOL)
    # Unbatched (K, p) input too.
    assert_close(block.inv_quad(J[1, 0], problem.scale, problem.delta), out[1, 0], **TOL)


def test_solve(problem):
    block, p = problem.case.block, problem.case.p
    v = torch.randn(3, 2, p, dtype=torch.float64)
    out = block.solve(v, problem.scale, problem.delta)
    assert out.shape == v.shape
    assert_close(out, v @ problem.Sigma, **TOL)
    assert_close(block.solve(v[2, 1], problem.scale, problem.delta), problem.Sigma @ v[2, 1], **TOL)
    # solve inverts the precision: P (P⁻¹ v) = v.
    assert_close(out @ problem.P.T, v, **TOL)


def test_sample_square_root_is_exact(problem):
    """With eps = I the rows are L e_i, so Xᵀ X = L Lᵀ must equal P⁻¹ exactly."""
    block, p = problem.case.block, problem.case.p
    X = block.sample(torch.eye(p, dtype=torch.float64), problem.scale, problem.delta)
    assert X.shape == (p, p)
    assert_close(X.T @ X, problem.Sigma, **TOL)
    # The map is linear in eps: other draws are eps @ Lᵀ with the same L.
    eps = torch.randn(6, p, dtype=torch.float64)
    assert_close(block.sample(eps, problem.scale, problem.delta), eps @ X, **TOL)


def test_covariance_diag(problem):
    out = problem.case.block.covariance_diag(problem.scale, problem.delta)
    assert_close(out, torch.diagonal(problem.Sigma), **TOL)


def test_dense_precision_and_covariance(problem):
    block = problem.case.block
    assert_close(block.precision_dense(problem.scale, problem.delta), problem.P, **TOL)
    assert_close(block.covariance_dense(problem.scale, problem.delta), problem.Sigma, **TOL)


def test_zero_scale_leaves_prior_only(case):
    """scale = 0 (e.g. infinite temperature): P = diag(delta)."""
    delta = case.expand(case.theta)
    zero = torch.tensor(0.0, dtype=torch.float64)
    J = torch.randn(2, case.p, dtype=torch.float64)
    assert_close(case.block.logdet(zero, delta), torch.log(delta).sum(), **TOL)
    assert_close(case.block.inv_quad(J, zero, delta), (J / delta) @ J.T, **TOL)


def test_python_numbers_and_one_element_tensors_are_scalars(case):
    J = torch.randn(2, case.p, dtype=torch.float64)
    expected = case.block.inv_quad(
        J, torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    )
    assert_close(case.block.inv_quad(J, 2.0, 0.5), expected, **TOL)
    one = torch.tensor([0.5], dtype=torch.float64)
    assert_close(
        case.block.inv_quad(J, torch.tensor([2.0], dtype=torch.float64), one), expected, **TOL
    )

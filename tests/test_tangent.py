"""The tangent model's evidence at its own mode (posterior/tangent.py) against dense float64 maths.

References: per-sample Jacobians J from ``tests/oracle.py``; the tangent model h = J t; its mode
by Newton's method with explicit matrices (classification) or in closed form (regression); the
exact evidence of the linear-Gaussian model log N(y | J μ0, σ²I + J P0⁻¹ Jᵀ).
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.subsets import select_subset
from marglik.posterior.tangent import tangent_mode, tangent_outputs
from marglik.posterior.tangent_blocks import block_mode, block_outputs
from tests import oracle

pytestmark = pytest.mark.filterwarnings("ignore:.*(silent|fell back|KFAC).*:UserWarning")


def _net(seed: int = 0, d_in: int = 3, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


def _classification(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def _regression(n: int = 30, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=X.dtype)
    return X, y


def _loader(X, y, batch_size=16):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def _newton_mode(J, y, delta, n_classes, iters=50):
    """argmin_t Σ CE(y, J t) + ½ δ‖t‖² by Newton's method with explicit matrices."""
    t = torch.zeros(J.shape[-1], dtype=J.dtype)
    for _ in range(iters):
        h = torch.einsum("ndp,p->nd", J, t)
        p = h.softmax(-1)
        g = torch.einsum("ndp,nd->p", J, p - nn.functional.one_hot(y, n_classes)) + delta * t
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        H = torch.einsum("ndp,nde,neq->pq", J, Lam, J) + torch.diag(delta.expand(t.shape))
        t = t - torch.linalg.solve(H, g)
    return t


@pytest.mark.parametrize("subset", ["all", "last_layer", "mask"])
def test_tangent_outputs_are_the_jacobian_times_t(subset):
    model = _net()
    X, _ = _classification()
    if subset == "mask":
        mask = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
        mask[::3] = True
        sub = select_subset(model, "subnetwork", mask)
    else:
        sub = select_subset(model, "all" if subset == "all" else "subnetwork",
                            None if subset == "all" else ["2.weight", "2.bias"])
    J = oracle.jacobians(model, X)
    if sub.index is not None:
        J = J[..., sub.index]
    elif subset == "last_layer":
        J = J[..., -18:]
    t = torch.randn(sub.size, dtype=torch.float64)
    h = tangent_outputs(model, sub, t)(X)
    torch.testing.assert_close(h, torch.einsum("ndp,p->nd", J, t), rtol=1e-12, atol=1e-12)


def test_tangent_mode_is_the_convex_minimiser():
    model = _net()
    X, y = _classification()
    sub = select_subset(model, "all")
    delta = torch.tensor(0.7, dtype=torch.float64)
    lik = marglik.likelihoods.get_likelihood("classification")
    t, info = tangent_mode(model, sub, lik, _loader(X, y), delta, torch.tensor(0.0),
                           torch.zeros(sub.size, dtype=torch.float64), tol=1e-10)
    ref = _newton_mode(oracle.jacobians(model, X), y, delta, 3)
    torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-7)
    assert info["gradient"] < 1e-6  # float64 floor of the line search on a flat objective


def test_tangent_mode_with_precisions_many_orders_apart():
    """A group the evidence switches off (δ ~ 1e12 beside δ ~ 0.5) once sent L-BFGS in t to
    overflowing outputs; the whitened solve finds the same mode as Newton's method."""
    model = _net()
    X, y = _classification()
    sub = select_subset(model, "all")
    delta = torch.full((sub.size,), 0.5, dtype=torch.float64)
    delta[:15] = 1e12  # the first layer's weights
    delta[20:25] = 3e5
    lik = marglik.likelihoods.get_likelihood("classification")
    t, _ = tangent_mode(model, sub, lik, _loader(X, y), delta, torch.tensor(0.0),
                        torch.zeros(sub.size, dtype=torch.float64), tol=1e-10)
    ref = _newton_mode(oracle.jacobians(model, X), y, delta, 3)
    torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-8)


def test_fit_at_a_tangent_point_matches_dense_maths():
    model = _net()
    X, y = _classification()
    t = 0.3 * torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    la = marglik.Laplace(model, "classification", hessian_structure="full")
    la.fit(_loader(X, y), tangent=t)
    J = oracle.jacobians(model, X)
    h = torch.einsum("ndp,p->nd", J, t)
    Lam = oracle.output_hessians(oracle.categorical_nll, h, y)
    H = torch.einsum("ndp,nde,neq->pq", J, Lam, J)
    torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
    delta = torch.tensor(2.0, dtype=torch.float64)
    log_lik = -oracle.categorical_nll(h, y)
    ref = oracle.laplace_evidence(log_lik, t, H, delta)
    torch.testing.assert_close(la.log_marginal_likelihood(delta), ref, rtol=1e-10, atol=1e-10)
    # the predictive mean stays the network's
    torch.testing.assert_close(la.mean, torch.cat([p.detach().flatten()
                                                   for p in model.parameters()]))


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_tangent_evidence_is_stationary_for_classification(structure):
    """At the end: t is the tangent mode for the final δ, and ∂ log Z / ∂ log δ = 0 there."""
    model = _net()
    X, y = _classification()
    la = marglik.Laplace(model, "classification", hessian_structure=structure)
    la.fit(_loader(X, y))
    hist = la.optimize_prior_precision(method="tangent", train_loader=_loader(X, y),
                                       n_steps=300, prior_structure="scalar",
                                       tangent_search="full")
    delta = la.prior_precision
    ref_t = _newton_mode(oracle.jacobians(model, X), y, delta, 3)
    torch.testing.assert_close(la.tangent, ref_t, rtol=1e-3, atol=1e-4)
    log_delta = delta.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(log_delta.exp()), log_delta)
    assert abs(grad.item()) < 1e-3
    assert len(hist["log_marglik"]) < 50  # settled before the round limit (no warning)
    assert len(hist["mode_evaluations"]) == len(hist["log_marglik"])
    assert all(e >= 1 for e in hist["mode_evaluations"])
    # and the δ it finds is far above the network-mode evidence's (the point of the method)
    la2 = marglik.Laplace(model, "classification", hessian_structure=structure)
    la2.fit(_loader(X, y)).optimize_prior_precision(method="marglik", prior_structure="scalar",
                                                    n_steps=300)
    assert delta > la2.prior_precision


def test_tangent_evidence_is_the_exact_linear_gaussian_evidence():
    """Regression: the tangent model is linear-Gaussian, its Laplace evidence exact; the δ and σ
    found maximise log N(y | 0, σ²I + δ⁻¹ J Jᵀ)."""
    model = _net(d_out=1)
    X, y = _regression()
    la = marglik.Laplace(model, "regression", hessian_structure="full")
    la.fit(_loader(X, y))
    hist = la.optimize_prior_precision(method="tangent", train_loader=_loader(X, y),
                                       tune_sigma=True, tangent_search="full")
    assert len(hist["log_marglik"]) < 50  # settled before the round limit (no warning)
    J = oracle.jacobians(model, X)[:, 0, :]

    def exact(log_delta, log_sigma):
        cov = torch.exp(2 * log_sigma) * torch.eye(len(y), dtype=y.dtype) \
            + J @ J.T / torch.exp(log_delta)
        return oracle.gaussian_log_density(y[:, 0], torch.zeros(len(y), dtype=y.dtype), cov)

    ld = la.prior_precision.log().clone().requires_grad_(True)
    ls = la.sigma_noise.log().clone().requires_grad_(True)
    value = exact(ld, ls)
    grads = torch.autograd.grad(value, [ld, ls])
    assert max(abs(g.item()) for g in grads) < 1e-3
    # the Laplace evidence at the mode equals the exact one
    torch.testing.assert_close(la.log_marginal_likelihood(), value.detach(), rtol=1e-6,
                               atol=1e-6)
    # mode in closed form: t* = (JᵀJ/σ² + δI)⁻¹ Jᵀy/σ²
    s2, d = la.sigma_noise**2, la.prior_precision
    t_ref = torch.linalg.solve(J.T @ J / s2 + d * torch.eye(J.shape[1], dtype=J.dtype),
                               J.T @ y[:, 0] / s2)
    torch.testing.assert_close(la.tangent, t_ref, rtol=1e-3, atol=1e-5)


def _blocks(model):
    sizes = [p.numel() for p in model.parameters()]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def test_block_outputs_are_the_jacobian_times_each_tensor():
    model = _net()
    X, y = _classification()
    out, block = block_outputs(model, select_subset(model, "all"), _loader(X, y))
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(block, _blocks(model))
    J = oracle.jacobians(model, X)
    ref = torch.stack([torch.einsum("ndp,p->nd", J, torch.where(block == k, theta, 0.0))
                       for k in range(4)], -1)
    torch.testing.assert_close(torch.cat([g for g, _ in out]), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([t for _, t in out]), y, rtol=0, atol=0)
    # the span holds the network itself: its last layer's weight and bias columns sum to f
    torch.testing.assert_close(ref[..., 2] + ref[..., 3], model(X).detach(), rtol=1e-12,
                               atol=1e-12)


def test_block_outputs_of_a_subnetwork_drop_unselected_tensors():
    model = _net()
    X, y = _classification()
    mask = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
    mask[20:23] = True  # first layer's bias
    mask[-3:] = True  # last layer's bias
    out, block = block_outputs(model, select_subset(model, "subnetwork", mask), _loader(X, y))
    assert block.tolist() == [0, 0, 0, 1, 1, 1] and out[0][0].shape[-1] == 2


def test_block_mode_regression_in_closed_form():
    """Gaussian: c* = (GᵀG/σ² + δ diag‖θ_k‖²)⁻¹ (Gᵀy/σ² + δ μ0 Σθ_k), G[:, k] = J θ*_k."""
    model = _net(d_out=1)
    X, y = _regression()
    sub = select_subset(model, "all")
    out, block = block_outputs(model, sub, _loader(X, y))
    G = torch.cat([o for o, _ in out])[:, 0, :]
    theta = sub.vector(model).detach()
    delta, mu0, sigma = torch.tensor(3.0, dtype=X.dtype), torch.tensor(0.05, dtype=X.dtype), 0.3
    lik = marglik.likelihoods.get_likelihood("regression", sigma_noise=sigma)
    c, _ = block_mode(lik, out, theta, block, delta, mu0, torch.ones(4, dtype=X.dtype))
    sq = torch.zeros(4, dtype=X.dtype).index_add_(0, block, theta.square())
    sums = torch.zeros(4, dtype=X.dtype).index_add_(0, block, theta)
    ref = torch.linalg.solve(G.T @ G / sigma**2 + delta * torch.diag(sq),
                             G.T @ y[:, 0] / sigma**2 + delta * mu0 * sums)
    torch.testing.assert_close(c, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_scales_search_ends_at_its_fixed_point(structure):
    """tangent_search="scales" (the default): t = c[block] ⊙ θ* with c the mode over the
    tensors' scales for the final δ, the curvature fitted at J t, ∂ log Z / ∂ log δ = 0 there,
    and a δ far above the evidence at θ*."""
    model = _net()
    X, y = _classification()
    la = marglik.Laplace(model, "classification", hessian_structure=structure)
    la.fit(_loader(X, y))
    hist = la.optimize_prior_precision(prior_structure="scalar")
    assert len(hist["log_marglik"]) < 50 and all(e == 0 for e in hist["mode_evaluations"])
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    block = _blocks(model)
    c = torch.tensor(hist["scales"][-1], dtype=X.dtype)
    torch.testing.assert_close(la.tangent, c[block] * theta, rtol=1e-12, atol=1e-12)
    J = oracle.jacobians(model, X)
    delta = la.prior_precision.detach()
    cc = c.clone().requires_grad_(True)  # the objective's slope in c (dense maths)
    t = cc[block] * theta
    objective = oracle.categorical_nll(torch.einsum("ndp,p->nd", J, t), y).sum() \
        + 0.5 * delta * t.square().sum()
    (slope,) = torch.autograd.grad(objective, cc)
    # c is the mode for the δ before the last round's step, which moved δ by < 1e-4 (relative)
    prior_slope = delta * c * torch.zeros(4, dtype=X.dtype).index_add_(0, block, theta.square())
    assert (slope.abs() <= 1e-3 * prior_slope.abs() + 1e-8).all()
    if structure == "full":
        h = torch.einsum("ndp,p->nd", J, c[block] * theta)
        Lam = oracle.output_hessians(oracle.categorical_nll, h, y)
        torch.testing.assert_close(la.H.to_dense(), torch.einsum("ndp,nde,neq->pq", J, Lam, J),
                                   rtol=1e-10, atol=1e-12)
    log_delta = delta.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(log_delta.exp()), log_delta)
    assert abs(grad.item()) < 1e-3
    la2 = marglik.Laplace(model, "classification", hessian_structure=structure)
    la2.fit(_loader(X, y)).optimize_prior_precision(method="marglik", prior_structure="scalar",
                                                    n_steps=300)
    assert delta > la2.prior_precision


def test_tangent_state_round_trip_and_model_untouched():
    model = _net()
    X, y = _classification()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    la = marglik.Laplace(model, "classification", hessian_structure="kron").fit(_loader(X, y))
    la.optimize_prior_precision(method="tangent", train_loader=_loader(X, y), n_steps=50)
    assert model.training and all(torch.equal(before[k], v)
                                  for k, v in model.state_dict().items())
    la2 = marglik.Laplace(model, "classification", hessian_structure="kron")
    la2.load_state_dict(la.state_dict())
    torch.testing.assert_close(la2.tangent, la.tangent)
    torch.testing.assert_close(la2.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_tangent_bad_input():
    model = _net()
    X, y = _classification()
    la = marglik.Laplace(model, "classification", hessian_structure="kron")
    la.fit(iter(_loader(X, y)))  # a one-shot iterator: not kept
    assert la.train_loader is None
    with pytest.raises(ValueError, match="train_loader"):
        la.optimize_prior_precision(method="tangent")
    with pytest.warns(UserWarning, match="does not hold"):  # the default falls back, loudly
        hist = la.optimize_prior_precision()
    assert "scales" not in hist
    la.fit(_loader(X, y))
    with pytest.raises(ValueError, match="search must be"):
        la.optimize_prior_precision(tangent_search="ray")
    with pytest.raises(ValueError, match="tune_sigma needs a regression"):
        la.optimize_prior_precision(tune_sigma=True)
    loaded = marglik.Laplace(model, "classification", hessian_structure="kron")
    loaded.load_state_dict(la.state_dict())
    assert loaded.train_loader is None
    with pytest.warns(UserWarning, match="does not hold"):
        loaded.optimize_prior_precision()
    with pytest.raises(ValueError, match="tangent must have shape"):
        la.fit(_loader(X, y), tangent=torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        la.fit(_loader(X, y), tangent=torch.full((la.n_params,), math.nan))
    with pytest.raises(ValueError, match="create_graph"):
        la.fit(_loader(X, y), create_graph=True, tangent=torch.zeros(la.n_params))


def test_aitken_extrapolates_a_geometric_sequence_exactly_and_only_where_it_contracts():
    from marglik.posterior.tangent import _aitken

    limit, r = torch.tensor([2.0, -1.0, 5.0]), torch.tensor([0.5, 0.8, 1.2])
    x = [limit - 3.0 * r**k for k in range(3)]
    out = _aitken(*x)
    torch.testing.assert_close(out[:2], limit[:2])  # contracting: the limit
    assert out[2] == x[2][2]  # expanding (ratio 1.2): left alone


def test_tangent_mode_streams_large_data_with_the_same_result(monkeypatch):
    import marglik.posterior.tangent as tangent

    model = _net()
    X, y = _classification()
    sub = select_subset(model, "all")
    lik = marglik.likelihoods.get_likelihood("classification")
    args = (model, sub, lik, _loader(X, y), torch.tensor(0.7, dtype=torch.float64),
            torch.tensor(0.0), torch.zeros(sub.size, dtype=torch.float64))
    kept, _ = tangent_mode(*args)
    monkeypatch.setattr(tangent, "REPLAY_BYTES", 0)
    streamed, _ = tangent_mode(*args)
    torch.testing.assert_close(streamed, kept, rtol=1e-12, atol=1e-12)


def test_tangent_evidence_warns_when_it_does_not_settle():
    from marglik.posterior.tangent import optimize_tangent_evidence

    model = _net()
    X, y = _classification()
    la = marglik.Laplace(model, "classification", hessian_structure="diag").fit(_loader(X, y))
    with pytest.warns(UserWarning, match="did not settle in 1 rounds"):
        optimize_tangent_evidence(la, _loader(X, y), max_rounds=1)


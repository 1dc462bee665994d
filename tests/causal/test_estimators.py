"""Estimators: log-likelihoods equal torch's Normal at the fitted parameters; solvers agree."""

import numpy as np
import pytest
import torch

from marglik.applications.causal.estimators import (
    NeuralEstimator,
    SplineEstimator,
    fit_jointly,
    gaussian_log_lik,
    make_estimator,
    mlp_nll_grads,
    standardise,
)

FAST_NN = {"steps": 300}


def normal_log_prob(mu, var, y):
    dist = torch.distributions.Normal(torch.as_tensor(mu), torch.as_tensor(var).sqrt())
    return dist.log_prob(torch.as_tensor(y)).numpy()


@pytest.mark.parametrize("homoscedastic", [False, True])
@pytest.mark.parametrize("name", ["spline", "nn"])
def test_log_lik_matches_torch_normal(pair, name, homoscedastic):
    x, y = map(standardise, pair)
    options = FAST_NN if name == "nn" else {}
    est = make_estimator(name, homoscedastic, seed=0, **options).fit(x, y)
    mu, var = est.mean_variance(x)
    assert (var > 0).all()
    np.testing.assert_allclose(est.log_lik(x, y), normal_log_prob(mu, var, y), rtol=1e-10)
    np.testing.assert_allclose(est.residuals(x, y), (y - mu) / np.sqrt(var))
    if homoscedastic:
        np.testing.assert_allclose(var, var[0])
    # a fitted model beats the standard normal it started from
    assert est.log_lik(x, y).mean() > normal_log_prob(0.0, 1.0, y).mean() + 0.3


def test_standardise_is_numpys_population_standardisation():
    rng = np.random.default_rng(0)
    v = 7 * rng.normal(size=1000) + 3
    np.testing.assert_array_equal(standardise(v), (v - v.mean()) / v.std())  # bit for bit
    ints = standardise(list(range(10)))
    assert ints.dtype == np.float64 and abs(ints.mean()) < 1e-12 and ints.std() == pytest.approx(1)


def test_gaussian_log_lik_natural_form():
    rng = np.random.default_rng(0)
    eta1, eta2, y = rng.normal(size=20), -rng.uniform(0.1, 2, size=20), rng.normal(size=20)
    literal = eta1 * y + eta2 * y**2 + eta1**2 / (4 * eta2) + 0.5 * np.log(-2 * eta2)
    np.testing.assert_allclose(gaussian_log_lik(eta1, eta2, y), literal - 0.5 * np.log(2 * np.pi))


def test_spline_solvers_reach_the_same_optimum(pair):
    x, y = map(standardise, pair)
    ridge = 1e-5  # the first-order solvers need thousands of iterations at ridges ≤ 1e-6
    newton = SplineEstimator(ridge=ridge).fit(x, y)
    lbfgs = SplineEstimator(ridge=ridge, solver="lbfgs").fit(x, y)
    bca = SplineEstimator(ridge=ridge, solver="bca", max_iter=300, tol=1e-12).fit(x, y)
    assert newton.n_iter_ < 30 and bca.n_iter_ > 1
    # block ascent converges slowly, and J is flat near the optimum: looser for it
    for other, gap, ll_gap in ((lbfgs, 1e-6, 1e-4), (bca, 3e-5, 2e-3)):
        assert abs(newton.objective_ - other.objective_) < gap
        assert newton.log_lik(x, y).mean() == pytest.approx(other.log_lik(x, y).mean(), abs=ll_gap)
        assert (other.w2_ >= 0).all()
    # Newton's answer is (projected-)stationary: no feasible ascent direction left
    assert newton.objective_ >= max(lbfgs.objective_, bca.objective_) - 1e-9
    assert (newton.w2_ >= 0).all()
    assert (newton.natural_parameters(x)[1] <= -newton.floor).all()  # η2 ≤ −ε


def test_spline_heteroscedastic_fit_recovers_noise_scale(pair):
    x, y = pair
    est = SplineEstimator().fit(x, y)  # raw scale: g(x) from 0.1 to 0.5
    _, var = est.mean_variance(np.array([-1.5, 1.5]))
    assert np.sqrt(var[0]) < 0.2 and 0.35 < np.sqrt(var[1]) < 0.7


def test_neural_estimator_is_seeded_and_leaves_global_rng(pair):
    x, y = map(standardise, pair)
    state = torch.random.get_rng_state()
    a = NeuralEstimator(seed=3, steps=50).fit(x, y).log_lik(x, y)
    assert torch.equal(state, torch.random.get_rng_state())
    b = NeuralEstimator(seed=3, steps=50).fit(x, y).log_lik(x, y)
    c = NeuralEstimator(seed=4, steps=50).fit(x, y).log_lik(x, y)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_names():
    with pytest.raises(ValueError, match="estimator"):
        make_estimator("gp")
    with pytest.raises(ValueError, match="solver"):
        SplineEstimator(solver="sgd")


@pytest.mark.parametrize("homoscedastic", [False, True])
def test_neural_estimator_with_laplace_evidence(pair, homoscedastic):
    x, y = (v[:250] for v in map(standardise, pair))
    est = NeuralEstimator(homoscedastic=homoscedastic, evidence=True, steps=200).fit(x, y)
    assert np.isfinite(est.log_marglik_)
    # the evidence pays for the complexity: below the training log-likelihood
    assert est.log_marglik_ < est.log_lik(x, y).mean()
    mu, var = est.mean_variance(x)
    np.testing.assert_allclose(est.log_lik(x, y), normal_log_prob(mu, var, y), rtol=1e-10)
    backward = NeuralEstimator(homoscedastic=homoscedastic, evidence=True, steps=200).fit(y, x)
    assert est.log_marglik_ > backward.log_marglik_  # the causal direction has more evidence


# ---- the spline's evidence and its choice of ridge ---------------------------------------------
def spline_evidence_brute_force(est: SplineEstimator, x, y) -> float:
    """Laplace log evidence per point from torch.func: dense Hessian of the log joint, slogdet."""
    Phi = torch.as_tensor(est._features(x))
    Psi, Y = Phi.abs(), torch.as_tensor(y)
    n, k = Phi.shape
    delta = n * est.ridge_  # prior precision of the full-data model

    def log_joint(w):
        eta1, eta2 = Phi @ w[:k], -(Psi @ w[k:] + est.floor)
        precision = -2 * eta2
        dist = torch.distributions.Normal(eta1 / precision, precision.rsqrt())
        return dist.log_prob(Y).sum() - 0.5 * delta * (w @ w)

    w = torch.as_tensor(np.concatenate([est.w1_, est.w2_]))
    sign, logdet = torch.linalg.slogdet(-torch.func.hessian(log_joint)(w))
    assert sign > 0
    return float((log_joint(w) + 0.5 * len(w) * np.log(delta) - 0.5 * logdet) / n)


@pytest.mark.parametrize("ridge", [1e-6, 1e-3])
def test_spline_evidence_matches_torch_func_hessian(pair, ridge):
    x, y = (v[:60] for v in map(standardise, pair))
    est = SplineEstimator(n_knots=4, degree=3, ridge=ridge).fit(x, y)  # 6 + 6 weights
    assert est.ridge_ == ridge
    assert est.log_evidence_ == pytest.approx(spline_evidence_brute_force(est, x, y), rel=1e-9)


def test_homoscedastic_spline_evidence_is_the_gaussian_marginal(pair):
    x, y = (v[:60] for v in map(standardise, pair))
    est = SplineEstimator(homoscedastic=True, n_knots=4, degree=3, ridge=1e-3).fit(x, y)
    # y ~ N(0, σ² I + α⁻¹ ΦΦᵀ) with α = n·ridge/σ², at the fitted σ²
    Phi, n = torch.as_tensor(est._features(x)), len(x)
    alpha = n * est.ridge_ / est.sigma2_
    cov = est.sigma2_ * torch.eye(n, dtype=Phi.dtype) + Phi @ Phi.T / alpha
    marginal = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=Phi.dtype), cov)
    assert est.log_evidence_ == pytest.approx(float(marginal.log_prob(torch.as_tensor(y))) / n)


@pytest.mark.parametrize("homoscedastic", [False, True])
def test_spline_picks_the_ridge_of_largest_evidence(pair, homoscedastic):
    x, y = map(standardise, pair)
    est = SplineEstimator(homoscedastic=homoscedastic).fit(x, y)
    grid, evidence = est.evidence_path_
    np.testing.assert_array_equal(grid, sorted(grid))
    assert est.ridge_ == grid[np.argmax(evidence)] and est.log_evidence_ == evidence.max()
    assert grid[0] < est.ridge_ < grid[-1]  # an interior optimum of the grid
    # the selected fit is the fit with that ridge given explicitly (warm- against cold-started
    # solves, which stop at a relative change of 1e-10 in the objective: per-point log densities
    # of order one agree to about 1e-7, not to rounding)
    fixed = SplineEstimator(homoscedastic=homoscedastic, ridge=est.ridge_).fit(x, y)
    np.testing.assert_allclose(est.log_lik(x, y), fixed.log_lik(x, y), rtol=1e-6, atol=1e-6)
    assert fixed.log_evidence_ == pytest.approx(est.log_evidence_, rel=1e-6)


def test_spline_ridge_follows_the_signal():
    """A wiggly, near-noiseless function needs large weights (a small ridge), a noisy line not."""
    rng = np.random.default_rng(1)
    x = standardise(rng.normal(size=500))
    wiggly = standardise(np.sin(3 * x) + 0.05 * rng.normal(size=500))
    noisy = standardise(0.3 * x + rng.normal(size=500))
    small = SplineEstimator().fit(x, wiggly).ridge_
    large = SplineEstimator().fit(x, noisy).ridge_
    assert small <= 1e-6 and large >= 1e-3


def test_spline_ridge_arguments():
    with pytest.raises(ValueError, match="positive"):
        SplineEstimator(ridge=0.0)
    with pytest.raises(ValueError, match="ridge_grid"):
        SplineEstimator(ridge_grid=())


# ---- the batched neural trainer ------------------------------------------------------------------
@pytest.mark.parametrize("homoscedastic", [False, True])
def test_mlp_gradients_match_autograd(homoscedastic):
    torch.manual_seed(0)
    B, H, n, out = 3, 7, 40, 1 if homoscedastic else 2
    shapes = [(B, H, 1), (B, H, 1), (B, out, H), (B, out, 1)] + ([(B,)] if homoscedastic else [])
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    X, Y = torch.randn(B, 1, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)
    nll, grads = mlp_nll_grads(params, X, Y)
    for b in range(B):  # the reference: NeuralEstimator's own loss through autograd
        est = NeuralEstimator(homoscedastic=homoscedastic, hidden=H, dtype=torch.float64)
        est._init(X[b, 0].numpy(), Y[b].numpy())
        with torch.no_grad():
            est.net_[0].weight.copy_(params[0][b])
            est.net_[0].bias.copy_(params[1][b, :, 0])
            est.net_[2].weight.copy_(params[2][b])
            est.net_[2].bias.copy_(params[3][b, :, 0])
        leaves = list(est.net_.parameters())
        if homoscedastic:
            est.log_sigma_ = params[4][b].clone().requires_grad_(True)
            leaves.append(est.log_sigma_)
        loss = est._nll(X[b, 0].reshape(-1, 1), Y[b])
        torch.testing.assert_close(nll[b], loss.detach(), rtol=1e-12, atol=1e-12)
        for g, ref in zip(grads, torch.autograd.grad(loss, leaves), strict=True):
            torch.testing.assert_close(g[b].reshape(ref.shape), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("homoscedastic", [False, True])
def test_joint_fit_equals_separate_fits(pair, homoscedastic):
    x, y = (v[:200] for v in map(standardise, pair))
    options = {"homoscedastic": homoscedastic, "steps": 60, "dtype": torch.float64}
    alone = [NeuralEstimator(**options).fit(a, b) for a, b in ((x, y), (y, x))]
    joint = fit_jointly([NeuralEstimator(**options) for _ in range(2)], [(x, y), (y, x)])
    for a, j, (u, v) in zip(alone, joint, ((x, y), (y, x)), strict=True):
        np.testing.assert_allclose(j.log_lik(u, v), a.log_lik(u, v), rtol=1e-10)


def test_neural_training_matches_autograd_adam(pair):
    """The closed-form trainer takes the steps of plain autograd + torch Adam on the same loss."""
    x, y = (v[:200] for v in map(standardise, pair))
    est = NeuralEstimator(steps=40, dtype=torch.float64).fit(x, y)
    ref = NeuralEstimator(dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ref.seed)
        X, Y = ref._init(x, y)
    optimiser = torch.optim.Adam(ref.net_.parameters(), lr=ref.lr)
    for _ in range(40):
        optimiser.zero_grad()
        ref._nll(X, Y).backward()
        optimiser.step()
    for p, q in zip(est.net_.parameters(), ref.net_.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-8, atol=1e-10)

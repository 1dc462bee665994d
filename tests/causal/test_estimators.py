"""Estimators: log-likelihoods equal torch's Normal at the fitted parameters; solvers agree."""

import numpy as np
import pytest
import torch

from marglik.causal.estimators import (
    NeuralEstimator,
    SplineEstimator,
    gaussian_log_lik,
    make_estimator,
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


def test_gaussian_log_lik_natural_form():
    rng = np.random.default_rng(0)
    eta1, eta2, y = rng.normal(size=20), -rng.uniform(0.1, 2, size=20), rng.normal(size=20)
    literal = eta1 * y + eta2 * y**2 + eta1**2 / (4 * eta2) + 0.5 * np.log(-2 * eta2)
    np.testing.assert_allclose(gaussian_log_lik(eta1, eta2, y), literal - 0.5 * np.log(2 * np.pi))


def test_spline_solvers_reach_the_same_optimum(pair):
    x, y = map(standardise, pair)
    ridge = 1e-5  # the first-order solvers need thousands of iterations at the default ridge
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

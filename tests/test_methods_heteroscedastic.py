"""Tests of marglik.applications.heteroscedastic (predictive of natural-parameter networks)."""

import math

import pytest
import torch
from torch import nn

from marglik.applications.heteroscedastic import (
    Standardisation,
    fit_heteroscedastic,
    heteroscedastic_predictive,
    mean_variance_network_to_natural,
)
from marglik.likelihoods.heteroscedastic import NaturalGaussian
from marglik.posterior import Laplace
from marglik.training import marglik_training


@pytest.fixture(autouse=True, scope="module")
def _float64_one_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def skafte(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = 2.5 + 10 * torch.rand(n, generator=g)
    y = x * torch.sin(x) + (0.1 + 0.5 * x.abs()) * torch.randn(n, generator=g)
    return x, y


@pytest.fixture(scope="module", params=["softplus", "exp"])
def fitted(request, _float64_one_thread):
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 60).unsqueeze(-1)
    y = torch.sin(2 * x) + 0.1 * (1 + x.abs()) * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2))
    lik = NaturalGaussian(request.param)
    loader = [(x, y)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        (-lik.log_prob(model(x), y).mean()).backward()
        opt.step()
    la = Laplace(model, lik, "all", "kron", prior_precision=torch.tensor([1.0, 2.0, 0.5, 3.0]))
    la.fit(loader)
    return la, model, lik, torch.linspace(-3, 3, 7).unsqueeze(-1)


def test_mean_and_aleatoric_at_map(fitted):
    la, model, lik, xt = fitted
    p = heteroscedastic_predictive(la, xt)
    with torch.no_grad():
        f = model(xt)
    eta1, eta2 = lik.natural_parameters(f)
    torch.testing.assert_close(p.mean, -eta1 / (2 * eta2))
    torch.testing.assert_close(p.aleatoric_var, -1 / (2 * eta2))
    torch.testing.assert_close(p.predictive_var, p.epistemic_var + p.aleatoric_var)
    assert p.mean.shape == p.epistemic_var.shape == (7,)


def test_epistemic_is_delta_method_of_output_covariance(fitted):
    la, model, lik, xt = fitted
    p = heteroscedastic_predictive(la, xt)
    f_mean, f_var = la(xt)

    def mu(f):  # f (2,) -> μ
        return lik.mean_variance(f.unsqueeze(0))[0].squeeze(0)

    g = torch.func.vmap(torch.func.jacrev(mu))(f_mean)  # (B, 2)
    expected = torch.stack([g[b] @ f_var[b] @ g[b] for b in range(len(g))])
    torch.testing.assert_close(p.epistemic_var, expected)
    assert (p.epistemic_var > 0).all()
    # the same as the GLM variance of μ linearised in θ: (∂μ/∂θ) Σ (∂μ/∂θ)ᵀ with the dense Σ
    params = dict(model.named_parameters())

    def mu_of_theta(theta, x):
        return lik.mean_variance(torch.func.functional_call(model, theta, (x.unsqueeze(0),)))[0]

    J = torch.func.vmap(torch.func.jacrev(mu_of_theta), in_dims=(None, 0))(params, xt)
    J = torch.cat([J[n].reshape(len(xt), -1) for n in params], 1)
    Sigma = la.posterior_covariance
    torch.testing.assert_close(p.epistemic_var, torch.einsum("bp,pq,bq->b", J, Sigma, J))


def test_log_prob_and_unit_rescaling(fitted):
    la, _, _, xt = fitted
    p = heteroscedastic_predictive(la, xt)
    y = torch.randn(7)
    normal = torch.distributions.Normal(p.mean, p.predictive_var.sqrt())
    torch.testing.assert_close(p.log_prob(y), normal.log_prob(y))
    torch.testing.assert_close(p.log_prob(y.unsqueeze(-1)), normal.log_prob(y))
    m, s = 5.0, 3.0
    q = heteroscedastic_predictive(la, xt, y_mean=m, y_std=s)
    torch.testing.assert_close(q.mean, m + s * p.mean)
    torch.testing.assert_close(q.epistemic_var, s**2 * p.epistemic_var)
    torch.testing.assert_close(q.aleatoric_var, s**2 * p.aleatoric_var)
    torch.testing.assert_close(q.log_prob(m + s * y), p.log_prob(y) - math.log(s))


def test_refit_on_rescaled_targets_rescales_predictive():
    x, y = skafte(80, seed=1)
    kw = dict(hidden=10, n_epochs=30, marglik_frequency=10, n_epochs_burnin=10,
              n_hypersteps=5)
    la, _, s = fit_heteroscedastic(x, y, **kw)
    la2, _, s2 = fit_heteroscedastic(x, 3 * y - 7, **kw)
    xt = torch.linspace(3, 12, 5)
    p = heteroscedastic_predictive(la, s.transform_x(xt[:, None]), s.y_mean, s.y_std)
    q = heteroscedastic_predictive(la2, s2.transform_x(xt[:, None]), s2.y_mean, s2.y_std)
    torch.testing.assert_close(q.mean, 3 * p.mean - 7)
    torch.testing.assert_close(q.epistemic_var, 9 * p.epistemic_var)
    torch.testing.assert_close(q.aleatoric_var, 9 * p.aleatoric_var)


def test_standardisation_uses_bessel_corrected_stds():
    x, y = skafte(50, seed=2)
    x = torch.stack([x, torch.ones_like(x)], -1)  # a constant feature is only centred
    s = Standardisation.fit(x, y)
    torch.testing.assert_close(s.x_mean, x.mean(0))
    torch.testing.assert_close(s.x_std, torch.stack([x[:, 0].std(), torch.tensor(1.0)]))
    assert s.y_mean.shape == s.y_std.shape == ()
    torch.testing.assert_close(s.y_std, y.std())
    torch.testing.assert_close(s.transform_y(y[:, None]), ((y - y.mean()) / y.std())[:, None])
    torch.testing.assert_close(s.transform_x(x), (x - s.x_mean) / s.x_std)


@pytest.mark.parametrize("positivity", ["softplus", "exp"])
def test_mean_variance_network_to_natural(positivity):
    mu, var = torch.tensor([-1.0, 0.0, 2.5]), torch.tensor([0.3, 1.0, 4.0])
    lik = NaturalGaussian(positivity)
    for kw in ({"var": var}, {"log_var": var.log()}):
        f = mean_variance_network_to_natural(mu, positivity=positivity, **kw)
        assert f.shape == (3, 2)
        m, v = lik.mean_variance(f)
        torch.testing.assert_close(m, mu)
        torch.testing.assert_close(v, var)
    with pytest.raises(ValueError):
        mean_variance_network_to_natural(mu)


def test_rejects_other_likelihoods():
    model = nn.Linear(1, 1)
    la = Laplace(model, "regression").fit([(torch.randn(5, 1), torch.randn(5, 1))])
    with pytest.raises(ValueError, match="NaturalGaussian"):
        heteroscedastic_predictive(la, torch.randn(3, 1))


def test_skafte_noise_grows_and_beats_homoscedastic():
    x, y = skafte(300, seed=0)
    xt, yt = skafte(1000, seed=1)
    kw = dict(n_epochs=300, marglik_frequency=25, n_epochs_burnin=25, n_hypersteps=20)
    la, _, s = fit_heteroscedastic(x, y, **kw)
    p = heteroscedastic_predictive(la, s.transform_x(xt[:, None]), s.y_mean, s.y_std)
    corr = torch.corrcoef(torch.stack([p.aleatoric_var.sqrt(), xt.abs()]))[0, 1]
    assert corr > 0.8
    # homoscedastic online evidence on the same standardised data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 50), nn.GELU(), nn.Linear(50, 1))
    data = [(s.transform_x(x[:, None]), s.transform_y(y[:, None]))]
    la_h, _, _ = marglik_training(model, data, "regression", "kron", "layerwise", lr=1e-2,
                                  lr_hyp=0.1, **kw)
    fm, fv = la_h(s.transform_x(xt[:, None]), pred_var=True)
    homo = torch.distributions.Normal(s.y_mean + s.y_std * fm[:, 0], s.y_std * fv[:, 0, 0].sqrt())
    assert p.log_prob(yt).mean() > homo.log_prob(yt).mean() + 0.05

"""The posterior interface: a new posterior gets the predictive and evidence optimisation for free.

A minimal function-space posterior (exact GP regression with the linear kernel k(x, x') = x·x'/δ,
i.e. Bayesian linear regression) implements :class:`marglik.Posterior` and nothing else; the
predictive (``post(x)``, ``pred_var``, ``joint``, the "nn" sampling predictive) and
``optimize_prior_precision`` must then work through the interface alone, against closed forms.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.likelihoods import Gaussian
from marglik.posterior import Posterior, Prior


class LinearGP(Posterior):
    """Exact posterior of f(x) = x·w, w ~ N(0, I/δ), y ~ N(f, σ²), in function space."""

    def __init__(self, model: nn.Linear, prior_precision=1.0, sigma_noise=1.0):
        self.model = model
        self.likelihood = Gaussian(sigma_noise)
        self.prior = Prior(prior_precision).bind(["weight"], [model.weight.numel()])
        self.X = self.y = None

    @property
    def is_fitted(self):
        return self.X is not None

    def fit(self, train_loader, progress=False, create_graph=False):
        X, y = zip(*train_loader)
        self.X, self.y = torch.cat(X), torch.cat(y).reshape(-1)
        self.n_data = len(self.y)
        return self

    def _gram(self, delta, sigma):
        return self.X @ self.X.T / delta + sigma**2 * torch.eye(self.n_data)

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
        delta = self.prior.precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        L = torch.linalg.cholesky(self._gram(delta, sigma))
        alpha = torch.cholesky_solve(self.y[:, None], L)[:, 0]
        return -0.5 * (self.y @ alpha) - L.diagonal().log().sum() - self.n_data * math.log(
            2 * math.pi) / 2

    def functional_moments(self, x, joint=False, chunk_size=None, create_graph=False,
                           backend="auto"):
        delta, sigma = self.prior.precision, self.sigma_noise
        k = x @ self.X.T / delta  # (B, N)
        G = self._gram(delta, sigma)
        mean = k @ torch.linalg.solve(G, self.y)
        cov = x @ x.T / delta - k @ torch.linalg.solve(G, k.T)
        if joint:
            return mean[:, None], cov
        return mean[:, None], cov.diagonal()[:, None, None]

    def function_samples(self, x, n_samples=100, generator=None, chunk_size=None):
        mean, cov = self.functional_moments(x, joint=True)
        L = torch.linalg.cholesky(cov + 1e-10 * torch.eye(len(x)))
        eps = torch.randn(n_samples, len(x), generator=generator)
        return (mean[:, 0] + eps @ L.T)[..., None]

    def state_dict(self):
        return {"X": self.X, "y": self.y, "prior": self.prior.state_dict()}

    def load_state_dict(self, state):
        self.X, self.y, self.n_data = state["X"], state["y"], len(state["y"])
        return self


def data(n=40, d=3):
    X = torch.randn(n, d)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(n)
    return X, y


def weight_space(X, y, delta, sigma, x):
    """Brute force: Σ = (XᵀX/σ² + δI)⁻¹, m = ΣXᵀy/σ²; f ~ N(x m, x Σ xᵀ)."""
    S = torch.linalg.inv(X.T @ X / sigma**2 + delta * torch.eye(X.shape[1]))
    m = S @ X.T @ y / sigma**2
    return x @ m, x @ S @ x.T


def test_predictive_works_through_the_interface():
    X, y = data()
    post = LinearGP(nn.Linear(3, 1, bias=False), prior_precision=2.0, sigma_noise=0.4)
    post.fit(DataLoader(TensorDataset(X, y), batch_size=16))
    x = torch.randn(5, 3)
    mean, cov = weight_space(X, y, 2.0, 0.4, x)
    f, var = post(x)  # the inherited __call__ -> marglik.predictive.predict
    torch.testing.assert_close(f[:, 0], mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var[:, 0, 0], cov.diagonal(), rtol=1e-9, atol=1e-10)
    _, var_y = post(x, pred_var=True)
    torch.testing.assert_close(var_y[:, 0, 0], cov.diagonal() + 0.16, rtol=1e-9, atol=1e-10)
    f_joint, joint = post(x, joint=True)
    torch.testing.assert_close(joint, cov, rtol=1e-9, atol=1e-10)
    assert f_joint.shape == (5,)


def test_sampling_predictive_works_through_the_interface():
    X, y = data()
    post = LinearGP(nn.Linear(3, 1, bias=False), 2.0, 0.4).fit([(X, y)])
    x = torch.randn(4, 3)
    mean, cov = weight_space(X, y, 2.0, 0.4, x)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    f, var = post(x, pred_type="nn", n_samples=n, generator=gen)
    std = cov.diagonal().sqrt()
    assert ((f[:, 0] - mean).abs() < 5 * std / math.sqrt(n)).all()  # 5 standard errors
    assert ((var[:, 0, 0] / cov.diagonal() - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_evidence_optimisation_works_through_the_interface():
    X, y = data()
    post = LinearGP(nn.Linear(3, 1, bias=False), 1.0, 1.0).fit([(X, y)])
    start = post.log_marginal_likelihood().item()
    post.optimize_prior_precision(tune_sigma=True, n_steps=400, lr=0.05)
    assert post.log_marginal_likelihood().item() > start
    # a stationary point of the closed-form evidence in (log δ, log σ)
    logs = torch.stack([post.prior_precision.log(), post.sigma_noise.log()]).requires_grad_(True)
    (grad,) = torch.autograd.grad(post.log_marginal_likelihood(*logs.exp()), logs)
    assert grad.abs().max() < 1e-3


def test_unfitted_posterior_and_laplace_is_a_posterior():
    post = LinearGP(nn.Linear(3, 1, bias=False))
    with pytest.raises(RuntimeError, match="not fitted"):
        post(torch.randn(2, 3))
    assert issubclass(marglik.Laplace, Posterior)

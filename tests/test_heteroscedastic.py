"""NaturalGaussian: log-density, η- and f-Hessians, factor and gradient against autograd oracles."""

import math

import pytest
import torch

from marglik.likelihoods import Likelihood, NaturalGaussian
from marglik.likelihoods.heteroscedastic import mean_variance_to_natural

HEADS = ["softplus", "exp"]


def nll_eta(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's NLL in natural parameters, written literally (the oracle)."""
    e1, e2 = eta[..., 0], eta[..., 1]
    log_normaliser = -(e1**2) / (4 * e2) - 0.5 * torch.log(-2 * e2) + 0.5 * math.log(2 * math.pi)
    return -e1 * y - e2 * y**2 + log_normaliser


def random_outputs(shape=(7, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(*shape, 2, generator=g, dtype=torch.float64) * 1.5
    y = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    return f, y


@pytest.mark.parametrize("positivity", HEADS)
def test_log_prob_matches_torch_normal(positivity):
    lik = NaturalGaussian(positivity)
    f, y = random_outputs()
    mu, var = lik.mean_variance(f)
    expected = torch.distributions.Normal(mu, var.sqrt()).log_prob(y).sum(-1)
    torch.testing.assert_close(lik.log_prob(f, y), expected)
    # (N, *S, 1) targets are accepted and give the same numbers
    torch.testing.assert_close(lik.log_prob(f, y.unsqueeze(-1)), expected)
    # and the literal natural-parameter formula agrees
    eta = torch.stack(lik.natural_parameters(f), -1)
    torch.testing.assert_close(-nll_eta(eta, y).sum(-1), expected)


@pytest.mark.parametrize("positivity", HEADS)
def test_head_conversions(positivity):
    lik = NaturalGaussian(positivity)
    f, _ = random_outputs()
    eta1, eta2 = lik.natural_parameters(f)
    assert (eta2 < 0).all()
    mu, var = lik.mean_variance(f)
    torch.testing.assert_close(mu, -eta1 / (2 * eta2))
    torch.testing.assert_close(var, -1 / (2 * eta2))
    e1, e2 = mean_variance_to_natural(mu, var)
    torch.testing.assert_close(e1, eta1)
    torch.testing.assert_close(e2, eta2)
    torch.testing.assert_close(lik.outputs_from_natural(eta1, eta2), f)
    with pytest.raises(ValueError, match="positive"):
        mean_variance_to_natural(mu, -var)


def test_eta_hessian_matches_autograd():
    lik = NaturalGaussian()
    f, y = random_outputs((5,))
    eta = torch.stack(lik.natural_parameters(f), -1)
    H = torch.func.vmap(torch.func.hessian(nll_eta))(eta, y)
    torch.testing.assert_close(lik.eta_hessian(f), H)
    L = lik.eta_hessian_factor(f)
    torch.testing.assert_close(L @ L.transpose(-1, -2), H)


def test_eta_hessian_positive_definite():
    lik = NaturalGaussian()
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1000, 2, generator=g, dtype=torch.float64) * 3
    evals = torch.linalg.eigvalsh(lik.eta_hessian(f))
    assert (evals > 0).all()
    mu, var = lik.mean_variance(f)
    torch.testing.assert_close(torch.linalg.det(lik.eta_hessian(f)), 2 * var**3)


@pytest.mark.parametrize("positivity", HEADS)
def test_factor_reproduces_ggn(positivity):
    lik = NaturalGaussian(positivity)
    f, y = random_outputs()
    V = lik.hessian_factor(f, y)
    assert V.shape == (7, 3, 2, 2)
    torch.testing.assert_close(V @ V.transpose(-1, -2), lik.hessian(f, y))
    # Λ_f = J_hᵀ Λ_η J_h with J_h = ∂η/∂f from autograd
    J = torch.func.vmap(torch.func.jacrev(lambda fi: torch.stack(lik.natural_parameters(fi), -1)))(
        f.reshape(-1, 2)
    )
    ggn = J.transpose(-1, -2) @ lik.eta_hessian(f).reshape(-1, 2, 2) @ J
    torch.testing.assert_close(lik.hessian(f, y).reshape(-1, 2, 2), ggn)


@pytest.mark.parametrize("positivity", HEADS)
def test_exact_f_hessian_and_gradient_match_autograd(positivity):
    lik = NaturalGaussian(positivity)
    f, y = random_outputs((6,))

    def nll(fi, yi):  # the literal η-formula composed with the head (no validation: vmap-able)
        return nll_eta(torch.stack(lik.natural_parameters(fi), -1), yi)

    H = torch.func.vmap(torch.func.hessian(nll))(f, y)
    torch.testing.assert_close(lik.hessian(f, y, exact=True), H)
    g = torch.func.vmap(torch.func.grad(nll))(f, y)
    torch.testing.assert_close(lik.gradient(f, y), g)
    torch.testing.assert_close(Likelihood.gradient(lik, f, y), g)  # base class: autograd


def test_exact_f_hessian_can_be_indefinite():
    lik = NaturalGaussian("softplus")
    f = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0.0], dtype=torch.float64)  # y² < μ² + σ²: the head-curvature term is < 0
    assert torch.linalg.eigvalsh(lik.hessian(f, y, exact=True)).min() < 0
    assert torch.linalg.eigvalsh(lik.hessian(f, y)).min() >= 0
    with pytest.raises(ValueError, match="targets"):
        lik.hessian(f, exact=True)


def test_sample_moments():
    lik = NaturalGaussian()
    f = torch.tensor([[1.0, 0.5], [-2.0, 3.0]], dtype=torch.float64).repeat(20000, 1)
    ys = lik.sample(f, generator=torch.Generator().manual_seed(0))
    assert ys.shape == (40000, 1)
    mu, var = lik.mean_variance(f[:2])
    ys = ys.reshape(20000, 2)
    torch.testing.assert_close(ys.mean(0), mu, atol=0.05, rtol=0)
    torch.testing.assert_close(ys.var(0), var, atol=0, rtol=0.05)
    lik.log_prob(f, ys.reshape(-1, 1))  # samples are valid targets


def test_validate_rejects_bad_input():
    lik = NaturalGaussian()
    with pytest.raises(ValueError, match=r"\(N, \*S, 2\)"):
        lik.log_prob(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="do not match"):
        lik.log_prob(torch.zeros(4, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="do not match"):
        lik.log_prob(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        lik.log_prob(torch.zeros(4, 2), torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="positivity"):
        NaturalGaussian("relu")
    assert NaturalGaussian.task == "heteroscedastic"

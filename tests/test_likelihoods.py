import math

import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Normal

from marglik.likelihoods import Bernoulli, Categorical, Custom, Gaussian, get_likelihood
from tests import oracle

CASES = {
    "gaussian": (
        Gaussian(torch.tensor([0.5, 2.0, 1.0])),
        lambda f: torch.randn(f.shape),
        oracle.gaussian_nll(torch.tensor([0.5, 2.0, 1.0])),
    ),
    "categorical": (
        Categorical(),
        lambda f: torch.randint(0, f.shape[-1], f.shape[:-1]),
        oracle.categorical_nll,
    ),
    "bernoulli": (
        Bernoulli(),
        lambda f: torch.randint(0, 2, f.shape).double(),
        oracle.bernoulli_nll,
    ),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3)])
def test_hessian_factor_and_gradient_match_autograd(name, shape):
    lik, make_y, nll = CASES[name]
    f = torch.randn(shape, dtype=torch.float64)
    y = make_y(f)
    V = lik.hessian_factor(f, y)
    L = V @ V.transpose(-1, -2)
    # the oracle differentiates the summed NLL of one sample over all its positions
    L_oracle = oracle.output_hessians(nll, f, y)
    R, C = L.shape[1:-2].numel(), shape[-1]
    L_block = torch.zeros(shape[0], R * C, R * C)
    for r in range(R):
        L_block[:, r * C : (r + 1) * C, r * C : (r + 1) * C] = L.reshape(shape[0], R, C, C)[:, r]
    torch.testing.assert_close(L_block, L_oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lik.hessian(f, y), L, rtol=1e-10, atol=1e-12)
    g = lik.gradient(f, y).reshape(shape[0], -1)
    torch.testing.assert_close(g, oracle.output_gradients(nll, f, y), rtol=1e-10, atol=1e-12)


def test_log_probs_match_torch_distributions():
    f = torch.randn(6, 2, 3)
    sigma = torch.tensor([0.5, 2.0, 1.0])
    y = torch.randn(6, 2, 3)
    expected = Normal(f, sigma).log_prob(y).sum((1, 2))
    torch.testing.assert_close(Gaussian(sigma).log_prob(f, y), expected)
    labels = torch.randint(0, 3, (6, 2))
    expected = TorchCategorical(logits=f).log_prob(labels).sum(1)
    torch.testing.assert_close(Categorical().log_prob(f, labels), expected)
    binary = torch.randint(0, 2, (6, 2, 3)).double()
    expected = TorchBernoulli(logits=f).log_prob(binary).sum((1, 2))
    torch.testing.assert_close(Bernoulli().log_prob(f, binary), expected)


def test_gaussian_statistics_give_log_likelihood_at_any_sigma():
    lik = Gaussian(1.0)
    f, y = torch.randn(7, 2), torch.randn(7, 2)
    stats = lik.statistics(f, y)
    for sigma in [torch.tensor(0.3), torch.tensor([0.5, 1.5])]:
        expected = Normal(f, sigma).log_prob(y).sum()
        torch.testing.assert_close(lik.log_lik_from_statistics(stats, sigma), expected)
    # the normaliser counts every output element (N·R·C), positions included
    f3, y3 = torch.randn(4, 5, 2), torch.randn(4, 5, 2)
    ll = lik.log_lik_from_statistics(lik.statistics(f3, y3), torch.tensor(2.0))
    torch.testing.assert_close(
        ll, -0.5 * ((f3 - y3) ** 2).sum() / 4 - 40 * math.log(2 * math.sqrt(2 * math.pi))
    )


def test_custom_likelihood_gets_hessian_from_autograd():
    def log_prob(f, y):
        return torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    custom = Custom(log_prob, task="classification")
    f, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    torch.testing.assert_close(custom.hessian(f, y), Categorical().hessian(f, y))
    V = custom.hessian_factor(f, y)
    torch.testing.assert_close(
        V @ V.transpose(-1, -2), Categorical().hessian(f, y), atol=1e-12, rtol=1e-10
    )
    torch.testing.assert_close(custom.log_prob(f, y), Categorical().log_prob(f, y))


def test_sampling_statistics():
    gen = torch.Generator().manual_seed(0)
    f = torch.tensor([[2.0, -1.0, 0.0]]).expand(20000, 3)
    y = Categorical().sample(f, gen)
    freq = torch.bincount(y, minlength=3) / len(y)
    torch.testing.assert_close(freq, torch.softmax(f[0], -1), atol=0.01, rtol=0)
    z = Gaussian(0.5).sample(torch.zeros(20000, 1), gen)
    assert abs(z.std().item() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("lik", "f", "y", "message"),
    [
        (Gaussian(), torch.randn(4, 2), torch.randn(4, 3), "do not match"),
        (Categorical(), torch.randn(4, 3), torch.randint(0, 3, (4, 1)), "do not match"),
        (Categorical(), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), "must lie in"),
        (Bernoulli(), torch.randn(4, 1), torch.tensor([0.0, 1.0, 0.5, 1.0]), "0 or 1"),
        (Gaussian(), torch.tensor([[1.0], [float("nan")]]), torch.zeros(2, 1), "NaN"),
        (Gaussian(), torch.zeros(2, 1), torch.tensor([[1.0], [float("inf")]]), "NaN"),
    ],
)
def test_bad_targets_raise(lik, f, y, message):
    with pytest.raises(ValueError, match=message):
        lik.log_prob(f, y)


def test_bad_sigma_and_names_raise():
    with pytest.raises(ValueError, match="sigma_noise"):
        Gaussian(-1.0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        get_likelihood("poisson")

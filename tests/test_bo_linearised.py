"""The BO surrogate's maths without BoTorch: joint GLM predictive over t-batches, its gradient in
X, linearised function samples, fitting — against float64 brute force (dense Jacobians of the
flattened weight vector with torch.func, explicit inverses of the posterior precision)."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import marglik
from marglik.applications.bo import (
    FitSettings,
    LinearisedFunctionSamples,
    fit_laplace,
    joint_moments,
)

torch.set_num_threads(1)
DT = torch.float64


def _net(d=2, m=1, width=4, seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, m)).to(DT)


def _fitted(structure="full", m=1, n=9, seed=0, sigma=0.3, delta=0.7, act=nn.Tanh):
    net = _net(m=m, seed=seed, act=act)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.rand(n, 2, generator=g, dtype=DT)
    Y = torch.randn(n, m, generator=g, dtype=DT)
    la = marglik.Laplace(net, "regression", hessian_structure=structure,
                         prior_precision=delta, sigma_noise=sigma)
    la.fit([(X, Y)])
    return la


def _dense_jacobian(net, X):
    """J (N·D, P) of the flattened outputs w.r.t. the flattened weight vector (brute force)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(th):
        parts = th.split([s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(net, params, (X,)).reshape(-1)

    return jacrev(f)(theta), theta


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("m", [1, 2])
def test_joint_moments_match_brute_force(structure, m):
    la = _fitted(structure, m=m)
    Sigma = torch.linalg.inv(la.posterior_precision)  # explicit inverse of the dense precision
    X = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    mean, cov = joint_moments(la, X)
    assert mean.shape == (3, 4, m) and cov.shape == (3, 4 * m, 4 * m)
    for b in range(3):  # brute force per t-batch (a loop in the oracle only)
        J, _ = _dense_jacobian(la.model, X[b])
        torch.testing.assert_close(cov[b], J @ Sigma @ J.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mean[b], la.model(X[b]).detach(), rtol=1e-12, atol=1e-12)


def test_joint_moments_batches_do_not_mix():
    """A t-batch's moments do not depend on the other t-batches (or on the batch shape)."""
    la = _fitted("kron")
    X = torch.rand(2, 3, 5, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    mean, cov = joint_moments(la, X)
    m1, c1 = joint_moments(la, X[1, 2])
    torch.testing.assert_close(cov[1, 2], c1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean[1, 2], m1, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_joint_moments_gradcheck_in_X(structure):
    la = _fitted(structure, m=2)
    X = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(3), dtype=DT,
                   requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: joint_moments(la, x), (X,), eps=1e-6, atol=1e-7)


def test_joint_moments_gradient_matches_brute_force():
    """∂/∂X of a scalar of the covariance against the brute-force J Σ Jᵀ differentiated."""
    la = _fitted("full", m=1)
    Sigma = torch.linalg.inv(la.posterior_precision)
    X = torch.rand(3, 2, generator=torch.Generator().manual_seed(4), dtype=DT)

    def brute(x):
        J, _ = _dense_jacobian(la.model, x)
        return (J @ Sigma @ J.T).logdet() + la.model(x).sum()

    X1 = X.clone().requires_grad_(True)
    mean, cov = joint_moments(la, X1)
    (g,) = torch.autograd.grad(cov.logdet() + mean.sum(), X1)
    torch.testing.assert_close(g, torch.func.grad(brute)(X), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_function_samples_are_the_linearised_model(structure):
    la = _fitted(structure, m=2)
    S = 4
    samples = LinearisedFunctionSamples(la, S, generator=torch.Generator().manual_seed(7))
    theta_s = la.sample(S, generator=torch.Generator().manual_seed(7))  # the same draws
    X = torch.rand(5, 2, generator=torch.Generator().manual_seed(8), dtype=DT)
    J, theta = _dense_jacobian(la.model, X)
    expected = la.model(X).detach().reshape(-1) + (theta_s - theta) @ J.T  # (S, 5·2)
    out = samples(X)
    assert out.shape == (S, 5, 2)
    torch.testing.assert_close(out.reshape(S, -1), expected, rtol=1e-10, atol=1e-12)
    Xp = torch.rand(3, S, 2, generator=torch.Generator().manual_seed(9), dtype=DT)
    paired = samples.paired(Xp)
    full = samples(Xp)  # (S, 3, S, 2): sample s at every point
    torch.testing.assert_close(paired, full.diagonal(dim1=0, dim2=2).permute(0, 2, 1))


def test_function_samples_have_the_predictive_covariance():
    """The empirical covariance of many samples approaches J Σ Jᵀ (Monte Carlo, 4 σ bound)."""
    la = _fitted("full", m=1)
    X = torch.rand(3, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    _, cov = joint_moments(la, X)
    S = 20000
    f = LinearisedFunctionSamples(la, S, generator=torch.Generator().manual_seed(0))(X)[..., 0]
    emp = torch.cov(f.T)
    se = (cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2).sqrt() / S**0.5
    assert ((emp - cov).abs() < 4 * se).all()


def test_samples_do_not_move_when_the_network_trains():
    la = _fitted("kron")
    samples = LinearisedFunctionSamples(la, 2, generator=torch.Generator().manual_seed(0))
    X = torch.rand(4, 2, dtype=DT)
    before = samples(X).clone()
    with torch.no_grad():
        for p in la.model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(samples(X), before, rtol=0, atol=0)


def test_model_left_as_it_was():
    la = _fitted("kron")
    net = la.model
    net.train()
    net[0].weight.requires_grad_(False)
    X = torch.rand(2, 3, 2, dtype=DT, requires_grad=True)
    joint_moments(la, X)
    LinearisedFunctionSamples(la, 2)(X)
    assert net.training and all(mod.training for mod in net.modules())
    assert not net[0].weight.requires_grad and net[2].weight.requires_grad


def test_bad_inputs_raise_clear_errors():
    la = _fitted("kron")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        joint_moments(la, torch.rand(2, dtype=DT))
    with pytest.raises(TypeError, match="floating"):
        joint_moments(la, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        joint_moments(la, torch.full((1, 2), float("nan"), dtype=DT))
    with pytest.raises(TypeError, match="torch.Tensor"):
        joint_moments(la, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="positive integer"):
        LinearisedFunctionSamples(la, 0)
    with pytest.raises(ValueError, match="one point per sample"):
        LinearisedFunctionSamples(la, 3).paired(torch.rand(2, 2, 2, dtype=DT))
    sub = marglik.Laplace(_net(), "regression", subset_of_weights="subnetwork",
                          subnetwork=torch.tensor([0, 3, 5]), hessian_structure="full")
    sub.fit([(torch.rand(4, 2, dtype=DT), torch.rand(4, 1, dtype=DT))])
    with pytest.raises(ValueError, match="whole parameter tensors"):
        joint_moments(sub, torch.rand(1, 2, dtype=DT))
    unfitted = marglik.Laplace(_net(), "regression")
    with pytest.raises(RuntimeError, match="not fitted"):
        joint_moments(unfitted, torch.rand(1, 2, dtype=DT))


def test_fit_settings_validation():
    with pytest.raises(ValueError, match="unknown tuning"):
        FitSettings(tuning="sometimes")
    with pytest.raises(ValueError, match="noise_std"):
        FitSettings(noise_std=0.0)
    with pytest.raises(ValueError, match="n_epochs"):
        FitSettings(n_epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        FitSettings(lr=0)


@pytest.mark.parametrize("tuning", ["posthoc", "online"])
def test_fit_laplace_tunes_or_fixes_sigma(tuning):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(20, 2, generator=g, dtype=DT)
    Y = torch.sin(4 * X[:, :1]) + 0.1 * torch.randn(20, 1, generator=g, dtype=DT)
    s = FitSettings(tuning=tuning, n_epochs=60, n_hypersteps=10, marglik_frequency=20)
    la = fit_laplace(_net(), X, Y, s, 1.0, 1.0, s.n_epochs)
    assert la.is_fitted and la.sigma_noise.item() != 1.0  # learned
    assert torch.isfinite(la.log_marginal_likelihood())
    fixed = FitSettings(tuning=tuning, n_epochs=60, n_hypersteps=10, marglik_frequency=20,
                        noise_std=0.05)
    la = fit_laplace(_net(), X, Y, fixed, 1.0, 1.0, fixed.n_epochs)
    assert la.sigma_noise.item() == pytest.approx(0.05, abs=1e-12)


def test_fit_laplace_posthoc_maximises_the_evidence():
    """After post-hoc tuning, the evidence is larger than at nearby δ and σ (a local optimum)."""
    g = torch.Generator().manual_seed(1)
    X = torch.rand(20, 2, generator=g, dtype=DT)
    Y = torch.sin(4 * X[:, :1]) + 0.1 * torch.randn(20, 1, generator=g, dtype=DT)
    s = FitSettings(n_epochs=200, n_hypersteps=300, prior_structure="scalar")
    la = fit_laplace(_net(), X, Y, s, 1.0, 1.0, s.n_epochs)
    delta, sigma = la.prior_precision.clone(), la.sigma_noise.clone()
    best = la.log_marginal_likelihood(delta, sigma).item()
    for fd, fs in [(1.2, 1), (1 / 1.2, 1), (1, 1.1), (1, 1 / 1.1)]:
        assert la.log_marginal_likelihood(delta * fd, sigma * fs).item() < best


def test_imports_without_botorch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('botorch', 'gpytorch'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import marglik, marglik.applications.bo as bo\n"
        "assert bo.joint_moments\n"
        "try:\n"
        "    bo.LaplaceSurrogate\n"
        "except ImportError as e:\n"
        "    assert 'marglik[bo]' in str(e), e\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

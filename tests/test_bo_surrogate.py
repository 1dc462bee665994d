"""The linearised-Laplace BoTorch surrogate: its posterior against brute force, acquisition
functions, Thompson sampling, warm-started conditioning (needs botorch)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

pytest.importorskip("botorch")

from botorch.acquisition import (  # noqa: E402
    ExpectedImprovement,
    LogExpectedImprovement,
    UpperConfidenceBound,
)
from botorch.acquisition.logei import qLogExpectedImprovement  # noqa: E402
from botorch.generation.sampling import MaxPosteriorSampling  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from gpytorch.distributions import MultitaskMultivariateNormal  # noqa: E402

from marglik.applications.bo import LaplaceSurrogate, thompson_candidates  # noqa: E402

torch.set_num_threads(1)
DT = torch.float64
FAST = dict(n_epochs=150, n_epochs_refit=50, n_hypersteps=20)


def _net(d=2, m=1, width=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, m)).to(DT)


def _data(n=8, d=2, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=DT)
    Y = torch.cat([-(X - 0.3 * (k + 1)).square().sum(-1, keepdim=True) for k in range(m)], -1)
    return X, 3.0 * Y + 1.0


def _brute(model, X, noise):
    """Mean and covariance of one t-batch X (q, d) in original units, by dense J and inv(P)."""
    la = model.laplace
    net = model.net
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(th):
        parts = th.split([s.numel() for s in shapes])
        return functional_call(net, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)},
                               (X,)).reshape(-1)

    J = jacrev(f)(theta)
    cov = J @ torch.linalg.inv(la.posterior_precision) @ J.T
    m = model.num_outputs
    if noise:
        cov = cov + torch.eye(cov.shape[0], dtype=DT) * la.sigma_noise.item() ** 2
    s = model.y_scale.repeat(X.shape[0])
    mean = model.y_loc + model.y_scale * f(theta).reshape(-1, m)
    return mean.detach(), (cov * s[:, None] * s[None, :]).detach()


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("noise", [False, True])
def test_posterior_matches_brute_force(m, noise):
    X, Y = _data(m=m)
    model = LaplaceSurrogate(X, Y, _net(m=m), hessian_structure="full", **FAST)
    Xc = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    post = model.posterior(Xc, observation_noise=noise)
    assert post.mean.shape == (3, 4, m)
    if m > 1:
        assert isinstance(post.distribution, MultitaskMultivariateNormal)
    cov = post.distribution.covariance_matrix
    for b in range(3):
        mean_b, cov_b = _brute(model, Xc[b], noise)
        torch.testing.assert_close(post.mean[b], mean_b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cov[b], cov_b, rtol=1e-9, atol=1e-11)


def test_output_indices_select_one_output():
    X, Y = _data(m=2)
    model = LaplaceSurrogate(X, Y, _net(m=2), **FAST)
    Xc = torch.rand(2, 3, 2, dtype=DT)
    both = model.posterior(Xc)
    one = model.posterior(Xc, output_indices=[1])
    torch.testing.assert_close(one.mean[..., 0], both.mean[..., 1])
    cov = both.distribution.covariance_matrix[..., 1::2, 1::2]
    torch.testing.assert_close(one.distribution.covariance_matrix, cov)
    with pytest.raises(ValueError, match="out of range"):
        model.posterior(Xc, output_indices=[2])


@pytest.mark.parametrize("acq_cls", [ExpectedImprovement, LogExpectedImprovement,
                                     UpperConfidenceBound, qLogExpectedImprovement])
def test_acquisition_functions_run(acq_cls):
    X, Y = _data()
    model = LaplaceSurrogate(X, Y, _net(), **FAST)
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    if acq_cls is UpperConfidenceBound:
        acq = acq_cls(model, beta=2.0)
    else:
        acq = acq_cls(model, best_f=Y.max())
    q = 2 if acq_cls is qLogExpectedImprovement else 1
    Xc = torch.rand(5, q, 2, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = acq(Xc)
        assert value.shape == (5,) and torch.isfinite(value).all()
        (grad,) = torch.autograd.grad(value.sum(), Xc)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        cand, best = optimize_acqf(acq, bounds, q=q, num_restarts=2, raw_samples=16)
    assert cand.shape == (q, 2) and ((cand >= 0) & (cand <= 1)).all()
    assert torch.isfinite(best).all()


def test_thompson_sample_then_optimise():
    X, Y = _data()
    model = LaplaceSurrogate(X, Y, _net(), **FAST)
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    cand, values = thompson_candidates(model, bounds, 3, num_restarts=4, raw_samples=64,
                                       generator=torch.Generator().manual_seed(0))
    assert cand.shape == (3, 2) and ((cand >= 0) & (cand <= 1)).all()
    samples = model.function_samples(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(values, samples.paired(cand)[..., 0])
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 41, dtype=DT),
                                      torch.linspace(0, 1, 41, dtype=DT), indexing="ij"), -1)
    on_grid = samples(grid.reshape(-1, 2))[..., 0].max(-1).values  # (3,)
    assert (values >= on_grid - 1e-3).all()  # each candidate maximises its own sample


def test_discrete_thompson_with_max_posterior_sampling():
    X, Y = _data()
    model = LaplaceSurrogate(X, Y, _net(), **FAST)
    torch.manual_seed(0)
    cand = MaxPosteriorSampling(model, replacement=False)(torch.rand(50, 2, dtype=DT),
                                                          num_samples=2)
    assert cand.shape == (2, 2)


def test_condition_on_observations_warm_starts_and_leaves_the_model():
    X, Y = _data()
    model = LaplaceSurrogate(X, Y, _net(), hessian_structure="full", **FAST)
    weights = copy.deepcopy(model.net.state_dict())
    Xc = torch.rand(1, 3, 2, dtype=DT)
    before = model.posterior(Xc).distribution.covariance_matrix.detach().clone()
    Xn, Yn = _data(n=2, seed=5)
    model.settings.n_epochs_refit, hyper = 0, model.settings.n_hypersteps
    model.settings.n_hypersteps = 0
    new = model.condition_on_observations(Xn, Yn)
    for k, v in new.net.state_dict().items():  # warm start: no training, the same weights
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    torch.testing.assert_close(new.laplace.prior_precision, model.laplace.prior_precision)
    assert new.train_inputs.shape == (10, 2) and model.train_inputs.shape == (8, 2)
    model.settings.n_epochs_refit, model.settings.n_hypersteps = 50, hyper
    trained = model.condition_on_observations(Xn, Yn)
    assert any(not torch.equal(v, weights[k]) for k, v in trained.net.state_dict().items())
    for k, v in model.net.state_dict().items():  # the old model is left as it was
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    torch.testing.assert_close(model.posterior(Xc).distribution.covariance_matrix, before)


def test_user_network_left_as_it_was_and_fixed_noise():
    X, Y = _data()
    net = _net()
    net.train()
    state = copy.deepcopy(net.state_dict())
    model = LaplaceSurrogate(X, Y, net, noise_std=0.05, **FAST)
    assert net.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert model.laplace.sigma_noise.item() == pytest.approx(0.05, abs=1e-12)


def test_online_tuning_runs():
    X, Y = _data()
    model = LaplaceSurrogate(X, Y, _net(), tuning="online", marglik_frequency=50, **FAST)
    post = model.posterior(torch.rand(2, 1, 2, dtype=DT))
    assert torch.isfinite(post.variance).all() and (post.variance > 0).all()


def test_bad_input_raises_clear_errors():
    X, Y = _data()
    with pytest.raises(ValueError, match="different numbers of points"):
        LaplaceSurrogate(X, Y[:-1], _net(), **FAST)
    with pytest.raises(ValueError, match="shape"):
        LaplaceSurrogate(X, Y[:, 0], _net(), **FAST)
    with pytest.raises(TypeError, match="unknown setting"):
        LaplaceSurrogate(X, Y, _net(), epochs=3)
    with pytest.raises(TypeError, match="nn.Module"):
        LaplaceSurrogate(X, Y, "mlp")
    model = LaplaceSurrogate(X, Y, _net(), **FAST)
    with pytest.raises(ValueError, match="features"):
        model.posterior(torch.rand(2, 1, 3, dtype=DT))
    with pytest.raises(TypeError, match="observation_noise"):
        model.posterior(torch.rand(2, 1, 2, dtype=DT), observation_noise=torch.ones(1))
    with pytest.raises(ValueError, match="features"):
        model.condition_on_observations(torch.rand(1, 3, dtype=DT), torch.rand(1, 1, dtype=DT))
    with pytest.raises(ValueError, match="bounds"):
        thompson_candidates(model, torch.tensor([[0.0], [1.0]]), 1)

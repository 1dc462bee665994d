"""LA-NAM (applications/additive): block network, curvature, evidence, bands and pair MI against
brute force (dense torch.func Jacobians, explicit inverses, float64)."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from torch.func import functional_call, jacrev

from marglik import Laplace
from marglik.applications.additive import (
    AdditiveFit,
    AdditiveNet,
    BlockLinear,
    BlockMLP,
    fit_additive,
    group_moments,
    pair_mutual_information,
    shape_functions,
    top_pairs,
)
from marglik.applications.additive.interactions import correlation_mutual_information

torch.set_num_threads(1)
D, PAIRS, HIDDEN = 3, [(0, 2)], (4, 3)


def _model(out_features: int = 1, pairs=PAIRS, seed: int = 0) -> AdditiveNet:
    torch.manual_seed(seed)
    model = AdditiveNet(D, HIDDEN, out_features, pairs, "tanh").double()
    with torch.no_grad():
        model.bias.normal_()
    return model


def _data(n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g, dtype=torch.float64),
            torch.randn(n, 1, generator=g, dtype=torch.float64))


def _loader(X, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)


def _group_of(name: str, n_pairs: int) -> int:
    """Subnetwork of a parameter from its name (independent of the library's bookkeeping)."""
    m = re.fullmatch(r"(features|interactions)\.layers\.\d+\.(weight|bias)\.(\d+)", name)
    if m is None:
        assert name == "bias"
        return D + n_pairs
    return int(m.group(3)) + (D if m.group(1) == "interactions" else 0)


def _flat(model):
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    return names, theta, shapes, sizes


def _unflat(theta, names, shapes, sizes):
    return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}


def _dense_jacobian(model, fn):
    """d fn(params)/d θ as (..., P) for fn taking the parameter dict."""
    names, theta, shapes, sizes = _flat(model)
    return jacrev(lambda t: fn(_unflat(t, names, shapes, sizes)))(theta)


def _delta_per_parameter(model, delta):
    n_pairs = len(model.pairs)
    return torch.cat([torch.full((p.numel(),), float(delta[_group_of(n, n_pairs)]),
                                 dtype=torch.float64) for n, p in model.named_parameters()])


def _fitted(model, X, y, structure, sigma=0.7):
    delta = torch.linspace(0.5, 3.0, model.n_groups + 1, dtype=torch.float64)
    la = Laplace(model, "regression", hessian_structure=structure, sigma_noise=sigma,
                 prior_precision=delta, prior_groups=model.prior_groups())
    la.fit(_loader(X, y))
    return la, delta


def _brute_precision(model, X, delta, sigma, structure):
    J = _dense_jacobian(model, lambda p: functional_call(model, p, (X,)))  # (N, C, P)
    H = torch.einsum("ncp,ncq->pq", J, J) / sigma**2
    if structure == "diag":
        H = torch.diag(H.diagonal())
    return H + torch.diag(_delta_per_parameter(model, delta))


# ------------------------------------------------------------------------------- block network
def test_block_mlp_equals_separate_mlps():
    torch.manual_seed(0)
    net = BlockMLP(4, 2, (5, 3), 2, "tanh").double()
    x = torch.randn(6, 4, 2, dtype=torch.float64)
    out = net(x)
    for g in range(4):  # reference: each subnetwork on its own
        h = x[:, g]
        for i, layer in enumerate(net.layers):
            h = h @ layer.weight[g].T + layer.bias[g]
            h = torch.tanh(h) if i < len(net.layers) - 1 else h
        torch.testing.assert_close(out[:, g], h, rtol=0, atol=1e-14)


def test_additive_net_is_bias_plus_sum_of_subnetworks():
    model = _model(2)
    X, _ = _data()
    c = model.contributions(X)
    assert c.shape == (7, D + 1, 2)
    f0 = model.features(X[:, 0:1, None].expand(-1, D, 1).contiguous())  # feature net 0 only
    torch.testing.assert_close(c[:, 0], f0[:, 0])
    pair = model.interactions(X[:, None, [0, 2]])
    torch.testing.assert_close(c[:, D], pair[:, 0])
    torch.testing.assert_close(model(X), c.sum(1) + model.bias)


def test_prior_groups_partition_the_parameters():
    model = _model()
    groups = model.prior_groups()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for g in groups for n in g) == sorted(names)
    assert len(groups) == D + len(PAIRS) + 1
    expected = torch.cat([torch.full((p.numel(),), _group_of(n, 1))
                          for n, p in model.named_parameters()])
    assert torch.equal(model.group_of_parameters(), expected)


def test_with_pairs_keeps_the_function():
    model = _model(pairs=())
    X, _ = _data()
    new = model.with_pairs([(1, 2), (0, 1)])
    assert new.pairs == [(1, 2), (0, 1)]
    torch.testing.assert_close(new(X), model(X), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------ curvature / evidence
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_curvature_equals_brute_force_ggn(structure):
    model = _model()
    X, y = _data()
    la, delta = _fitted(model, X, y, structure)
    expected = _brute_precision(model, X, delta, 0.7, structure)
    torch.testing.assert_close(la.posterior_precision, expected, rtol=1e-10, atol=1e-10)


def test_evidence_with_a_prior_per_subnetwork_equals_brute_force():
    model = _model()
    X, y = _data()
    la, delta = _fitted(model, X, y, "full")
    sigma = 0.7
    P = _brute_precision(model, X, delta, sigma, "full")
    d = _delta_per_parameter(model, delta)
    theta = _flat(model)[1]
    f = model(X).detach()
    loglik = (-0.5 * ((y - f) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))).sum()
    expected = (loglik - 0.5 * (d * theta**2).sum()
                - 0.5 * (torch.linalg.slogdet(P)[1] - d.log().sum()))
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- shape functions
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_group_moments_equal_brute_force(structure):
    model = _model(2)
    X, y = _data()
    la = Laplace(model, "regression", hessian_structure=structure, sigma_noise=0.7,
                 prior_precision=torch.linspace(0.5, 3.0, model.n_groups + 1,
                                                dtype=torch.float64),
                 prior_groups=model.prior_groups())
    y2 = torch.cat([y, -y], 1)
    la.fit(_loader(X, y2))
    grid = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None].expand(-1, D).contiguous()
    mean, var = group_moments(la, model, grid, X)
    cov = torch.linalg.inv(la.posterior_precision)  # explicit inverse
    gid = torch.tensor([_group_of(n, 1) for n, p in model.named_parameters()
                        for _ in range(p.numel())])
    for g in range(model.n_groups):
        def centred(p, g=g):
            return _contributions(model, p, grid)[:, g] - _contributions(model, p, X)[:, g].mean(0)
        J = _dense_jacobian(model, centred)[..., gid == g]  # (M, C, P_g)
        block = cov[gid == g][:, gid == g]
        expected_var = torch.einsum("mcp,pq,mcq->mc", J, block, J)
        torch.testing.assert_close(var[:, g], expected_var, rtol=1e-9, atol=1e-12)
        ref = model.contributions(grid)[:, g] - model.contributions(X)[:, g].mean(0)
        torch.testing.assert_close(mean[:, g], ref.detach(), rtol=0, atol=1e-13)
    sf = shape_functions(la, model, X, grid=grid)
    torch.testing.assert_close(sf.std, var[:, :D].sqrt())


def _contributions(model, params, x):
    from marglik.applications.additive.shapes import contributions_at

    return contributions_at(model, params, x)


def test_shape_functions_leave_the_model_as_it_was():
    model = _model()
    X, y = _data()
    la, _ = _fitted(model, X, y, "diag")
    model.train()
    model.features.layers[0].weight[1].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    shape_functions(la, model, X, n_points=4)
    fit = AdditiveFit(la, model, {}, "regression", 0.0)
    pair_mutual_information(fit, X, y)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


# ------------------------------------------------------------------------------- interactions
def test_correlation_mutual_information_is_the_gaussian_mi():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    mi = correlation_mutual_information(cov)
    v = cov.diagonal(dim1=1, dim2=2)
    # I(a; b) = ½ log(σ_a² σ_b² / det Σ_ab) for a bivariate Gaussian
    expected = 0.5 * torch.log(v[:, :, None] * v[:, None, :]
                               / (v[:, :, None] * v[:, None, :] - cov**2))
    expected = expected.masked_fill(torch.eye(4, dtype=torch.bool), 0.0)
    torch.testing.assert_close(mi, expected, rtol=1e-12, atol=1e-12)


def test_pair_mutual_information_equals_brute_force():
    model = _model(pairs=())
    X, y = _data(9)
    delta = torch.tensor([0.5, 2.0, 4.0, 1.0], dtype=torch.float64)
    la = Laplace(model, "regression", hessian_structure="diag", sigma_noise=0.6,
                 prior_precision=delta, prior_groups=model.prior_groups())
    la.fit(_loader(X, y))
    scores = pair_mutual_information(AdditiveFit(la, model, {}, "regression", 0.0), X, y)
    # brute force: full GGN over the last-layer weights, explicit inverse
    names = [f"features.layers.2.weight.{g}" for g in range(D)]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def outputs(t):
        last = {n: s.reshape(params[n].shape) for n, s in zip(names, t.split(sizes))}
        return _contributions(model, {**params, **last}, X)[:, :D, 0]

    t0 = torch.cat([params[n].flatten() for n in names])
    J = jacrev(outputs)(t0)  # (N, D, P_ll): feature g's output depends on its own block
    Jf = J.sum(1)  # model output (minus bias) w.r.t. the last layers
    P = Jf.T @ Jf / 0.6**2 + torch.diag(delta[:D].repeat_interleave(torch.tensor(sizes)))
    C = J @ torch.linalg.inv(P) @ J.transpose(1, 2)
    v = C.diagonal(dim1=1, dim2=2)
    rho2 = C**2 / (v[:, :, None] * v[:, None, :])
    expected = (-0.5 * torch.log(1 - rho2)).masked_fill(torch.eye(D, dtype=torch.bool), 0)
    torch.testing.assert_close(scores, expected.mean(0), rtol=1e-9, atol=1e-12)
    assert torch.equal(scores, scores.T)


def test_top_pairs_orders_by_score():
    s = torch.tensor([[0, 0.1, 0.9], [0.1, 0, 0.5], [0.9, 0.5, 0]])
    assert top_pairs(s, 2) == [(0, 2), (1, 2)]
    assert top_pairs(s, 0) == []
    with pytest.raises(ValueError, match="k must be an integer in \\[0, 3\\]"):
        top_pairs(s, 4)


# ----------------------------------------------------------------------- feature selection
def test_evidence_switches_off_noise_features():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(300, 4, generator=g) * 2 - 1
    y = torch.sin(math.pi * X[:, 0]) + X[:, 1] + 0.1 * torch.randn(300, generator=g)
    # the default (Kronecker) evidence switches a noise feature off more slowly than the
    # diagonal one did: after 120 epochs feature 2 had δ 8.4 (4× the informative ones), after
    # 400 epochs 73 (33×)
    fit = fit_additive(X, y, hidden=(8,), n_epochs=400, batch_size=100, n_epochs_burnin=10,
                       marglik_frequency=10, seed=0)
    delta = fit.feature_precisions
    assert delta[2:].min() >= 10 * delta[:2].max()
    assert 0.05 < float(fit.la.sigma_noise) < 0.2


# ----------------------------------------------------------------------- learning-rate schedule
def test_cosine_schedule_follows_the_closed_form(monkeypatch):
    """θ's learning rate after step t of T = n_epochs · ⌈N / batch⌉ is lr (1 + cos(πt/T)) / 2."""
    fit_module = importlib.import_module("marglik.applications.additive.fit")

    seen: list[float] = []

    class Spy(torch.optim.lr_scheduler.CosineAnnealingLR):
        def step(self, *args, **kwargs):
            super().step(*args, **kwargs)
            seen.append(self.optimizer.param_groups[0]["lr"])

    factory = fit_module.LR_SCHEDULES["cosine"]
    monkeypatch.setitem(fit_module.LR_SCHEDULES, "cosine",
                        lambda n: (Spy, factory(n)[1]))
    X = torch.randn(25, 2, dtype=torch.float64)
    fit_additive(X, X[:, 0], hidden=(3,), n_epochs=4, batch_size=10, lr=0.3,
                 lr_schedule="cosine", n_epochs_burnin=2, marglik_frequency=2, n_hypersteps=2)
    T = 4 * 3
    # the scheduler's constructor makes step 0 (lr itself), then one step after every batch
    expected = [0.3 * (1 + math.cos(math.pi * t / T)) / 2 for t in range(T + 1)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert fit_module.LR_SCHEDULES["constant"] is None


# ------------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"AdditiveNet expects inputs \(N, 3\)"):
        _model()(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="BlockLinear expects inputs"):
        BlockLinear(2, 1, 3)(torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match="pairs must be pairs of distinct"):
        AdditiveNet(3, pairs=[(0, 0)])
    with pytest.raises(ValueError, match="pairs must not repeat"):
        AdditiveNet(3, pairs=[(0, 1), (1, 0)])
    with pytest.raises(ValueError, match="activation must be one of"):
        BlockMLP(2, activation="swish!")
    X = torch.randn(10, 2)
    with pytest.raises(ValueError, match="finite"):
        fit_additive(X, torch.full((10,), float("nan")), n_epochs=1)
    with pytest.raises(ValueError, match="binary targets must be 0 or 1"):
        fit_additive(X, torch.arange(10.0), "binary", n_epochs=1)
    with pytest.raises(ValueError, match="hessian_structure must be one of"):
        fit_additive(X, torch.randn(10), hessian_structure="lowrank", n_epochs=1)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        fit_additive(X, torch.randn(10), "poisson", n_epochs=1)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        fit_additive(X, torch.randn(10), lr_schedule="linear", n_epochs=1)
    with pytest.raises(ValueError, match="X has 10 rows but y has 9"):
        fit_additive(X, torch.randn(9), n_epochs=1)

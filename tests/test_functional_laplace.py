"""The function-space (GP / NTK) Laplace posterior against weight space and dense references.

Float64, tiny networks. References: explicit matrices from ``torch.func`` (per-sample Jacobians,
output Hessians of plain negative log-likelihoods, H = Σ Jᵀ Λ J, Σ = (H/T + P0)⁻¹ by an explicit
inverse, log-determinants by slogdet) and the weight-space ``Laplace(hessian_structure="full")``.
The issue's proofs: the exact function-space evidence and predictive equal the weight-space
full-GGN ones to 1e-8 relative; a subset of M = N points and Nyström with M = N equal exact.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik import FunctionalLaplace, Laplace
from marglik.likelihoods import NaturalGaussian
from marglik.posterior.function_space import pathwise_map
from marglik.posterior.kernel_data import choose_subset
from tests.oracle import bernoulli_nll, categorical_nll, gaussian_nll, jacobians, output_hessians

RTOL = 1e-9  # the issue asks for 1e-8 relative; the agreement is at rounding level


def mlp(out: int, hidden: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, out))


def hetero_nll(f: Tensor, y: Tensor) -> Tensor:
    """−log N(y | μ, σ²) with 1/σ² = softplus(g2), μ = g1/softplus(g2) (no marglik code)."""
    prec = F.softplus(f[..., 1])
    mu = f[..., 0] / prec
    return (0.5 * prec * (y.reshape(mu.shape) - mu) ** 2 - 0.5 * prec.log()
            + 0.5 * math.log(2 * math.pi)).sum()


def hetero_ggn_hessians(f: Tensor) -> Tensor:
    """Λ_f = J_hᵀ ∇²_η NLL J_h per sample (the GGN of the natural-parameter head): (N, 2, 2)."""
    def head(g):
        return torch.stack([g[0], -0.5 * F.softplus(g[1])])

    def nll_eta(eta, y):  # convex in η; its η-Hessian does not depend on y
        return -eta[0] * y - eta[1] * y**2 - eta[0] ** 2 / (4 * eta[1]) - 0.5 * torch.log(
            -2 * eta[1])

    J_h = vmap(jacrev(head))(f)
    L_eta = vmap(hessian(nll_eta))(vmap(head)(f), torch.zeros(len(f)))
    return J_h.transpose(1, 2) @ L_eta @ J_h


CASES = {  # name: (likelihood, outputs, targets(n), Λ per sample, log p(D|θ) per sample, kwargs)
    "classification": (
        "classification", 3, lambda n: torch.randint(0, 3, (n,)),
        lambda f, y: output_hessians(categorical_nll, f, y),
        lambda f, y: -vmap(categorical_nll)(f[:, None], y[:, None]), {}),
    "regression": (
        "regression", 2, lambda n: torch.randn(n, 2),
        lambda f, y: output_hessians(gaussian_nll(0.7), f, y),
        lambda f, y: -0.5 * (((y - f) / 0.7) ** 2).sum(1) - 2 * math.log(0.7 * math.sqrt(
            2 * math.pi)), {"sigma_noise": 0.7}),
    "binary": (
        "binary", 1, lambda n: torch.randint(0, 2, (n, 1)).double(),
        lambda f, y: output_hessians(bernoulli_nll, f, y),
        lambda f, y: -F.binary_cross_entropy_with_logits(f, y, reduction="none").sum(1), {}),
    "heteroscedastic": (
        NaturalGaussian(), 2, lambda n: torch.randn(n),
        lambda f, y: hetero_ggn_hessians(f),
        lambda f, y: -vmap(hetero_nll)(f[:, None], y[:, None]), {}),
}


def dense_reference(model, X, y, case, delta, mu0=0.0, T=1.0, names=None, xs=None):
    """(log Z, per-input covariances at xs (B, D, D), joint covariance (B·D, B·D))."""
    _, _, _, hessians, loglik, _ = CASES[case]
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    J = jacobians(model, X, names)
    with torch.no_grad():
        f = model(X)
    H = torch.einsum("ndp,nde,neq->pq", J, hessians(f, y), J)
    P0 = torch.diag(torch.as_tensor(delta).expand(theta.shape))
    diff = theta - mu0
    log_z = (loglik(f, y).sum() - 0.5 * diff @ P0 @ diff
             - 0.5 * (torch.linalg.slogdet(H / T + P0)[1] - torch.linalg.slogdet(P0)[1]))
    Sigma = torch.linalg.inv(H / T + P0)
    Js = jacobians(model, xs, names)
    per_input = Js @ Sigma @ Js.transpose(1, 2)
    flat = Js.reshape(-1, Js.shape[-1])
    return log_z, per_input, flat @ Sigma @ flat.T


def setup(case, n=7, seed=0):
    torch.manual_seed(seed)
    likelihood, out, targets, _, _, kw = CASES[case]
    model = mlp(out)
    X, y = torch.randn(n, 2), targets(n)
    return model, likelihood, kw, X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


def layerwise(model) -> Tensor:
    return torch.linspace(0.5, 3.0, len(list(model.parameters())))


# ------------------------------------------------------------------------ 1. exact = weight space
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "groups", "parameter"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_evidence_and_predictive_equal_weight_space_and_dense(case, prior):
    model, likelihood, kw, X, y, loader = setup(case)
    P = sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    deltas = {"scalar": torch.tensor(1.3), "layerwise": layerwise(model),
              "groups": torch.tensor([0.4, 2.5]), "parameter": torch.rand(P) + 0.5}
    delta = deltas[prior]
    groups = [names[:2], names[2:]] if prior == "groups" else None
    per_param = (torch.cat([torch.full((sum(p.numel() for n, p in model.named_parameters()
                                            if n in g),), d) for g, d in zip(groups, delta)])
                 if prior == "groups" else delta if prior == "parameter" else None)
    if prior == "layerwise":
        per_param = torch.cat([torch.full((p.numel(),), d) for p, d in
                               zip(model.parameters(), delta)])
    kw = dict(kw, prior_precision=delta, prior_groups=groups)
    fl = FunctionalLaplace(model, likelihood, **kw).fit(loader)
    la = Laplace(model, likelihood, hessian_structure="full", **kw).fit(loader)
    xs = torch.randn(5, 2)
    ref_z, ref_cov, ref_joint = dense_reference(
        model, X, y, case, delta if per_param is None else per_param, xs=xs)
    log_z = fl.log_marginal_likelihood()
    torch.testing.assert_close(log_z, ref_z, rtol=RTOL, atol=0)
    torch.testing.assert_close(log_z, la.log_marginal_likelihood(), rtol=RTOL, atol=0)
    f, cov = fl.functional_moments(xs)
    f_la, cov_la = la.functional_moments(xs)
    torch.testing.assert_close(f, f_la, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, ref_cov, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(cov, cov_la, rtol=RTOL, atol=1e-12)
    _, joint = fl.functional_moments(xs, joint=True)
    torch.testing.assert_close(joint, ref_joint, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("case", ["classification", "regression"])
def test_last_layer_temperature_and_prior_mean_match_weight_space(case):
    model, likelihood, kw, X, y, loader = setup(case)
    kw = dict(kw, subset_of_weights="last_layer", prior_precision=torch.tensor([0.8, 2.0]),
              temperature=2.5, prior_mean=0.1)
    fl = FunctionalLaplace(model, likelihood, **kw).fit(loader)
    assert fl.last_layer_name == "2"
    xs = torch.randn(4, 2)
    names = ["2.weight", "2.bias"]
    per_param = torch.cat([torch.full((model[2].weight.numel(),), 0.8),
                           torch.full((model[2].bias.numel(),), 2.0)])
    ref_z, ref_cov, ref_joint = dense_reference(model, X, y, case, per_param, 0.1, 2.5, names, xs)
    torch.testing.assert_close(fl.log_marginal_likelihood(), ref_z, rtol=RTOL, atol=0)
    torch.testing.assert_close(fl.functional_moments(xs)[1], ref_cov, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(fl.functional_moments(xs, joint=True)[1], ref_joint,
                               rtol=RTOL, atol=1e-12)
    la = Laplace(model, likelihood, hessian_structure="full", **kw).fit(loader)
    torch.testing.assert_close(fl.log_marginal_likelihood(), la.log_marginal_likelihood(),
                               rtol=RTOL, atol=0)


def test_outputs_with_positions_match_weight_space():
    """Outputs (N, 2, C): Λ is block-diagonal over the two positions."""
    class TwoPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 6)

        def forward(self, x):
            return torch.tanh(self.lin(x)).reshape(-1, 2, 3)

    model, X, y = TwoPositions(), torch.randn(6, 2), torch.randint(0, 3, (6, 2))
    fl = FunctionalLaplace(model, "classification", prior_precision=0.7).fit([(X, y)])
    la = Laplace(model, "classification", "all", "full", prior_precision=0.7).fit([(X, y)])
    xs = torch.randn(3, 2)
    torch.testing.assert_close(fl.log_marginal_likelihood(), la.log_marginal_likelihood(),
                               rtol=RTOL, atol=0)
    torch.testing.assert_close(fl.functional_moments(xs, joint=True)[1],
                               la.functional_moments(xs, joint=True)[1], rtol=RTOL, atol=1e-12)


# ------------------------------------------------------------------ 2. subset of data and Nyström
@pytest.mark.parametrize("nystrom", [False, True])
@pytest.mark.parametrize("case", ["classification", "regression", "heteroscedastic"])
def test_subset_and_nystrom_with_all_points_equal_exact(case, nystrom):
    model, likelihood, kw, X, y, loader = setup(case)
    kw = dict(kw, prior_precision=layerwise(model))
    exact = FunctionalLaplace(model, likelihood, **kw).fit(loader)
    full = FunctionalLaplace(model, likelihood, n_subset=7, nystrom=nystrom, seed=3,
                             **kw).fit(loader)
    assert full.indices.tolist() == list(range(7))
    xs = torch.randn(4, 2)
    torch.testing.assert_close(full.log_marginal_likelihood(), exact.log_marginal_likelihood(),
                               rtol=RTOL, atol=0)
    torch.testing.assert_close(full.functional_moments(xs)[1], exact.functional_moments(xs)[1],
                               rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(full.functional_moments(xs, joint=True)[1],
                               exact.functional_moments(xs, joint=True)[1], rtol=RTOL,
                               atol=1e-12)


@pytest.mark.parametrize("case", ["classification", "regression"])
def test_subset_of_data_is_the_rescaled_posterior_of_its_points(case):
    """M < N: data fit and scatter over all N, (N/M)·the M points' log-det ratio, and the GP
    conditioned on the M points (= weight-space full Laplace fitted on them)."""
    model, likelihood, kw, X, y, loader = setup(case, n=9)
    kw = dict(kw, prior_precision=layerwise(model))
    sod = FunctionalLaplace(model, likelihood, n_subset=4, seed=1, **kw).fit(loader)
    idx = sod.indices
    assert len(idx) == 4 and len(set(idx.tolist())) == 4
    on_all = Laplace(model, likelihood, hessian_structure="full", **kw).fit(loader)
    on_subset = Laplace(model, likelihood, hessian_structure="full", **kw).fit([(X[idx],
                                                                                 y[idx])])
    expected = (on_all.log_likelihood() - 0.5 * on_all.scatter()
                - 0.5 * 9 / 4 * on_subset.log_det_ratio())
    torch.testing.assert_close(sod.log_marginal_likelihood(), expected, rtol=RTOL, atol=0)
    xs = torch.randn(4, 2)
    torch.testing.assert_close(sod.functional_moments(xs, joint=True)[1],
                               on_subset.functional_moments(xs, joint=True)[1], rtol=RTOL,
                               atol=1e-12)
    other = FunctionalLaplace(model, likelihood, n_subset=4, seed=2, **kw).fit(loader)
    assert not torch.equal(other.indices, idx)  # the seed picks the points
    again = FunctionalLaplace(model, likelihood, n_subset=4, seed=1, **kw).fit(loader)
    assert torch.equal(again.indices, idx)


@pytest.mark.parametrize("case", ["classification", "regression"])
def test_nystrom_evidence_and_dtc_predictive_match_explicit_matrices(case):
    model, likelihood, kw, X, y, loader = setup(case, n=9)
    delta = layerwise(model)
    per_param = torch.cat([torch.full((p.numel(),), d) for p, d in zip(model.parameters(),
                                                                         delta)])
    ny = FunctionalLaplace(model, likelihood, n_subset=3, nystrom=True, prior_precision=delta,
                           **kw).fit(loader)
    z = ny.indices
    J = jacobians(model, X).flatten(0, 1)  # (N·D, P)
    Jz = jacobians(model, X[z]).flatten(0, 1)
    xs = torch.randn(4, 2)
    Js = jacobians(model, xs).flatten(0, 1)
    k = lambda a, b: (a / per_param) @ b.T  # noqa: E731
    with torch.no_grad():
        f = model(X)
    Lam = torch.block_diag(*CASES[case][3](f, y))
    Q = k(J, Jz) @ torch.linalg.inv(k(Jz, Jz)) @ k(Jz, J)
    logdet = torch.linalg.slogdet(torch.eye(len(Q)) + Lam @ Q)[1]  # = log det(I + Λ½QΛ½)
    exact = FunctionalLaplace(model, likelihood, prior_precision=delta, **kw).fit(loader)
    expected = exact.log_likelihood() - 0.5 * exact.prior.scatter(exact.mean) - 0.5 * logdet
    log_z = ny.log_marginal_likelihood()
    torch.testing.assert_close(log_z, expected, rtol=RTOL, atol=0)
    assert log_z >= exact.log_marginal_likelihood()  # the Nyström kernel is below the exact one
    Kzz, Kzs, Kzx = k(Jz, Jz), k(Jz, Js), k(Jz, J)
    dtc = (k(Js, Js) - Kzs.T @ torch.linalg.inv(Kzz) @ Kzs
           + Kzs.T @ torch.linalg.inv(Kzz + Kzx @ Lam @ Kzx.T) @ Kzs)
    torch.testing.assert_close(ny.functional_moments(xs, joint=True)[1], dtc, rtol=1e-8,
                               atol=1e-10)


def test_subset_evidence_averages_below_the_exact_one():
    """Over all C(N, M) subsets the mean N/M-rescaled log-det ratio is ≥ the exact one
    (Fischer), so the estimator is a lower bound in expectation."""
    import itertools

    model, likelihood, kw, X, y, loader = setup("classification", n=6)
    exact = Laplace(model, likelihood, hessian_structure="full").fit(loader).log_det_ratio()
    parts = [Laplace(model, likelihood, hessian_structure="full").fit(
        [(X[list(s)], y[list(s)])]).log_det_ratio() for s in itertools.combinations(range(6), 2)]
    assert 3 * torch.stack(parts).mean() >= exact


# ----------------------------------------------------------------------------- 3. gradients
@pytest.mark.parametrize("mode", ["exact", "subset", "nystrom"])
@pytest.mark.parametrize("case", ["classification", "regression"])
def test_one_delta_by_eigenvalues_equals_the_cholesky_evidence(case, mode):
    """A scalar δ (and σ) takes log det(I + c A) = Σ log(1 + c λ_i) from one eigendecomposition;
    the same δ given per group takes a Cholesky factorisation per evaluation."""
    model, likelihood, kw, X, y, loader = setup(case, n=8)
    fl = FunctionalLaplace(model, likelihood, n_subset=None if mode == "exact" else 5,
                           nystrom=mode == "nystrom", temperature=1.7, **kw).fit(loader)
    for delta in (0.3, 2.0, 40.0):
        sigma = torch.tensor(0.4) if case == "regression" else None
        spectral = fl.log_marginal_likelihood(torch.tensor(delta), sigma)
        cholesky = fl.log_marginal_likelihood(torch.full((4,), delta), sigma)
        torch.testing.assert_close(spectral, cholesky, rtol=1e-11, atol=0)


@pytest.mark.parametrize("prior", ["scalar", "layerwise"])
@pytest.mark.parametrize("mode", ["exact", "subset", "nystrom"])
@pytest.mark.parametrize("case", ["classification", "regression"])
def test_evidence_gradients_in_delta_and_sigma_match_finite_differences(case, mode, prior):
    model, likelihood, kw, X, y, loader = setup(case, n=8)
    n_subset = None if mode == "exact" else 5
    fl = FunctionalLaplace(model, likelihood, n_subset=n_subset, nystrom=mode == "nystrom",
                           **kw).fit(loader)
    logs = [layerwise(model).log() if prior == "layerwise" else torch.tensor([0.4])]
    if case == "regression":
        logs.append(torch.tensor(0.7).log())
    logs = torch.cat([t.reshape(-1) for t in logs]).requires_grad_(True)
    n = len(logs[:4]) if prior == "layerwise" else 1

    def evidence(v: Tensor) -> Tensor:
        delta = v[:n].exp() if prior == "layerwise" else v[0].exp()
        sigma = v[n].exp() if case == "regression" else None
        return fl.log_marginal_likelihood(delta, sigma)

    (grad,) = torch.autograd.grad(evidence(logs), logs)
    h, fd = 1e-5, torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(len(logs)):  # the reference: central differences, entry by entry
            e = torch.zeros_like(logs)
            e[i] = h
            fd[i] = (evidence(logs + e) - evidence(logs - e)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


class InputScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, x):
        return x * self.log_scale.exp()


@pytest.mark.parametrize("mode", ["exact", "nystrom"])
def test_evidence_gradient_in_a_registered_hyperparameter_matches_refits(mode):
    torch.manual_seed(0)
    model = nn.Sequential(InputScale(), *mlp(3))
    X, y = torch.randn(6, 2), torch.randint(0, 3, (6,))
    loader = [(X[:3], y[:3]), (X[3:], y[3:])]
    weights = [n for n, _ in model.named_parameters() if n != "0.log_scale"]
    h = model[0].log_scale

    def evidence(create_graph):
        fl = FunctionalLaplace(model, "classification", "subnetwork", subnetwork=weights,
                               prior_precision=torch.tensor([1.0, 2.0, 3.0, 4.0]),
                               n_subset=None if mode == "exact" else 4,
                               nystrom=mode == "nystrom")
        return fl.fit(loader, create_graph=create_graph).log_marginal_likelihood()

    (grad,) = torch.autograd.grad(evidence(True), h)
    fd = torch.zeros(2)
    with torch.no_grad():
        for i in range(2):
            h[i] += 1e-5
            up = evidence(False)
            h[i] -= 2e-5
            down = evidence(False)
            h[i] += 1e-5
            fd[i] = (up - down) / 2e-5
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_optimize_prior_precision_reaches_a_stationary_point():
    model, likelihood, kw, X, y, loader = setup("regression")
    fl = FunctionalLaplace(model, likelihood, **kw).fit(loader)
    fl.optimize_prior_precision(prior_structure="layerwise", tune_sigma=True, optimizer="lbfgs")
    logs = torch.cat([fl.prior_precision.log(), fl.sigma_noise.log().reshape(1)])
    logs.requires_grad_(True)
    (grad,) = torch.autograd.grad(fl.log_marginal_likelihood(logs[:4].exp(), logs[4].exp()),
                                  logs)
    assert grad.abs().max() < 1e-4


# ------------------------------------------------------------------------- 4. subsets and samples
def test_class_balanced_subset_is_balanced():
    labels = torch.cat([torch.zeros(30), torch.ones(5), torch.full((15,), 2.0)]).long()
    labels = labels[torch.randperm(50)]
    for m, expected in [(12, [4, 4, 4]), (21, [8, 5, 8]), (50, [30, 5, 15]), (4, [2, 1, 1])]:
        idx = choose_subset(50, m, "class", labels, torch.Generator().manual_seed(0))
        assert len(set(idx.tolist())) == m
        assert torch.bincount(labels[idx], minlength=3).tolist() == expected
    model = mlp(3)
    X = torch.randn(50, 2)
    fl = FunctionalLaplace(model, "classification", n_subset=9, subset_method="class")
    fl.fit(DataLoader(TensorDataset(X, labels), batch_size=16))
    assert torch.bincount(labels[fl.indices], minlength=3).tolist() == [3, 3, 3]
    binary = (labels == 1).double()[:, None]  # (N, 1) targets of a binary likelihood
    fl = FunctionalLaplace(mlp(1), "binary", n_subset=6, subset_method="class")
    fl.fit([(X, binary)])
    assert binary[fl.indices].sum() == 3


def test_pathwise_weight_samples_have_the_weight_space_covariance():
    """The sampler is linear in its normal draws: feeding identity matrices gives its exact
    covariance, which must be the full Laplace posterior covariance."""
    model, likelihood, kw, X, y, loader = setup("classification")
    fl = FunctionalLaplace(model, likelihood, prior_precision=layerwise(model),
                           temperature=1.5).fit(loader)
    la = Laplace(model, likelihood, hessian_structure="full", prior_precision=layerwise(model),
                 temperature=1.5).fit(loader)
    _, L_S, W = fl._cached_factors()
    J = fl._J
    Jt_W = torch.einsum("ndp,ndk->pnk", J, W).reshape(J.shape[-1], -1)
    inv = 1 / fl.prior.expand()
    P, R = Jt_W.shape
    A = pathwise_map(Jt_W, inv, L_S, torch.eye(P), torch.zeros(P, R))
    B = pathwise_map(Jt_W, inv, L_S, torch.zeros(R, P), torch.eye(R))
    torch.testing.assert_close(A.T @ A + B.T @ B, la.posterior_covariance, rtol=1e-9,
                               atol=1e-12)
    samples = fl.function_samples(torch.randn(3, 2), 5, torch.Generator().manual_seed(0))
    assert samples.shape == (5, 3, 3)


def test_predictive_and_sampling_work_through_the_interface():
    model, likelihood, kw, X, y, loader = setup("classification")
    fl = FunctionalLaplace(model, likelihood).fit(loader)
    la = Laplace(model, likelihood, hessian_structure="full").fit(loader)
    xs = torch.randn(5, 2)
    torch.testing.assert_close(fl(xs), la(xs), rtol=1e-10, atol=1e-12)
    probs = fl(xs, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    grads = []  # enable_backprop: gradients of the predictive to the inputs
    for post in (fl, la):
        x = xs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(post(x, enable_backprop=True)[:, 0].sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 5. state and model
@pytest.mark.parametrize("mode", ["exact", "subset", "nystrom"])
def test_state_dict_round_trip(tmp_path, mode):
    model, likelihood, kw, X, y, loader = setup("regression")
    make = lambda: FunctionalLaplace(model, likelihood, prior_precision=layerwise(model),  # noqa: E731
                                     n_subset=None if mode == "exact" else 4,
                                     nystrom=mode == "nystrom", **kw)
    fl = make().fit(loader)
    torch.save(fl.state_dict(), tmp_path / "fl.pt")
    loaded = make().load_state_dict(torch.load(tmp_path / "fl.pt", weights_only=True))
    xs = torch.randn(3, 2)
    torch.testing.assert_close(loaded.log_marginal_likelihood(), fl.log_marginal_likelihood(),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(loaded.functional_moments(xs)[1], fl.functional_moments(xs)[1])
    torch.testing.assert_close(loaded.indices, fl.indices)
    other = FunctionalLaplace(model, likelihood, n_subset=3, **kw)
    with pytest.raises(ValueError, match="mode|n_subset"):
        other.load_state_dict(fl.state_dict() if mode == "exact" else {**fl.state_dict(),
                                                                       "n_subset": 5})
    with pytest.raises(ValueError, match="not a marglik.FunctionalLaplace"):
        make().load_state_dict(Laplace(model, likelihood, **kw).fit(loader).state_dict())


def test_the_model_is_left_as_it_was():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Tanh(),
                          nn.Linear(4, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model[0].bias.requires_grad_(False)
    model.register_forward_hook(lambda m, a, o: None)
    model.train()
    before = ({n: b.clone() for n, b in model.named_buffers()},
              [(n, p.requires_grad) for n, p in model.named_parameters()],
              [m.training for m in model.modules()], dict(model._forward_hooks))
    X, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    for kw in ({}, {"n_subset": 4, "nystrom": True}):
        fl = FunctionalLaplace(model, "classification", **kw).fit([(X, y)])
        fl(torch.randn(3, 2))
        fl.log_marginal_likelihood()
    after = ({n: b.clone() for n, b in model.named_buffers()},
             [(n, p.requires_grad) for n, p in model.named_parameters()],
             [m.training for m in model.modules()], dict(model._forward_hooks))
    for n in before[0]:
        assert torch.equal(before[0][n], after[0][n]), n
    assert before[1:] == after[1:]


# ------------------------------------------------------------------------------------ 6. errors
def test_clear_errors():
    model, likelihood, kw, X, y, loader = setup("classification")
    with pytest.raises(ValueError, match="nystrom=True needs n_subset"):
        FunctionalLaplace(model, likelihood, nystrom=True)
    with pytest.raises(ValueError, match="classification or binary"):
        FunctionalLaplace(model, "regression", n_subset=3, subset_method="class")
    with pytest.raises(ValueError, match="unknown subset_method"):
        FunctionalLaplace(model, likelihood, n_subset=3, subset_method="kmeans")
    with pytest.raises(ValueError, match="n_subset must be a positive integer"):
        FunctionalLaplace(model, likelihood, n_subset=0)
    with pytest.raises(ValueError, match="temperature"):
        FunctionalLaplace(model, likelihood, temperature=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        FunctionalLaplace(lambda x: x, likelihood)
    with pytest.raises(ValueError, match="sigma_noise only applies"):
        FunctionalLaplace(model, likelihood, sigma_noise=0.3)
    with pytest.raises(ValueError, match=r"n_subset must be an integer in \[1, 7\]"):
        FunctionalLaplace(model, likelihood, n_subset=8).fit(loader)
    with pytest.raises(RuntimeError, match="not fitted"):
        FunctionalLaplace(model, likelihood).log_marginal_likelihood()
    with pytest.raises(ValueError, match="empty"):
        FunctionalLaplace(model, likelihood).fit([])
    P = sum(p.numel() for p in model.parameters())
    ny = FunctionalLaplace(model, likelihood, n_subset=3, nystrom=True).fit(loader)
    with pytest.raises(ValueError, match="per-parameter prior precision"):
        ny.log_marginal_likelihood(torch.ones(P))
    with pytest.raises(ValueError, match="Nyström"):
        ny.sample(3)
    with pytest.raises(ValueError, match="prior_precision has 3 values"):
        ny.log_marginal_likelihood(torch.ones(3))
    with pytest.raises(ValueError, match="sigma_noise only applies"):
        ny.log_marginal_likelihood(sigma_noise=torch.tensor(1.0))
    shuffled = DataLoader(TensorDataset(X, y), batch_size=2, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shuffle=False"):
        FunctionalLaplace(model, likelihood, n_subset=3).fit(shuffled)
    with pytest.raises(ValueError, match="method='tangent' needs a weight-space"):
        ny.optimize_prior_precision(method="tangent", train_loader=loader)
    with pytest.raises(ValueError, match="one class label per point"):
        choose_subset(7, 2, "class", torch.randint(0, 3, (7, 2)))
    assert isinstance(marglik.FunctionalLaplace(model, likelihood), marglik.Posterior)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [{}, {"n_subset": 4, "subset_method": "class"},
                                {"n_subset": 4, "nystrom": True}])
def test_cuda_matches_cpu(kw):
    model, likelihood, _, X, y, loader = setup("classification")
    cpu = FunctionalLaplace(model, likelihood, prior_precision=layerwise(model), **kw)
    cpu.fit(loader)
    gpu = FunctionalLaplace(copy.deepcopy(model).cuda(), likelihood,
                            prior_precision=layerwise(model), **kw)
    gpu.fit([(a.cuda(), b.cuda()) for a, b in loader])
    xs = torch.randn(3, 2)
    torch.testing.assert_close(gpu.log_marginal_likelihood().cpu(),
                               cpu.log_marginal_likelihood(), rtol=1e-9, atol=0)
    torch.testing.assert_close(gpu.functional_moments(xs.cuda())[1].cpu(),
                               cpu.functional_moments(xs)[1], rtol=1e-9, atol=1e-12)
    if not kw.get("nystrom"):
        assert gpu.function_samples(xs.cuda(), 4).shape == (4, 3, 3)

"""Predictives: GLM covariance (layer-wise and generic) against brute force, links, API."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.posterior.glm import resolve_backend
from marglik.predictive import glm_moments, predict
from marglik.predictive.links import bridge, bridge_log_alpha, monte_carlo, probit
from tests import oracle


def loader(x, y, batch_size=7):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Tokens(nn.Module):
    """Linear over shared positions (tokens), a LayerNorm (no KFAC) and mean pooling."""

    def __init__(self, d_out=3):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, d_out)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))).mean(1))


class PerPosition(nn.Module):
    """Outputs per position (N, R, C): a Linear with sharing feeding a per-token head."""

    def __init__(self, d_out=3):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, d_out)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


MODELS = {
    # name: (constructor, input shape)
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)), (3,)),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.ReLU(inplace=True), nn.Conv2d(2, 3, 2),
            nn.Flatten(), nn.Linear(12, 4),
        ),
        (1, 5, 5),
    ),
    "tokens": (Tokens, (5, 3)),
}


def make_data(model, x_shape, task, n=20):
    x = torch.randn(n, *x_shape)
    with torch.no_grad():
        f = model(x)
    if task == "classification":
        return x, torch.randint(0, f.shape[-1], f.shape[:-1])
    if task == "binary":
        return x, torch.randint(0, 2, f.shape).double()
    return x, torch.randn(f.shape)


def fitted(model, task, x, y, structure="kron", **kw):
    sigma = {"sigma_noise": 0.7} if task == "regression" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "KFAC cannot express" the LayerNorm
        return marglik.Laplace(model, task, hessian_structure=structure, **sigma, **kw).fit(
            loader(x, y)
        )


def oracle_covariance(la, x):
    """J Σ Jᵀ with brute-force Jacobians and an explicit inverse of the posterior precision."""
    J = oracle.jacobians(la.model, x, la.subset.names)
    if la.subset.index is not None:
        J = J[..., la.subset.index]
    return J @ torch.linalg.inv(la.posterior_precision) @ J.mT


# ------------------------------------------------------------------------------ GLM covariance
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("name", MODELS)
def test_layerwise_equals_generic_and_oracle(name, task, structure, subset):
    make, x_shape = MODELS[name]
    model = make()
    x, y = make_data(model, x_shape, task)
    la = fitted(model, task, x, y, structure, subset_of_weights=subset)
    assert resolve_backend(la, "auto") is not None  # the fast path is taken
    xt = torch.randn(6, *x_shape)
    f_fast, v_fast = glm_moments(la, xt, backend="layerwise")
    f_gen, v_gen = glm_moments(la, xt, backend="generic")
    expected = oracle_covariance(la, xt)
    torch.testing.assert_close(v_fast, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(v_gen, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_fast, model(xt), rtol=0, atol=1e-12)
    torch.testing.assert_close(f_gen, model(xt), rtol=0, atol=1e-12)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_layerwise_with_layerwise_and_per_parameter_priors(structure):
    make, x_shape = MODELS["cnn"]
    model = make()
    x, y = make_data(model, x_shape, "regression")
    n_tensors = len(list(model.parameters()))
    la = fitted(model, "regression", x, y, structure, prior_precision=torch.rand(n_tensors) + 0.5)
    xt = torch.randn(5, *x_shape)
    _, v = glm_moments(la, xt, backend="layerwise")
    torch.testing.assert_close(v, oracle_covariance(la, xt), rtol=0, atol=1e-10)
    if structure in ("diag", "full"):
        la.prior_precision = torch.rand(la.n_params) + 0.5
    _, v = glm_moments(la, xt, backend="layerwise")
    torch.testing.assert_close(v, oracle_covariance(la, xt), rtol=0, atol=1e-10)


@pytest.mark.parametrize("structure", ["lowrank"])
def test_generic_path_for_lowrank_and_index_subnetworks(structure):
    make, x_shape = MODELS["mlp"]
    model = make()
    x, y = make_data(model, x_shape, "classification")
    la = fitted(model, "classification", x, y, structure, rank=7)
    assert resolve_backend(la, "auto") is None
    with pytest.raises(ValueError, match="layer-wise"):
        resolve_backend(la, "layerwise")
    xt = torch.randn(4, *x_shape)
    _, v = glm_moments(la, xt)
    torch.testing.assert_close(v, oracle_covariance(la, xt), rtol=0, atol=1e-10)
    sub = fitted(model, "classification", x, y, "diag", subset_of_weights="subnetwork",
                 subnetwork=torch.tensor([0, 3, 7, 20, 40]))
    assert resolve_backend(sub, "auto") is None
    _, v = glm_moments(sub, xt)
    torch.testing.assert_close(v, oracle_covariance(sub, xt), rtol=0, atol=1e-10)


def test_outputs_per_position_use_their_own_blocks():
    model = PerPosition()
    x = torch.randn(12, 4, 3)
    y = torch.randint(0, 3, (12, 4))
    la = fitted(model, "classification", x, y, "kron")
    xt = torch.randn(3, 4, 3)
    _, v = glm_moments(la, xt, backend="layerwise")
    cov = oracle_covariance(la, xt)  # (3, 12, 12) over (position, class)
    torch.testing.assert_close(v, cov, rtol=0, atol=1e-10)
    probs = la(xt)
    assert probs.shape == (3, 4, 3)
    blocks = torch.stack([cov[:, 3 * r : 3 * r + 3, 3 * r : 3 * r + 3] for r in range(4)], 1)
    torch.testing.assert_close(probs, probit(model(xt), blocks), rtol=0, atol=1e-12)


def test_glm_mean_equals_the_map_output_and_chunking_changes_nothing():
    make, x_shape = MODELS["cnn"]
    model = make()
    x, y = make_data(model, x_shape, "regression")
    la = fitted(model, "regression", x, y)
    xt = torch.randn(9, *x_shape)
    f, v = la(xt)
    torch.testing.assert_close(f, model(xt), rtol=0, atol=1e-12)
    for chunk in (1, 4):
        f_c, v_c = la(xt, chunk_size=chunk)
        torch.testing.assert_close(f_c, f, rtol=0, atol=1e-13)
        torch.testing.assert_close(v_c, v, rtol=0, atol=1e-13)
    f_g, v_g = predict(la, xt, backend="generic", chunk_size=2)
    torch.testing.assert_close(v_g, v, rtol=0, atol=1e-12)


def test_glm_is_the_exact_bayesian_predictive_for_a_linear_gaussian_model():
    """f = W x with a Gaussian prior and likelihood: the posterior is Gaussian and exact."""
    N, D_in, C, sigma, delta = 30, 3, 2, 0.5, 2.0
    X, Y = torch.randn(N, D_in), torch.randn(N, C)
    # θ = vec(W) row-major: precision kron(I_C, XᵀX)/σ² + δ I, mean P⁻¹ vec(Yᵀ X)/σ²
    P = torch.kron(torch.eye(C), X.T @ X) / sigma**2 + delta * torch.eye(C * D_in)
    Sigma = torch.linalg.inv(P)
    theta = Sigma @ (Y.T @ X).reshape(-1) / sigma**2
    xt = torch.randn(5, D_in)
    Phi = torch.stack([torch.kron(torch.eye(C), xi[None]) for xi in xt])  # (5, C, C·D_in)
    for structure in ("full", "kron"):
        model = nn.Linear(D_in, C, bias=False)
        with torch.no_grad():
            model.weight.copy_(theta.reshape(C, D_in))
        la = marglik.Laplace(model, "regression", hessian_structure=structure,
                             sigma_noise=sigma, prior_precision=delta).fit(loader(X, Y))
        f_mean, f_var = la(xt)
        torch.testing.assert_close(f_mean, (Phi @ theta), rtol=0, atol=1e-12)
        torch.testing.assert_close(f_var, Phi @ Sigma @ Phi.mT, rtol=0, atol=1e-12)
        _, y_var = la(xt, pred_var=True)
        torch.testing.assert_close(y_var, Phi @ Sigma @ Phi.mT + sigma**2 * torch.eye(C),
                                   rtol=0, atol=1e-12)
        mean_j, cov_j = la(xt, joint=True, pred_var=True)
        Phi_j = Phi.reshape(-1, C * D_in)
        torch.testing.assert_close(mean_j, Phi_j @ theta, rtol=0, atol=1e-12)
        torch.testing.assert_close(cov_j, Phi_j @ Sigma @ Phi_j.T + sigma**2 * torch.eye(5 * C),
                                   rtol=0, atol=1e-12)


def test_pred_var_adds_a_per_output_noise():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(15, 2), torch.randn(15, 3)
    sigma = torch.tensor([0.3, 0.5, 0.9])
    la = marglik.Laplace(model, "regression", sigma_noise=sigma).fit(loader(x, y))
    xt = torch.randn(4, 2)
    _, f_var = la(xt)
    _, y_var = la(xt, pred_var=True)
    torch.testing.assert_close(y_var - f_var, torch.diag(sigma**2).expand(4, 3, 3))


@pytest.mark.parametrize("backend", ["layerwise", "generic"])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_joint_covariance_diagonal_blocks_equal_per_input_covariances(task, backend):
    make, x_shape = MODELS["tokens"]
    model = make()
    x, y = make_data(model, x_shape, task)
    la = fitted(model, task, x, y, "kron")
    xt = torch.randn(4, *x_shape)
    _, marginal = glm_moments(la, xt, backend=backend)
    mean, joint = predict(la, xt, joint=True, backend=backend)
    assert mean.shape == (12,) and joint.shape == (12, 12)
    blocks = torch.stack([joint[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] for i in range(4)])
    torch.testing.assert_close(blocks, marginal, rtol=0, atol=1e-12)
    J = oracle.jacobians(model, xt).reshape(12, -1)
    torch.testing.assert_close(joint, J @ torch.linalg.inv(la.posterior_precision) @ J.T,
                               rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_enable_backprop_gives_gradients_to_the_inputs(structure):
    torch.manual_seed(1)
    make, x_shape = MODELS["tokens"]
    model = make()
    x, y = make_data(model, x_shape, "regression")
    la = fitted(model, "regression", x, y, structure)
    xt = torch.randn(2, *x_shape, requires_grad=True)
    check = lambda fn: torch.autograd.gradcheck(fn, (xt,), fast_mode=True)  # noqa: E731
    check(lambda z: la(z, enable_backprop=True))
    check(lambda z: la(z, joint=True, enable_backprop=True))
    mc = fitted(model, "classification", x, torch.randint(0, 3, (20,)), structure)
    for link in ("probit", "bridge_norm"):
        check(lambda z, link=link: mc(z, link_approx=link, enable_backprop=True))
    f_mean, f_var = la(xt)  # detached by default, even for inputs that require grad
    assert not f_mean.requires_grad and not f_var.requires_grad and not mc(xt).requires_grad
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------ links
def gauss_hermite_sigmoid(m, v, n=80):
    nodes, weights = np.polynomial.hermite.hermgauss(n)
    f = m + math.sqrt(2 * v) * torch.as_tensor(nodes)
    return (torch.sigmoid(f) * torch.as_tensor(weights)).sum() / math.sqrt(math.pi)


def test_probit_and_monte_carlo_against_quadrature_in_the_binary_case():
    means, variances = torch.tensor([-2.0, 0.3, 1.5, 4.0]), torch.tensor([0.1, 1.0, 3.0, 9.0])
    exact = torch.stack([gauss_hermite_sigmoid(m, v) for m, v in zip(means, variances)])
    f_var = torch.diag_embed(variances[:, None])  # (4, 1, 1)
    p_probit = probit(means[:, None], f_var, binary=True)[:, 0]
    assert (p_probit - exact).abs().max() < 0.02  # MacKay's approximation error
    gen = torch.Generator().manual_seed(0)
    p_mc = monte_carlo(means[:, None], f_var, 200_000, binary=True, generator=gen)[:, 0]
    assert (p_mc - exact).abs().max() < 4e-3  # ≈ 4 standard errors
    # vanishing variance: both give the plug-in sigmoid
    zero = torch.zeros(4, 1, 1)
    p_zero = probit(means[:, None], zero, binary=True)[:, 0]
    torch.testing.assert_close(p_zero, torch.sigmoid(means))


def test_monte_carlo_softmax_against_a_large_independent_sample():
    mean = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    A = torch.randn(2, 3, 3)
    cov = A @ A.mT + 0.1 * torch.eye(3)
    gen = torch.Generator().manual_seed(1)
    L = torch.linalg.cholesky(cov)
    eps = torch.randn(1_000_000, 2, 3, 1, generator=gen)
    exact = torch.softmax(mean + (L @ eps).squeeze(-1), -1).mean(0)
    p = monte_carlo(mean, cov, 100_000, generator=torch.Generator().manual_seed(2))
    assert (p - exact).abs().max() < 5e-3
    singular = torch.zeros(2, 3, 3)
    singular[:, 0, 0] = 1.0  # rank one: the Cholesky fallback
    assert torch.isfinite(monte_carlo(mean, singular, 10)).all()


def laplace_of_dirichlet(alpha):
    """MacKay's Laplace approximation of Dir(α) in the softmax basis: (..., K), (..., K, K)."""
    K = alpha.shape[-1]
    mu = alpha.log() - alpha.log().mean(-1, keepdim=True)
    inv = 1 / alpha
    cov = (torch.diag_embed(inv) - (inv[..., :, None] + inv[..., None, :]) / K
           + inv.sum(-1)[..., None, None] / K**2)
    return mu, cov


def test_laplace_bridge_inverts_the_laplace_approximation_of_a_dirichlet():
    alpha = torch.rand(5, 4) * 10 + 0.2
    mu, cov = laplace_of_dirichlet(alpha)
    torch.testing.assert_close(bridge_log_alpha(mu, cov).exp(), alpha, rtol=1e-10, atol=0)
    torch.testing.assert_close(bridge(mu, cov), alpha / alpha.sum(-1, keepdim=True))
    # concentrated Dirichlets (tiny variance): the bridge's mean is softmax(μ) exactly
    for c in (1e2, 1e8):
        m = torch.randn(5, 4)
        mu, cov = laplace_of_dirichlet(c * m.exp())
        torch.testing.assert_close(bridge(mu, cov), torch.softmax(m, -1), rtol=0, atol=1e-12)


def test_laplace_bridge_properties():
    mean, A = torch.randn(6, 5), torch.randn(6, 5, 5)
    cov = A @ A.mT + 0.1 * torch.eye(5)
    for normalize in (False, True):
        p = bridge(mean, cov, normalize)
        assert torch.all(p > 0) and torch.allclose(p.sum(-1), torch.ones(6))
        # softmax is shift invariant, and so is the bridge (it sees the centred logits)
        torch.testing.assert_close(bridge(mean + 3.0, cov, normalize), p)
    # the normalised bridge is invariant to (μ, Σ) → (√k μ, k Σ)
    torch.testing.assert_close(bridge(2 * mean, 4 * cov, True), bridge(mean, cov, True))
    # two classes: the centred variances are equal, so the plain bridge returns softmax(μ)
    m2, c2 = torch.randn(6, 2), cov[:, :2, :2]
    torch.testing.assert_close(bridge(m2, c2), torch.softmax(m2, -1))
    # equal isotropic variances: the ordering of the classes is kept (not softmax(μ) in general)
    iso = 1e-6 * torch.eye(5).expand(6, 5, 5)
    assert torch.equal(bridge(mean, iso).argmax(-1), mean.argmax(-1))
    # zero variance stays finite
    assert torch.isfinite(bridge(mean, torch.zeros(6, 5, 5), True)).all()


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm", "mc"])
def test_classification_links_through_laplace(link):
    make, x_shape = MODELS["mlp"]
    model = make()
    x, y = make_data(model, x_shape, "classification")
    la = fitted(model, "classification", x, y)
    xt = torch.randn(7, *x_shape)
    p = la(xt, link_approx=link, n_samples=50, generator=torch.Generator().manual_seed(0))
    assert p.shape == (7, 4) and torch.allclose(p.sum(-1), torch.ones(7))
    f, v = glm_moments(la, xt)
    expected = {"probit": lambda: probit(f, v), "bridge": lambda: bridge(f, v),
                "bridge_norm": lambda: bridge(f, v, True),
                "mc": lambda: monte_carlo(f, v, 50, generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(p, expected[link](), rtol=0, atol=1e-12)


def test_binary_links():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = make_data(model, (3,), "binary")
    la = fitted(model, "binary", x, y)
    xt = torch.randn(4, 3)
    f, v = glm_moments(la, xt)
    torch.testing.assert_close(la(xt), probit(f, v, binary=True))
    assert la(xt, link_approx="mc").shape == (4, 2)
    with pytest.raises(ValueError, match="bridge"):
        la(xt, link_approx="bridge")


# ------------------------------------------------------------------------------ nn predictive
def test_nn_predictive_approaches_the_map_as_the_prior_precision_grows():
    make, x_shape = MODELS["mlp"]
    model = make()
    x, y = make_data(model, x_shape, "classification")
    xt = torch.randn(5, *x_shape)
    map_probs = torch.softmax(model(xt), -1).detach()
    errors = []
    for delta in (1.0, 1e2, 1e6):
        la = fitted(model, "classification", x, y, prior_precision=delta)
        p = la(xt, pred_type="nn", n_samples=30, generator=torch.Generator().manual_seed(0))
        errors.append((p - map_probs).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3
    reg = fitted(model, "regression", x, torch.randn(20, 4), prior_precision=1e8)
    mean, var = reg(xt, pred_type="nn", n_samples=20)
    torch.testing.assert_close(mean, model(xt).detach(), rtol=0, atol=1e-3)
    _, y_var = reg(xt, pred_type="nn", n_samples=20, pred_var=True)
    assert y_var.shape == (5, 4, 4) and torch.all(y_var.diagonal(dim1=1, dim2=2) >= 0.49)


def test_glm_beats_nn_predictive_on_two_moons():
    """Immer, Korzepa & Bauer 2021: at the same δ the GLM predictive has the better NLL."""
    from sklearn.datasets import make_moons

    X, Y = make_moons(300, noise=0.2, random_state=0)
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    x, y, xt, yt = X[:200], Y[:200], X[200:], Y[200:]
    model = nn.Sequential(nn.Linear(2, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(),
                          nn.Linear(30, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    la = marglik.Laplace(model, "classification", prior_precision=1.0).fit(loader(x, y, 50))
    la.optimize_prior_precision(method="marglik", n_steps=50)
    nll = {}
    for pred_type in ("glm", "nn"):
        p = la(xt, pred_type=pred_type, n_samples=100, generator=torch.Generator().manual_seed(0))
        nll[pred_type] = -p[torch.arange(len(yt)), yt].log().mean().item()
    assert nll["glm"] < nll["nn"]


# ------------------------------------------------------------------------------ API and model
@pytest.mark.parametrize("call", [
    {}, {"backend": "generic"}, {"pred_type": "nn", "n_samples": 3}, {"joint": True},
    {"link_approx": "mc", "n_samples": 3},
])
def test_prediction_leaves_the_model_exactly_as_it_was(call):
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.ReLU(inplace=True), nn.Linear(5, 4))
    x, y = make_data(model.eval(), (3,), "classification")
    la = fitted(model, "classification", x, y)
    model.train()
    model[3].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict(la, torch.randn(6, 3), **call)
    assert model.training and all(m.training for m in model.modules())
    assert not model[3].bias.requires_grad and model[0].weight.requires_grad
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_arguments_raise_clear_errors():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = make_data(model, (3,), "classification")
    unfitted = marglik.Laplace(model, "classification")
    with pytest.raises(RuntimeError, match="not fitted"):
        unfitted(x)
    la = fitted(model, "classification", x, y)
    with pytest.raises(ValueError, match="pred_type"):
        la(x, pred_type="laplace")
    with pytest.raises(ValueError, match="link_approx"):
        la(x, link_approx="sigmoid")
    with pytest.raises(ValueError, match="backend"):
        predict(la, x, backend="fast")
    with pytest.raises(ValueError, match="cannot be applied"):
        la(torch.randn(4, 7))
    with pytest.raises(ValueError, match="batch"):
        la(torch.randn(0, 3))
    with pytest.raises(ValueError, match="tensor"):
        la([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="NaN"):
        la(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="pred_var"):
        la(x, pred_var=True)
    with pytest.raises(ValueError, match="joint"):
        la(x, pred_type="nn", joint=True)
    with pytest.raises(ValueError, match="n_samples"):
        la(x, link_approx="mc", n_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        la(x, chunk_size=0)


def test_probit_ignores_common_mode_logit_variance():
    """softmax(f + c·1) = softmax(f): variance along 1 must not flatten the probit prediction."""
    from marglik.predictive.links import probit

    mean = torch.tensor([[2.0, -1.0, 0.5]])
    A = torch.randn(3, 3)
    var = A @ A.T
    P = torch.eye(3) - 1 / 3
    centred = P @ var @ P  # rows sum to zero: the plain formula applies unchanged
    expected = torch.softmax((P @ mean[0]) / torch.sqrt(1 + torch.pi / 8 * centred.diagonal()), -1)
    torch.testing.assert_close(probit(mean, var[None])[0], expected)
    torch.testing.assert_close(probit(mean, (var + 5.0)[None]), probit(mean, var[None]))

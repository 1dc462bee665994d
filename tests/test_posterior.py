"""The Laplace posterior: evidence, sampling, log-density, subsets, saving — against brute force."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal
from torch.utils.data import DataLoader, TensorDataset

import marglik
from tests import oracle


def loader(x, y, batch_size=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


# ---- evidence of a linear-Gaussian model equals its closed form --------------------------------
def linear_gaussian(n=30, d=4, c=2, orthogonal=False):
    phi = torch.randn(n, d)
    if orthogonal:  # ΦᵀΦ diagonal, so the diagonal GGN is exact
        phi = torch.linalg.qr(phi)[0] * torch.tensor([3.0, 2.0, 1.0, 0.5])
    model = nn.Linear(d, c, bias=False)
    y = phi @ torch.randn(d, c) + 0.3 * torch.randn(n, c)
    return model, phi, y


def set_posterior_mode(model, phi, y, delta, sigma, mu0):
    """θ* = P⁻¹(Φᵀy/σ² + δμ0) per output (rows of W), so the Laplace evidence is exact."""
    P = phi.T @ phi / sigma**2 + delta * torch.eye(phi.shape[1])
    W = torch.linalg.solve(P, phi.T @ y / sigma**2 + delta * mu0).T
    with torch.no_grad():
        model.weight.copy_(W)


def closed_form_evidence(phi, y, delta, sigma, mu0):
    cov = phi @ phi.T / delta + sigma**2 * torch.eye(len(y))
    return sum(
        oracle.gaussian_log_density(y[:, c], phi @ mu0[:, c], cov) for c in range(y.shape[1])
    )


@pytest.mark.parametrize(
    ("structure", "orthogonal"),
    [("full", False), ("kron", False), ("diag", True), ("lowrank", False)],
)
def test_linear_gaussian_evidence_equals_closed_form(structure, orthogonal):
    model, phi, y = linear_gaussian(orthogonal=orthogonal)
    delta, sigma = 0.7, 0.4
    mu0 = 0.1 * torch.randn(4, 2)
    set_posterior_mode(model, phi, y, delta, sigma, mu0)
    la = marglik.Laplace(
        model,
        "regression",
        hessian_structure=structure,
        prior_precision=delta,
        sigma_noise=sigma,
        prior_mean=mu0.T.reshape(-1),
        rank=8,
    )
    la.fit(loader(phi, y))
    expected = closed_form_evidence(phi, y, delta, sigma, mu0)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)


def test_evidence_is_differentiable_and_rescales_with_sigma():
    model, phi, y = linear_gaussian()
    la = marglik.Laplace(model, "regression", hessian_structure="full", sigma_noise=0.5).fit(
        loader(phi, y)
    )
    # evidence at a new σ without refitting equals a posterior fitted at that σ
    refit = marglik.Laplace(model, "regression", hessian_structure="full", sigma_noise=0.8).fit(
        loader(phi, y)
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(sigma_noise=torch.tensor(0.8)),
        refit.log_marginal_likelihood(),
        rtol=1e-12,
        atol=1e-12,
    )
    # gradients in δ and σ match central finite differences
    log_delta, log_sigma = (
        torch.tensor(0.3, requires_grad=True),
        torch.tensor(-0.2, requires_grad=True),
    )
    value = la.log_marginal_likelihood(log_delta.exp(), log_sigma.exp())
    value.backward()
    h = 1e-6
    for param, grad in [(log_delta, log_delta.grad), (log_sigma, log_sigma.grad)]:
        with torch.no_grad():
            param += h
            up = la.log_marginal_likelihood(log_delta.exp(), log_sigma.exp())
            param -= 2 * h
            down = la.log_marginal_likelihood(log_delta.exp(), log_sigma.exp())
            param += h
        torch.testing.assert_close(grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def test_evidence_of_a_network_equals_brute_force_with_temperature_and_layerwise_prior():
    model = mlp()
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    prior = torch.tensor([0.5, 1.0, 2.0, 3.0])  # one per parameter tensor
    la = marglik.Laplace(
        model, "classification", hessian_structure="full", prior_precision=prior, temperature=0.5
    ).fit(loader(x, y))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    delta = torch.cat(
        [torch.full((p.numel(),), float(d)) for p, d in zip(model.parameters(), prior)]
    )
    log_lik = -oracle.categorical_nll(model(x), y).detach()
    H = oracle.ggn(model, x, y, oracle.categorical_nll) / 0.5
    expected = oracle.laplace_evidence(log_lik, theta, H, delta)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        la.posterior_precision, H + torch.diag(delta), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        la.posterior_covariance, torch.linalg.inv(H + torch.diag(delta)), rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_layerwise_evidence_and_its_gradient_equal_the_dense_computation(structure):
    """The per-block path (one δ per Kronecker/bias block) = slogdet of the dense precision."""
    model = mlp()
    x, y = torch.randn(25, 3), torch.randint(0, 4, (25,))
    la = marglik.Laplace(model, "classification", hessian_structure=structure).fit(loader(x, y))
    prior = torch.tensor([0.5, 1.5, 2.0, 3.0], requires_grad=True)
    counts = torch.tensor([p.numel() for p in model.parameters()])
    got = la.log_marginal_likelihood(prior)
    (grad,) = torch.autograd.grad(got, prior)
    ref_prior = prior.detach().clone().requires_grad_(True)
    expected = oracle.laplace_evidence(
        la.log_likelihood(), la.mean, la.H.to_dense(), ref_prior.repeat_interleave(counts)
    )
    (ref_grad,) = torch.autograd.grad(expected, ref_prior)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_mackay_fixed_point_holds_at_the_optimised_scalar_prior(structure):
    model = mlp()
    x, y = torch.randn(30, 3), torch.randint(0, 4, (30,))
    la = marglik.Laplace(model, "classification", hessian_structure=structure).fit(loader(x, y))
    la.optimize_prior_precision(method="marglik", prior_structure="scalar", n_steps=1000, lr=0.05)
    delta = la.prior_precision
    eig = torch.linalg.eigvalsh(la.H.to_dense()) if structure != "diag" else la.H.diag()
    if structure == "kron":  # eigenvalues of each Kronecker block G ⊗ A
        eig = torch.cat([torch.linalg.eigvalsh(b.to_dense()) for b in la.H.blocks])
    lhs = delta * (la.mean**2).sum()
    rhs = (eig / (eig + delta)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-8)


def test_optimize_prior_precision_layerwise_and_sigma_improve_the_evidence():
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(40, 2)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(40, 1)
    la = marglik.Laplace(model, "regression", hessian_structure="kron").fit(loader(x, y))
    before = la.log_marginal_likelihood().item()
    history = la.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                          tune_sigma=True, n_steps=200)
    assert la.prior_precision.shape == (4,) and la.sigma_noise.shape == ()
    assert history["log_marglik"][-1] > before
    assert la.log_marginal_likelihood().item() == pytest.approx(
        max(history["log_marglik"]), abs=0.5
    )
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(method="marglik", prior_structure="blockwise")


# ---- the Gaussian posterior: log_prob and samples -----------------------------------------------
@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
def test_log_prob_and_samples_match_the_dense_gaussian(structure):
    model = mlp()
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    la = marglik.Laplace(
        model, "classification", hessian_structure=structure, prior_precision=0.5, rank=10
    ).fit(loader(x, y))
    mvn = MultivariateNormal(la.mean, precision_matrix=la.posterior_precision)
    theta = la.mean + 0.1 * torch.randn(5, la.n_params)
    torch.testing.assert_close(la.log_prob(theta), mvn.log_prob(theta), rtol=1e-10, atol=1e-10)
    n = 20000
    samples = la.sample(n, generator=torch.Generator().manual_seed(1))
    Sigma = la.posterior_covariance
    torch.testing.assert_close(la.posterior_variance, Sigma.diagonal(), rtol=1e-10, atol=1e-12)
    # Monte Carlo: E‖Ŝ − Σ‖²_F ≈ ((tr Σ)² + ‖Σ‖²_F)/n for Gaussian samples; allow twice that
    expected_error = math.sqrt((Sigma.trace() ** 2 + Sigma.square().sum()) / n)
    assert (torch.cov(samples.T) - Sigma).norm() < 2 * expected_error
    assert ((samples.mean(0) - la.mean).abs() < 5 * (Sigma.diagonal() / n).sqrt()).all()


# ---- subsets ----
def test_last_layer_by_detection_name_mask_and_requires_grad_agree():
    model = mlp()
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    auto = marglik.Laplace(model, "classification", "last_layer", "full").fit(loader(x, y))
    named = marglik.Laplace(model, "classification", "last_layer", "full", last_layer_name="2").fit(
        loader(x, y)
    )
    mask = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
    mask[-24:] = True
    masked = marglik.Laplace(model, "classification", "subnetwork", "full", subnetwork=mask).fit(
        loader(x, y)
    )
    by_module = marglik.Laplace(
        model, "classification", "subnetwork", "full", subnetwork=["2"]
    ).fit(loader(x, y))
    for p in model[0].parameters():
        p.requires_grad_(False)
    trainable = marglik.Laplace(model, "classification", "requires_grad", "full").fit(loader(x, y))
    H = oracle.ggn(model, x, y, oracle.categorical_nll, names=["2.weight", "2.bias"])
    for la in (auto, named, masked, by_module, trainable):
        assert la.n_params == 24
        torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(la.log_marginal_likelihood(), auto.log_marginal_likelihood())


def test_layerwise_prior_for_last_layer_kfac():
    """laplace-torch #116: a layer-wise prior must work for a last-layer posterior."""
    model = mlp()
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    la = marglik.Laplace(model, "classification", "last_layer", "kron").fit(loader(x, y))
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=20)
    assert la.prior_precision.shape == (2,)
    H = oracle.ggn(model, x, y, oracle.categorical_nll, names=["2.weight", "2.bias"])
    delta = la.expand_prior(la.prior_precision)
    theta = la.mean
    blocks = torch.block_diag(*[b.to_dense() for b in la.H.blocks])
    log_lik = -oracle.categorical_nll(model(x), y).detach()
    expected = oracle.laplace_evidence(log_lik, theta, blocks, delta)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(blocks, H)  # KFAC is an approximation for softmax outputs


def test_subnetwork_indices_select_entries():
    model = mlp()
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    index = torch.tensor([0, 5, 17, 30, 43])
    la = marglik.Laplace(model, "classification", "subnetwork", "full", subnetwork=index).fit(
        loader(x, y)
    )
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    torch.testing.assert_close(la.H.to_dense(), H[index][:, index], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="KFAC needs whole parameter tensors"):
        marglik.Laplace(model, "classification", "subnetwork", "kron", subnetwork=index).fit(
            loader(x, y)
        )


# ---- saving and loading ----
@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank", "kernel"])
def test_state_dict_round_trip(structure, tmp_path):
    model = mlp()
    x, y = torch.randn(20, 3), torch.randn(20, 4)
    la = marglik.Laplace(model, "regression", hessian_structure=structure, rank=6, sigma_noise=0.3)
    la.fit(loader(x, y))
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", tune_sigma=True,
                                n_steps=5)
    torch.save(la.state_dict(), tmp_path / "la.pt")
    state = torch.load(tmp_path / "la.pt", weights_only=True)
    new = marglik.Laplace(model, "regression", hessian_structure=structure).load_state_dict(state)
    torch.testing.assert_close(new.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(new.posterior_precision, la.posterior_precision)
    torch.testing.assert_close(new(x[:3])[1], la(x[:3])[1])
    with pytest.raises(ValueError, match="hessian_structure"):
        other = "diag" if structure != "diag" else "full"
        marglik.Laplace(model, "regression", hessian_structure=other).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match the model"):
        marglik.Laplace(
            nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)),
            "regression",
            hessian_structure=structure,
        ).load_state_dict(state)


def test_last_layer_detection_casts_inputs_to_the_model_dtype():
    model = mlp().float()
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))  # float64 data, float32 model
    la = marglik.Laplace(model, "classification", "last_layer").fit(loader(x, y))
    assert la.subset.names == ["2.weight", "2.bias"] and la.H.dtype == torch.float32


def test_sigma_noise_with_a_gaussian_likelihood_object_is_applied_not_ignored():
    from marglik.likelihoods import Categorical, Gaussian

    model = nn.Sequential(nn.Linear(3, 1))
    lik = Gaussian(1.0)
    la = marglik.Laplace(model, lik, sigma_noise=0.3)
    torch.testing.assert_close(la.sigma_noise, torch.tensor(0.3))
    with pytest.raises(ValueError, match="only applies to regression"):
        marglik.Laplace(model, Categorical(), sigma_noise=0.3)

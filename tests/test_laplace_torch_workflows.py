"""laplace-torch's documented workflows, ported as its users write them, checked independently.

The regression loop of its regression example (1-element log-hyperparameters, Adam on
−log_marginal_likelihood, then ``la(x)``), its README's classification with grid search on a
validation loader, ``marglik_training(optimizer_kwargs=...)`` with its four return values, and the
LoRA example (``subset_of_weights="all"`` over the weights that require grad). References are
dense: Jacobians and GGNs from ``tests/oracle.py``, inverses and slogdets written out here.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.training import marglik_training
from tests import oracle


def sinusoid(n=80, sigma=0.3):
    X = torch.rand(n, 1) * 8
    return X, torch.sin(X) + sigma * torch.randn_like(X)


def regression_map(X, y, hidden=20, steps=600):
    model = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    return model


def theta_of(model, names=None):
    return torch.cat([p.detach().reshape(-1) for p in oracle.parameter_dict(model, names).values()])


# ---- the regression loop of laplace-torch's regression example ----------------------------------
@pytest.mark.parametrize("structure", ["full", "kron"])
def test_regression_loop_keeps_the_tuned_hyperparameters_for_prediction(structure):
    X, y = sinusoid()
    model = regression_map(X, y)
    train_loader = DataLoader(TensorDataset(X, y), batch_size=32)
    la = marglik.Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure)
    la.fit(train_loader)
    # verbatim from laplace-torch's docs, with 1-element tensors
    log_prior, log_sigma = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(100):
        hyper_optimizer.zero_grad()
        neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg_marglik.backward()
        hyper_optimizer.step()
    assert neg_marglik.requires_grad  # the returned value keeps its graph

    # kept as laplace-torch keeps them: the values of the last call, detached
    delta, sigma = la.prior_precision, la.sigma_noise
    assert not delta.requires_grad and not sigma.requires_grad
    assert delta.numel() == 1 and sigma.numel() == 1
    assert abs(delta.item() - 1.0) > 0.5 and abs(sigma.item() - 1.0) > 0.5  # really tuned
    assert 0.2 < sigma.item() < 0.45  # data noise 0.3
    # the last step moved log δ by about lr past the stored value, no further
    assert abs(delta.log().item() - log_prior.item()) < 0.15

    X_test = torch.linspace(-1, 9, 11)[:, None]
    f_mu, f_var = la(X_test)
    fresh = marglik.Laplace(model, "regression", "all", structure, prior_precision=delta.item(),
                            sigma_noise=sigma.item()).fit(train_loader)
    f_mu2, f_var2 = fresh(X_test)
    torch.testing.assert_close(f_var, f_var2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f_mu, f_mu2)
    torch.testing.assert_close(la.log_marginal_likelihood(), fresh.log_marginal_likelihood(),
                               rtol=1e-10, atol=1e-10)
    # the untuned δ = σ = 1 predicts variances several times larger (the bug this guards)
    untuned = marglik.Laplace(model, "regression", "all", structure).fit(train_loader)
    assert (untuned(X_test)[1] / f_var).median() > 3

    if structure == "full":  # against the dense linearised posterior written out here
        J_train = oracle.jacobians(model, X).reshape(len(X), -1)
        J_test = oracle.jacobians(model, X_test).reshape(len(X_test), -1)
        P = J_train.T @ J_train / sigma**2 + delta * torch.eye(J_train.shape[1])
        Sigma = torch.linalg.inv(P)
        ref = torch.einsum("np,pq,nq->n", J_test, Sigma, J_test)
        torch.testing.assert_close(f_var.reshape(-1), ref, rtol=1e-8, atol=1e-12)
        theta = theta_of(model)
        resid = (model(X) - y).detach()
        log_lik = (-0.5 * resid.square().sum() / sigma**2
                   - len(X) * torch.log(sigma * math.sqrt(2 * math.pi)))
        evidence = (log_lik - 0.5 * delta * theta @ theta
                    - 0.5 * (torch.linalg.slogdet(P)[1] - theta.numel() * delta.log()))
        torch.testing.assert_close(la.log_marginal_likelihood(), evidence.reshape(()),
                                   rtol=1e-10, atol=1e-10)
        # the scale and covariance laplace-torch exposes
        L = la.posterior_scale
        torch.testing.assert_close(L @ L.T, Sigma, rtol=1e-8, atol=1e-10)
        assert torch.equal(L, L.tril())


def test_one_element_prior_precision_is_a_scalar_everywhere():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    one = marglik.Laplace(model, "classification", "all", "full",
                          prior_precision=torch.tensor([2.5])).fit(loader)
    scalar = marglik.Laplace(model, "classification", "all", "full",
                             prior_precision=2.5).fit(loader)
    assert one.prior_precision.shape == ()
    torch.testing.assert_close(one.log_marginal_likelihood(), scalar.log_marginal_likelihood())
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    expected = oracle.laplace_evidence(-oracle.categorical_nll(model(x), y).detach(),
                                       theta_of(model), H, torch.tensor(2.5))
    log_prior = torch.full((1,), math.log(2.5), requires_grad=True)
    value = scalar.log_marginal_likelihood(log_prior.exp())
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(value, log_prior)
    assert grad.shape == (1,)
    one.prior_precision = torch.tensor([0.7])
    scalar.prior_precision = 0.7
    torch.testing.assert_close(one.posterior_covariance, scalar.posterior_covariance)
    # laplace-torch's properties (log_likelihood, scatter, log_det_ratio stay methods here)
    torch.testing.assert_close(one.prior_precision_diag, torch.full((one.n_params,), 0.7))
    torch.testing.assert_close(one.log_det_posterior_precision,
                               torch.linalg.slogdet(H + 0.7 * torch.eye(one.n_params))[1])
    torch.testing.assert_close(one.log_det_prior_precision,
                               one.n_params * torch.tensor(0.7).log())
    torch.testing.assert_close(one.log_det_ratio(), one.log_det_posterior_precision
                               - one.log_det_prior_precision)


# ---- laplace-torch's README: classification, grid search on a validation loader -----------------
def projected_probit(f, cov):
    """softmax(Pμ / √(1 + π/8 diag(PΣP))), P = I − 11ᵀ/C: marglik's probit, written out."""
    C = f.shape[-1]
    P = torch.eye(C) - torch.full((C, C), 1.0 / C)
    mean, var = f @ P, torch.einsum("ij,njk,lk->nil", P, cov, P).diagonal(dim1=-2, dim2=-1)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)


def test_readme_classification_gridsearch_picks_the_validation_nll_minimiser():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])

    def draw(n):
        y = torch.randint(0, 3, (n,))
        return centres[y] + 0.9 * torch.randn(n, 2), y

    x, y = draw(60)
    xv, yv = draw(40)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    train_loader = DataLoader(TensorDataset(x, y), batch_size=16)
    val_loader = DataLoader(TensorDataset(xv, yv), batch_size=16)

    la = marglik.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(train_loader)
    history = la.optimize_prior_precision(
        method="gridsearch", pred_type="glm", link_approx="probit", val_loader=val_loader,
        grid_size=17,
    )
    pred = la(xv, pred_type="glm", link_approx="probit")
    assert pred.shape == (40, 3)

    grid = torch.logspace(-4, 4, 17)
    h = oracle.ggn(model, x, y, oracle.categorical_nll).diagonal()
    J = oracle.jacobians(model, xv)  # (B, C, P)
    f = model(xv).detach()
    nlls = []
    for delta in grid:
        f_var = torch.einsum("ncp,p,ndp->ncd", J, 1 / (h + delta), J)
        probs = projected_probit(f, f_var)
        nlls.append(-probs.log().gather(1, yv[:, None]).mean())
    nlls = torch.stack(nlls)
    torch.testing.assert_close(torch.tensor(history["loss"]), nlls, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.prior_precision, grid[nlls.argmin()].reshape(()))
    torch.testing.assert_close(pred, projected_probit(
        f, torch.einsum("ncp,p,ndp->ncd", J, 1 / (h + grid[nlls.argmin()]), J)))

    # laplace-torch's marglik call with its keywords; val_loader is ignored there, with a warning
    with pytest.warns(UserWarning, match="val_loader is ignored"):
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit",
                                    val_loader=val_loader, n_steps=5)
    with pytest.raises(ValueError, match="needs a validation loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="pred_type is a keyword"):
        la.optimize_prior_precision("glm")


def test_gridsearch_for_regression_scores_the_gaussian_predictive_nll():
    X, y = sinusoid(60)
    model = regression_map(X, y, hidden=10, steps=300)
    Xv, yv = sinusoid(30)
    train = DataLoader(TensorDataset(X, y), batch_size=20)
    la = marglik.Laplace(model, "regression", "all", "full", sigma_noise=0.3).fit(train)
    history = la.optimize_prior_precision(method="gridsearch", val_loader=[(Xv, yv)],
                                          log_prior_prec_min=-2, log_prior_prec_max=3,
                                          grid_size=6, verbose=True)
    J = oracle.jacobians(model, X).reshape(len(X), -1)
    Jv = oracle.jacobians(model, Xv).reshape(len(Xv), -1)
    f = model(Xv).detach().reshape(-1)
    ref = []
    for delta in torch.logspace(-2, 3, 6):
        Sigma = torch.linalg.inv(J.T @ J / 0.09 + delta * torch.eye(J.shape[1]))
        var = torch.einsum("np,pq,nq->n", Jv, Sigma, Jv) + 0.09
        ref.append((0.5 * ((yv.reshape(-1) - f) ** 2 / var + var.log() + math.log(2 * math.pi)))
                   .mean())
    torch.testing.assert_close(torch.tensor(history["loss"]), torch.stack(ref), rtol=1e-9,
                               atol=1e-12)
    # a user loss as in laplace-torch: called on the whole validation set
    calls = []

    def mse(mean, var, target):
        calls.append(mean.shape)
        return ((mean - target) ** 2).mean()

    la.optimize_prior_precision(method="gridsearch", val_loader=[(Xv[:15], yv[:15]),
                                                                 (Xv[15:], yv[15:])],
                                loss=mse, grid_size=3)
    assert calls == [torch.Size([30, 1])] * 3


# ---- predictive_samples / functional_samples -----------------------------------------------------
def test_predictive_samples_follow_the_glm_predictive():
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(30, 2), torch.randint(0, 3, (30,))
    la = marglik.Laplace(model, "classification", "all", "full", prior_precision=0.5).fit(
        DataLoader(TensorDataset(x, y), batch_size=10))
    xt = torch.randn(4, 2)
    g = torch.Generator().manual_seed(0)
    fs = la.functional_samples(xt, n_samples=40000, generator=g)
    assert fs.shape == (40000, 4, 3)
    J = oracle.jacobians(model, xt)
    cov = torch.einsum("ncp,pq,ndq->ncd", J, la.posterior_covariance, J)
    centred = fs - model(xt).detach()
    torch.testing.assert_close(centred.mean(0), torch.zeros(4, 3), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.einsum("snc,snd->ncd", centred, centred) / 40000, cov,
                               rtol=0.05, atol=0.01 * cov.diagonal(dim1=1, dim2=2).max().item())
    ps = la.predictive_samples(xt, n_samples=7)
    assert ps.shape == (7, 4, 3)
    torch.testing.assert_close(ps.sum(-1), torch.ones(7, 4))
    diag = la.functional_samples(xt, n_samples=40000, diagonal_output=True, generator=g)
    torch.testing.assert_close(diag.var(0), cov.diagonal(dim1=1, dim2=2), rtol=0.05, atol=1e-6)
    assert la.predictive_samples(xt, pred_type="nn", n_samples=5).shape == (5, 4, 3)
    la_reg = marglik.Laplace(nn.Linear(2, 1), "regression", "all", "diag").fit(
        [(x, torch.randn(30, 1))])
    samples = la_reg.predictive_samples(xt, n_samples=6)  # f samples, no noise (laplace-torch)
    assert samples.shape == (6, 4, 1)
    torch.testing.assert_close(la_reg.posterior_scale.square(), la_reg.posterior_variance)


def test_link_approx_for_regression_is_ignored_with_a_warning():
    X, y = sinusoid(20)
    la = marglik.Laplace(nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)),
                         "regression").fit([(X, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f_mu, f_var = la(X)  # no link_approx: no warning
        la(X, pred_type="nn", link_approx="mc", n_samples=3)  # laplace-torch's nn call
    with pytest.warns(UserWarning, match="ignored for a regression"):
        f_mu2, f_var2 = la(X, link_approx="probit")
    torch.testing.assert_close(f_var, f_var2)


# ---- marglik_training as in laplace-torch's regression example ----------------------------------
def test_marglik_training_with_laplace_torch_arguments_and_returns():
    X, y = sinusoid(40)
    train_loader = DataLoader(TensorDataset(X, y), batch_size=20)

    def get_model():
        torch.manual_seed(711)
        return nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1))

    la, model, margliks, losses = marglik_training(
        model=get_model(), train_loader=train_loader, likelihood="regression",
        hessian_structure="full", n_epochs=3, n_hypersteps=4,
        optimizer_kwargs={"lr": 1e-2}, prior_structure="scalar", returns="laplace-torch",
    )
    assert len(margliks) == 3 * 4 and len(losses) == 3
    assert all(isinstance(v, float) for v in margliks + losses)
    f_mu, f_var = la(X)
    assert f_var.shape == (40, 1, 1) and la.sigma_noise.numel() == 1
    # the same run returning the history holds the same lists
    _, _, history = marglik_training(
        model=get_model(), train_loader=train_loader, likelihood="regression",
        hessian_structure="full", n_epochs=3, n_hypersteps=4,
        optimizer_kwargs={"lr": 1e-2}, prior_structure="scalar",
    )
    assert history["neg_log_marglik"] == margliks and history["loss"] == losses

    # margliks[0] is −log Z at the initial δ = σ = 1 after the first epoch, against dense maths
    model1 = get_model()
    marglik_training(model=model1, train_loader=train_loader, likelihood="regression",
                     hessian_structure="full", n_epochs=1, n_hypersteps=1,
                     optimizer_kwargs={"lr": 1e-2}, prior_structure="scalar")
    # model1 now holds the weights after epoch 1 (the only, hence best, state)
    J = oracle.jacobians(model1, X).reshape(len(X), -1)
    theta = theta_of(model1)
    resid = (model1(X) - y).detach()
    evidence = (-0.5 * resid.square().sum() - len(X) * 0.5 * math.log(2 * math.pi)
                - 0.5 * theta @ theta
                - 0.5 * torch.linalg.slogdet(J.T @ J + torch.eye(len(theta)))[1])
    assert margliks[0] == pytest.approx(-evidence.item(), rel=1e-9)


def test_marglik_training_optimizer_scheduler_temperature_and_checks():
    x, y = torch.randn(24, 2), torch.randint(0, 3, (24,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3))
    lrs = []

    def record(epoch, model, la, history):
        lrs.append(optimizer_lr[0])

    optimizer_lr = [None]

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            optimizer_lr[0] = self.param_groups[0]["lr"]
            return super().step(closure)

    with pytest.warns(UserWarning, match="weight_decay"):
        la, _, history = marglik_training(
            model, loader, "classification", "full", "diag", n_epochs=2, n_hypersteps=2,
            optimizer_cls=RecordingSGD, optimizer_kwargs={"lr": 0.1, "weight_decay": 1e-3},
            scheduler_cls=torch.optim.lr_scheduler.StepLR,
            scheduler_kwargs={"step_size": 1, "gamma": 0.5}, temperature=2.0, callback=record,
        )
    assert lrs == [pytest.approx(0.1 * 0.5**2), pytest.approx(0.1 * 0.5**5)]  # per batch
    assert la.temperature == 2.0 and la.prior_precision.shape == (la.n_params,)
    with pytest.raises(ValueError, match="learning rate once"):
        marglik_training(model, loader, lr=1e-3, optimizer_kwargs={"lr": 1e-2}, n_epochs=1)
    with pytest.raises(ValueError, match="returns"):
        marglik_training(model, loader, n_epochs=1, returns="tuple")
    with pytest.raises(ValueError, match="contradicts"):
        marglik_training(model, loader, "regression", fix_sigma_noise=True, tune_sigma=True)
    X, yr = sinusoid(16)
    la, _, hist = marglik_training(
        nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)), [(X, yr)], "regression",
        n_epochs=2, n_hypersteps=2, sigma_noise_init=0.5, fix_sigma_noise=True,
    )
    assert hist["sigma_noise"] == [None, None] and la.sigma_noise.item() == 0.5


def test_marglik_training_map_step_matches_the_tempered_posterior_mode():
    """With temperature T the MAP step minimises NLL/T + ½θᵀδθ: the mode Laplace assumes."""
    phi = torch.randn(30, 3)
    y = phi @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.2 * torch.randn(30, 1)
    model = nn.Linear(3, 1, bias=False)
    T, delta, sigma = 3.0, 4.0, 0.5
    marglik_training(model, [(phi, y)], "regression", "full", "scalar", n_epochs=500,
                     lr=1e-1, n_hypersteps=0, prior_prec_init=delta, sigma_noise_init=sigma,
                     fix_sigma_noise=True, temperature=T, n_epochs_burnin=10**6)
    mode = torch.linalg.solve(phi.T @ phi / sigma**2 / T + delta * torch.eye(3),
                              phi.T @ y / sigma**2 / T)
    torch.testing.assert_close(model.weight.detach().T, mode, rtol=1e-4, atol=1e-5)


# ---- the LoRA example: "all" are the weights that require grad ----------------------------------
class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(0.3 * torch.randn(r, base.in_features))
        self.lora_B = nn.Parameter(0.3 * torch.randn(base.out_features, r))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def test_lora_style_all_means_the_weights_that_require_grad():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    for p in net.parameters():
        p.requires_grad_(False)  # peft freezes the base weights
    net[2] = LoRALinear(net[2])
    net[2].base.requires_grad_(False)
    x, y = torch.randn(25, 4), torch.randint(0, 3, (25,))
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    lora_la = marglik.Laplace(net, likelihood="classification", subset_of_weights="all",
                              hessian_structure="full")
    lora_la.fit(loader)
    names = ["2.lora_A", "2.lora_B"]
    assert lora_la.subset.names == names and lora_la.n_params == 2 * 6 + 3 * 2
    H = oracle.ggn(net, x, y, oracle.categorical_nll, names=names)
    torch.testing.assert_close(lora_la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
    expected = oracle.laplace_evidence(-oracle.categorical_nll(net(x), y).detach(),
                                       theta_of(net, names), H, torch.tensor(1.0))
    torch.testing.assert_close(lora_la.log_marginal_likelihood(), expected, rtol=1e-10,
                               atol=1e-10)
    assert lora_la(x[:4]).shape == (4, 3)
    lora_la.optimize_prior_precision()
    assert all(not p.requires_grad for p in net[0].parameters())  # flags left as they were
    assert net[2].lora_A.requires_grad
    # a model without frozen weights: "all" is every weight, as before
    free = nn.Sequential(nn.Linear(4, 3))
    assert marglik.Laplace(free, "classification", "all").fit(loader).n_params == 15

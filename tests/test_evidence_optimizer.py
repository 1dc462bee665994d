"""optimize_prior_precision(optimizer="lbfgs") against the brute-force evidence optimum.

Reference: the Laplace evidence with an explicit GGN (dense ``torch.func`` Jacobians, slogdet)
as a function of log δ (one per parameter tensor, or per parameter) and log σ; the L-BFGS result
must be its stationary point, and no lower than what Adam reaches.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.evidence.optimize import lbfgs_tolerance
from tests import oracle

pytestmark = pytest.mark.filterwarnings("ignore:.*(silent|fell back|KFAC).*:UserWarning")


def _problem(task: str):
    torch.manual_seed(0)
    d_out = 3 if task == "classification" else 1
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, d_out)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    if task == "classification":
        y = torch.randint(0, 3, (40,), generator=g)
    else:
        y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(40, 1, generator=g,
                                                                   dtype=X.dtype)
    return model, X, y, DataLoader(TensorDataset(X, y), batch_size=16)


def _brute_force_evidence(model, X, y, task, groups):
    """(log δ (G,), log σ or None) -> log Z, explicit matrices; groups: (P,) group index."""
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    J = oracle.jacobians(model, X)
    with torch.no_grad():
        f = model(X)

    def evidence(log_delta, log_sigma=None):
        if task == "classification":
            nll, log_lik = oracle.categorical_nll, -oracle.categorical_nll(f, y)
        else:
            sigma = log_sigma.exp()
            nll = oracle.gaussian_nll(sigma)  # without the normaliser, added here
            log_lik = -nll(f, y) - y.numel() * (log_sigma + 0.5 * math.log(2 * math.pi))
        Lam = oracle.output_hessians(nll, f, y)
        H = torch.einsum("ndp,nde,neq->pq", J, Lam, J)
        return oracle.laplace_evidence(log_lik, theta, H, log_delta.exp()[groups])

    return evidence


@pytest.mark.parametrize("task,prior", [("classification", "layerwise"),
                                        ("classification", "diagonal"),
                                        ("regression", "layerwise")])
def test_lbfgs_reaches_the_brute_force_optimum(task, prior):
    model, X, y, loader = _problem(task)
    tune_sigma = task == "regression"
    la = marglik.Laplace(model, task, hessian_structure="full").fit(loader)
    hist = la.optimize_prior_precision(method="marglik", prior_structure=prior,
                                       tune_sigma=tune_sigma, optimizer="lbfgs",
                                       init_prior_prec=1.0)
    assert len(hist["log_marglik"]) < 60  # converged, not stopped by the evaluation limit
    sizes = [p.numel() for p in model.parameters()]
    groups = (torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
              if prior == "layerwise" else torch.arange(sum(sizes)))
    evidence = _brute_force_evidence(model, X, y, task, groups)
    ld = la.prior_precision.log().clone().requires_grad_(True)
    args = [ld]
    if tune_sigma:
        args.append(la.sigma_noise.log().reshape(()).clone().requires_grad_(True))
    value = evidence(*args)
    grads = torch.autograd.grad(value, args)
    assert max(float(g.abs().max()) for g in grads) < 1e-5
    # the stored δ (σ) are the optimum's, and the evidence there is the brute-force one
    torch.testing.assert_close(la.log_marginal_likelihood(), value.detach(), rtol=1e-10,
                               atol=1e-10)
    assert hist["log_marglik"][-1] == pytest.approx(value.item(), rel=1e-10)  # the last entry
    assert torch.equal(torch.tensor(hist["prior_precision"][-1]), la.prior_precision.cpu())
    # Adam with the same evidence evaluations' budget ends lower
    adam = marglik.Laplace(model, task, hessian_structure="full").fit(loader)
    adam.optimize_prior_precision(method="marglik", prior_structure=prior, tune_sigma=tune_sigma,
                                  n_steps=len(hist["log_marglik"]), init_prior_prec=1.0)
    assert adam.log_marginal_likelihood() < value - 1e-3


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_lbfgs_is_stationary_for_other_structures(structure):
    """Gradient of the posterior's own evidence at the L-BFGS result: at rounding level."""
    model, X, y, loader = _problem("classification")
    la = marglik.Laplace(model, "classification", hessian_structure=structure).fit(loader)
    hist = la.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                       optimizer="lbfgs")
    ld = la.prior_precision.log().clone().requires_grad_(True)
    value = la.log_marginal_likelihood(ld.exp())
    (g,) = torch.autograd.grad(value, ld)
    # the tolerance is set by the evidence at the start
    assert float(g.abs().max()) <= lbfgs_tolerance(hist["log_marglik"][0], torch.float64)


def test_lbfgs_bad_input_and_evaluation_limit():
    model, X, y, loader = _problem("classification")
    la = marglik.Laplace(model, "classification", hessian_structure="full").fit(loader)
    with pytest.raises(ValueError, match="optimizer"):
        la.optimize_prior_precision(method="marglik", optimizer="sgd")
    with pytest.raises(ValueError, match="takes no optimizer"):
        la.optimize_prior_precision(method="gridsearch", optimizer="lbfgs", val_loader=loader)
    with pytest.raises(ValueError, match="L-BFGS"):
        la.optimize_prior_precision(method="tangent", optimizer="adam", train_loader=loader)
    hist = la.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                       optimizer="lbfgs", n_steps=3, init_prior_prec=1.0)
    assert len(hist["log_marglik"]) <= 4  # the start and at most n_steps evaluations after
    assert all(math.isfinite(v) for v in hist["log_marglik"])

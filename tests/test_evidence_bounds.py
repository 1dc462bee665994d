"""Data-partitioned evidence lower bound and its stochastic estimate (evidence/bounds.py).

Deterministic inequalities on fixed data over a grid of δ (Fischer's inequality): the bound is
below the exact evidence, equal to it for one partition, and grows as partitions are merged; the
stochastic estimate averaged over every k-subset is the bound; the bound equals the function-space
formula with explicit matrices per partition; its gradient matches finite differences.
"""

import itertools
import math

import pytest
import torch
from torch import nn

import marglik
from marglik.evidence import PartitionedEvidence
from tests import oracle

SIGMA = 0.5


def _problem(task, n=16):
    torch.manual_seed(0)
    c = 3 if task == "classification" else 2
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, c)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (torch.randint(0, c, (n,), generator=g) if task == "classification"
         else torch.randn(n, c, generator=g, dtype=torch.float64))
    return model, X, y


def _partitions(X, y, m):
    return [[(X[i:i + m], y[i:i + m])] for i in range(0, len(X), m)]


def _fit(model, X, y, task, structure="full"):
    sigma = {"sigma_noise": SIGMA} if task == "regression" else {}
    return marglik.Laplace(model, task, hessian_structure=structure, **sigma).fit([(X, y)])


DELTAS = [0.05, 0.5, 5.0, 50.0]


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "kernel"])
def test_bound_is_below_the_evidence_tight_for_one_partition_and_grows_with_m(task, structure):
    model, X, y = _problem(task)
    la = _fit(model, X, y, task, structure)
    bounds = {m: PartitionedEvidence(la, _partitions(X, y, m)) for m in (2, 4, 8, 16)}
    # partitions fitted exactly by "kernel" under any base structure: the same bound
    other = PartitionedEvidence(_fit(model, X, y, task, "diag"), _partitions(X, y, 4), "kernel")
    torch.testing.assert_close(other(torch.tensor(0.5, dtype=torch.float64)),
                               bounds[4](torch.tensor(0.5, dtype=torch.float64)), rtol=1e-10,
                               atol=1e-10)
    layerwise = torch.tensor([0.3, 2.0, 0.7, 5.0], dtype=torch.float64)
    for delta in [torch.tensor(d, dtype=torch.float64) for d in DELTAS] + [layerwise]:
        exact = la.log_marginal_likelihood(delta)
        values = [bounds[m](delta) for m in (2, 4, 8, 16)]
        torch.testing.assert_close(values[-1], exact, rtol=1e-12, atol=1e-10)  # one partition
        for smaller, larger in zip(values, values[1:]):  # nested partitions: merging tightens
            assert smaller <= larger + 1e-10
        assert values[0] < exact - 1e-6  # strictly below with several partitions


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_bound_equals_the_function_space_formula_per_partition(task):
    model, X, y = _problem(task)
    la = _fit(model, X, y, task)
    bound = PartitionedEvidence(la, _partitions(X, y, 4))
    delta = torch.tensor(0.8, dtype=torch.float64)
    nll = oracle.categorical_nll if task == "classification" else oracle.gaussian_nll(SIGMA)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        f = model(X)
    log_lik = -nll(f, y)
    if task == "regression":
        log_lik = log_lik - y.numel() * math.log(SIGMA * math.sqrt(2 * math.pi))
    logdets = 0.0
    for i in range(0, len(X), 4):
        Xb, yb = X[i:i + 4], y[i:i + 4]
        J = oracle.jacobians(model, Xb).reshape(-1, len(theta))
        with torch.no_grad():
            Lam = torch.block_diag(*oracle.output_hessians(nll, model(Xb), yb))
        evals, evecs = torch.linalg.eigh(Lam)
        root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
        A = torch.eye(len(J), dtype=J.dtype) + root @ J @ J.T @ root / delta
        logdets = logdets + torch.linalg.slogdet(A)[1]
    ref = log_lik - 0.5 * delta * theta.square().sum() - 0.5 * logdets
    torch.testing.assert_close(bound(delta), ref, rtol=1e-10, atol=1e-10)


def test_stochastic_estimate_averages_to_the_bound_and_gradients_match_differences():
    model, X, y = _problem("regression")
    la = _fit(model, X, y, "regression")
    bound = PartitionedEvidence(la, _partitions(X, y, 4))
    delta, sigma = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    for k in (1, 2, 3):
        subsets = list(itertools.combinations(range(4), k))
        mean = sum(bound.estimate(s, delta, sigma) for s in subsets) / len(subsets)
        torch.testing.assert_close(mean, bound(delta, sigma), rtol=1e-12, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    drawn = bound(delta, sigma, sample=2, generator=g)
    assert any(torch.allclose(drawn, bound.estimate(s, delta, sigma))
               for s in itertools.permutations(range(4), 2))
    # gradients in log δ and log σ against central differences
    logs = torch.stack([delta.log(), sigma.log()]).requires_grad_(True)
    value = bound(logs[0].exp(), logs[1].exp())
    (grad,) = torch.autograd.grad(value, logs)
    eps = 1e-6
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = eps
        up, down = (bound(*(logs.detach() + s * e).exp()) for s in (1, -1))
        assert grad[i].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-6)
    # it stores nothing on the posterior
    assert la.prior_precision.item() == 1.0 and la.sigma_noise.item() == SIGMA


def test_bad_input():
    model, X, y = _problem("classification")
    la = _fit(model, X, y, "classification")
    with pytest.raises(ValueError, match="empty"):
        PartitionedEvidence(la, [])
    with pytest.raises(ValueError, match="partition the same data"):
        PartitionedEvidence(la, _partitions(X[:8], y[:8], 4))
    bound = PartitionedEvidence(la, _partitions(X, y, 4))
    with pytest.raises(ValueError, match="sample must be"):
        bound(sample=5)
    with pytest.raises(ValueError, match="distinct partitions"):
        bound.estimate([1, 1])
    with pytest.raises(RuntimeError):
        PartitionedEvidence(marglik.Laplace(model, "classification"), _partitions(X, y, 4))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_exact_diagonal_evidence_is_a_parameter_partitioned_lower_bound(task):
    """Hadamard's inequality: log det(P) ≤ Σ log P_ii, so the diagonal structure's evidence is
    below the full one at every δ (a parameter-partitioned bound with blocks of one)."""
    model, X, y = _problem(task)
    full, diag = _fit(model, X, y, task, "full"), _fit(model, X, y, task, "diag")
    for d in DELTAS:
        delta = torch.tensor(d, dtype=torch.float64)
        assert diag.log_marginal_likelihood(delta) <= full.log_marginal_likelihood(delta) + 1e-10

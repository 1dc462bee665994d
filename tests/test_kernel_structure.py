"""hessian_structure="kernel": the exact GGN from its N·C rows, i.e. the function-space form.

References (float64, explicit matrices): per-sample Jacobians J (N, C, P) from ``tests/oracle.py``,
Λ from autograd, the GGN JᵀΛJ, the function-space evidence
log p(D|θ*) − ½ θ*ᵀP0θ* − ½ log det(I + Λ^½ J P0⁻¹ Jᵀ Λ^½) and the GLM covariance
J* (JᵀΛJ + P0)⁻¹ J*ᵀ (Immer, Korzepa & Bauer, AISTATS 2021; Immer et al., ICML 2023).
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.predictive import glm_moments
from marglik.structures import LowRank
from tests import oracle

pytestmark = pytest.mark.filterwarnings("ignore:.*(silent|fell back|KFAC).*:UserWarning")
SIGMA = 0.4


def _problem(task: str, n: int = 9, hidden: int = 12):
    torch.manual_seed(0)
    c = 3 if task == "classification" else 2
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, c)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if task == "classification":
        y = torch.randint(0, c, (n,), generator=g)
    else:
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
    return model, X, y, DataLoader(TensorDataset(X, y), batch_size=4)


def _nll(task):
    return oracle.categorical_nll if task == "classification" else oracle.gaussian_nll(SIGMA)


def _fit(model, loader, task, structure="kernel", **kw):
    sigma = {"sigma_noise": SIGMA} if task == "regression" else {}
    return marglik.Laplace(model, task, hessian_structure=structure, **sigma, **kw).fit(loader)


def _function_space_evidence(model, X, y, task, delta):
    """log p(D|θ*) − ½θ*ᵀP0θ* − ½ log det(I + Λ^½ K Λ^½), K = J P0⁻¹ Jᵀ over the N·C outputs."""
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    J = oracle.jacobians(model, X)  # (N, C, P)
    with torch.no_grad():
        f = model(X)
    log_lik = -_nll(task)(f, y)
    if task == "regression":
        log_lik = log_lik - y.numel() * math.log(SIGMA * math.sqrt(2 * math.pi))
    Lam = torch.block_diag(*oracle.output_hessians(_nll(task), f, y))  # (NC, NC)
    evals, evecs = torch.linalg.eigh(Lam)
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    Jf = J.reshape(-1, J.shape[-1])
    K = Jf @ torch.diag(1 / delta.expand(theta.shape)) @ Jf.T
    A = torch.eye(len(K), dtype=K.dtype) + root @ K @ root
    return log_lik - 0.5 * (delta * theta.square()).sum() - 0.5 * torch.linalg.slogdet(A)[1]


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diagonal"])
def test_evidence_is_the_function_space_evidence_and_differentiable(task, prior):
    model, X, y, loader = _problem(task)
    la = _fit(model, loader, task)
    assert isinstance(la.H.blocks[0], LowRank)
    sizes = [p.numel() for p in model.parameters()]
    g = torch.Generator().manual_seed(2)
    n = {"scalar": 1, "layerwise": len(sizes), "diagonal": sum(sizes)}[prior]
    log_delta = (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    groups = {"scalar": torch.zeros(sum(sizes), dtype=torch.long),
              "layerwise": torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
              "diagonal": torch.arange(sum(sizes))}[prior]
    delta = log_delta.exp()
    ours = la.log_marginal_likelihood(delta.reshape(()) if prior == "scalar" else delta)
    ref = _function_space_evidence(model, X, y, task, delta[groups])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    (g_ours,) = torch.autograd.grad(ours, log_delta)
    (g_ref,) = torch.autograd.grad(_function_space_evidence(model, X, y, task, log_delta.exp()[
        groups]), log_delta)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_glm_predictive_equals_the_weight_space_one(task):
    model, X, y, loader = _problem(task)
    la = _fit(model, loader, task, prior_precision=0.8)
    Xt = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H = oracle.ggn(model, X, y, _nll(task))
    Sigma = torch.linalg.inv(H + 0.8 * torch.eye(len(H), dtype=H.dtype))
    Jt = oracle.jacobians(model, Xt)
    f, var = glm_moments(la, Xt)
    torch.testing.assert_close(var, Jt @ Sigma @ Jt.mT, rtol=1e-9, atol=1e-12)
    _, joint = glm_moments(la, Xt, joint=True)
    Jj = Jt.reshape(-1, Jt.shape[-1])
    torch.testing.assert_close(joint, Jj @ Sigma @ Jj.T, rtol=1e-9, atol=1e-12)
    full = _fit(model, loader, task, "full", prior_precision=0.8)
    if task == "classification":
        torch.testing.assert_close(la(Xt), full(Xt), rtol=1e-10, atol=1e-12)


def test_rank_is_that_of_the_outputs_and_more_rows_than_parameters_still_exact():
    """Softmax: Λ has rank C − 1, so rank ≤ N(C − 1); with N(C − 1) > P the block is the full
    GGN's eigendecomposition."""
    model, X, y, loader = _problem("classification", n=9, hidden=12)  # P = 87 > 18
    la = _fit(model, loader, "classification")
    assert la.H.blocks[0].rank == 9 * 2
    model, X, y, loader = _problem("classification", n=40, hidden=3)  # P = 24 < 80
    la = _fit(model, loader, "classification")
    H = oracle.ggn(model, X, y, oracle.categorical_nll)
    assert la.H.blocks[0].rank <= 24
    torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)


def test_last_layer_optimised_prior_and_round_trip(tmp_path):
    model, X, y, loader = _problem("classification")
    la = _fit(model, loader, "classification", subset_of_weights="last_layer")
    full = _fit(model, loader, "classification", "full", subset_of_weights="last_layer")
    for other in (la, full):
        other.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                       optimizer="lbfgs")
    torch.testing.assert_close(la.prior_precision, full.prior_precision, rtol=1e-6, atol=0)
    torch.save(la.state_dict(), tmp_path / "la.pt")
    new = marglik.Laplace(model, "classification", subset_of_weights="last_layer",
                          hessian_structure="kernel")
    new.load_state_dict(torch.load(tmp_path / "la.pt", weights_only=True))
    torch.testing.assert_close(new.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_too_many_rows_is_a_clear_error(monkeypatch):
    from marglik.curvature.low_rank import KernelAccumulator

    model, X, y, loader = _problem("classification")
    # 18 rows (C − 1 = 2 per image) of P = 87 numbers
    monkeypatch.setattr(KernelAccumulator, "MAX_NUMBERS", 10 * 87)
    with pytest.raises(ValueError, match="rows so far exceed"):
        _fit(model, loader, "classification")


def test_heteroscedastic_equals_full():
    from marglik.likelihoods import NaturalGaussian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        model[2].bias[1] = -1.0  # η2 < 0
    X = torch.randn(20, 1, dtype=torch.float64)
    y = torch.randn(20, 1, dtype=torch.float64)
    fits = [marglik.Laplace(model, NaturalGaussian(), hessian_structure=s).fit([(X, y)])
            for s in ("kernel", "full")]
    delta = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(fits[0].log_marginal_likelihood(delta),
                               fits[1].log_marginal_likelihood(delta), rtol=1e-10, atol=1e-10)
    for a, b in zip(fits[0](X[:5]), fits[1](X[:5])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

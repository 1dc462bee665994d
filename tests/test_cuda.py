"""The same numbers on a CUDA device as on the CPU (skipped where no GPU is present).

Every step follows the model's device: the fit (inputs arrive on the CPU from the loader),
the evidence and its gradient, the predictives (generic and layer-wise paths), sampling,
saving to and loading from the CPU, online evidence training and the heteroscedastic head.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.applications.heteroscedastic import heteroscedastic_predictive
from marglik.likelihoods import NaturalGaussian

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def classification_problem():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 6, 6)
    y = torch.randint(0, 3, (40,))
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 8), nn.Tanh(),
        nn.Linear(8, 3),
    )
    return model, DataLoader(TensorDataset(x, y), batch_size=16), torch.randn(7, 1, 6, 6)


def regression_problem():
    torch.manual_seed(1)
    x = torch.randn(50, 3)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(50, 1)
    model = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 1))
    return model, DataLoader(TensorDataset(x, y), batch_size=20), torch.randn(9, 3)


def both(model):
    return model, copy.deepcopy(model).to(CUDA)


def close(a, b, rtol=1e-8):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert b.device.type in ("cuda", "cpu")
    torch.testing.assert_close(b.cpu(), a.cpu(), rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_classification_posterior_on_cuda(structure, subset):
    model, loader, xt = classification_problem()
    cpu, gpu = both(model)
    kw = dict(subset_of_weights=subset, hessian_structure=structure, rank=20)
    la_c = marglik.Laplace(cpu, "classification", prior_precision=0.5, **kw).fit(loader)
    la_g = marglik.Laplace(gpu, "classification", prior_precision=0.5, **kw).fit(loader)
    assert la_g.mean.device.type == "cuda"
    close(la_c.log_marginal_likelihood(), la_g.log_marginal_likelihood(), rtol=1e-6)
    close(la_c(xt), la_g(xt.to(CUDA)), rtol=1e-6)
    close(la_c(xt, link_approx="bridge"), la_g(xt.to(CUDA), link_approx="bridge"), rtol=1e-6)
    gen = torch.Generator(CUDA).manual_seed(0)
    probs = la_g(xt.to(CUDA), link_approx="mc", n_samples=50, generator=gen)
    assert probs.device.type == "cuda" and torch.allclose(probs.sum(-1), probs.new_ones(7))
    theta = la_g.sample(5, generator=torch.Generator(CUDA).manual_seed(0))
    assert theta.device.type == "cuda" and torch.isfinite(la_g.log_prob(theta)).all()
    la_c.optimize_prior_precision(prior_structure="layerwise", n_steps=20)
    la_g.optimize_prior_precision(prior_structure="layerwise", n_steps=20)
    close(la_c.prior_precision, la_g.prior_precision, rtol=1e-5)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_regression_evidence_gradient_and_state_dict_on_cuda(structure):
    model, loader, xt = regression_problem()
    cpu, gpu = both(model)
    la_c = marglik.Laplace(cpu, "regression", hessian_structure=structure).fit(loader)
    la_g = marglik.Laplace(gpu, "regression", hessian_structure=structure).fit(loader)
    grads = []
    for la, device in ((la_c, "cpu"), (la_g, CUDA)):
        delta = torch.tensor(0.7, device=device, requires_grad=True)
        sigma = torch.tensor(0.3, device=device, requires_grad=True)
        la.log_marginal_likelihood(delta, sigma).backward()
        grads.append(torch.stack([delta.grad, sigma.grad]))
    close(*grads, rtol=1e-6)
    close(la_c(xt, pred_var=True)[1], la_g(xt.to(CUDA), pred_var=True)[1], rtol=1e-6)
    state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in la_g.state_dict().items()}
    restored = marglik.Laplace(gpu, "regression", hessian_structure=structure)
    restored.load_state_dict(state)
    close(la_g.log_marginal_likelihood(), restored.log_marginal_likelihood())


def test_marglik_training_and_heteroscedastic_on_cuda():
    model, loader, xt = regression_problem()
    cpu, gpu = both(model)
    runs = [
        marglik.marglik_training(m, loader, "regression", n_epochs=3, n_hypersteps=5)
        for m in (cpu, gpu)
    ]
    close(runs[0][2]["log_marglik"][-1], runs[1][2]["log_marglik"][-1], rtol=1e-5)
    assert runs[1][0].mean.device.type == "cuda"

    torch.manual_seed(2)
    head = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 2)).to(CUDA)
    la, _, _ = marglik.marglik_training(head, loader, NaturalGaussian(), n_epochs=2,
                                        n_hypersteps=5)
    pred = heteroscedastic_predictive(la, xt.to(CUDA))
    assert pred.mean.device.type == "cuda"
    assert (pred.epistemic_var > 0).all() and (pred.aleatoric_var > 0).all()

"""The η-gradient estimators of LILA (NeurIPS 2022, §4) and η's own optimizer in marglik_training.

Float64, tiny augmented models: ``"minibatch"`` and ``"jvp"`` over all the data equal central
finite differences of plain refits (the exact gradient); over an equal partition the mean of the
single-batch estimates is that gradient (unbiased); for the same batches the two agree; the
log-determinant's gradient in the Kronecker factors is the eigenbasis formula, also for repeated
eigenvalues. Online: η has its own learning rate and schedule, and a resumed run keeps them.
"""

import warnings

import pytest
import torch
from torch import nn

import marglik
from marglik.layers import AffineAugmentation, AugmentedModel
from marglik.structures import Kronecker
from marglik.training.hypergradients import estimate_hyper_gradient, evidence_at, stand_in

SUBSET = {"subset_of_weights": "subnetwork", "subnetwork": ["net"]}
SIGMA = 0.7


def loader(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def cnn(outputs=3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, outputs))


def augmented(S=3) -> AugmentedModel:
    """Fixed copies (eval mode), as the curvature fits see them."""
    aug = AffineAugmentation(("rotate", "translate_x"), [0.5, 0.2])
    return AugmentedModel(cnn(), aug, S).eval()


def data(task, n):
    x = torch.randn(n, 1, 5, 5)
    y = torch.randint(0, 3, (n,)) if task == "classification" else torch.randn(n, 3)
    return x, y


def maker(model, task, structure="kron", approx="reduce"):
    kw = {"sigma_noise": SIGMA} if task == "regression" else {}

    def make():
        return marglik.Laplace(model, task, hessian_structure=structure, kfac_approx=approx,
                               prior_precision=0.5, **kw, **SUBSET)
    return make


def sigma_of(task):
    return torch.tensor(SIGMA) if task == "regression" else None


def finite_differences(model, make, batches, task, h=1e-5):
    eta, fd = model.augmentation.eta, []
    with torch.no_grad():
        for j in range(len(eta)):
            start = eta.clone()
            eta[j] += h
            plus = make().fit(batches).log_marginal_likelihood()
            eta[j] -= 2 * h
            minus = make().fit(batches).log_marginal_likelihood()
            eta.copy_(start)
            fd.append((plus - minus) / (2 * h))
    return torch.stack(fd)


def estimate(method, model, make, full, batches, n, task):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer recorded, none dropped to a fallback
        return estimate_hyper_gradient(method, full, make, batches, n, torch.tensor(0.5),
                                       sigma_of(task), [model.augmentation.eta])[0]


@pytest.mark.parametrize("method", ["minibatch", "jvp"])
@pytest.mark.parametrize(("structure", "approx", "task"),
                         [("kron", "reduce", "classification"),
                          ("kron", "expand", "classification"), ("kron", "reduce", "regression"),
                          ("full", "expand", "classification"), ("diag", "expand", "regression")])
def test_over_all_the_data_the_estimators_equal_finite_differences_of_refits(
        method, structure, approx, task):
    torch.manual_seed(2)
    model = augmented()
    x, y = data(task, 7)
    batches = loader(x, y, 3)  # unequal batches: 3, 3, 1
    make = maker(model, task, structure, approx)
    grad = estimate(method, model, make, make().fit(batches), batches, 7, task)
    fd = finite_differences(model, make, batches, task)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    assert grad.abs().min() > 1e-3  # the check is not vacuous
    exact = make().fit(batches, create_graph=True).log_marginal_likelihood()  # the refit
    torch.testing.assert_close(grad, torch.autograd.grad(exact, model.augmentation.eta)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approx", ["reduce", "expand"])
def test_over_an_equal_partition_the_single_batch_estimates_average_to_the_gradient(approx):
    torch.manual_seed(3)
    model = augmented()
    x, y = data("classification", 8)
    batches = loader(x, y, 2)
    make = maker(model, "classification", "kron", approx)
    full = make().fit(batches)
    single = [estimate("minibatch", model, make, full, [b], 8, "classification")
              for b in batches]
    exact = make().fit(batches, create_graph=True).log_marginal_likelihood()
    expected = torch.autograd.grad(exact, model.augmentation.eta)[0]
    torch.testing.assert_close(torch.stack(single).mean(0), expected, rtol=1e-10, atol=1e-12)
    assert (torch.stack(single) - expected).abs().max() > 1e-3  # each one alone is not exact


def test_jvp_and_minibatch_agree_on_the_same_batches():
    torch.manual_seed(4)
    model = augmented()
    x, y = data("classification", 9)
    batches = loader(x, y, 3)
    make = maker(model, "classification")
    full = make().fit(batches)
    some = batches[:2]
    torch.testing.assert_close(estimate("jvp", model, make, full, some, 9, "classification"),
                               estimate("minibatch", model, make, full, some, 9,
                                        "classification"), rtol=1e-10, atol=1e-12)


def test_the_stand_in_has_the_full_data_value():
    torch.manual_seed(5)
    model = augmented()
    x, y = data("classification", 6)
    batches = loader(x, y, 3)
    make = maker(model, "classification")
    full, part = make().fit(batches), make().fit(batches[:1], create_graph=True)
    H, stats = stand_in(full, part, 6)
    delta = torch.tensor(0.5)
    torch.testing.assert_close(evidence_at(full, H, stats, delta, None),
                               full.log_marginal_likelihood(delta), rtol=1e-14, atol=0)


def test_logdet_gradient_in_the_factors_is_the_eigenbasis_formula_with_repeated_eigenvalues():
    """∂/∂G = s Q_G diag(Σ_j λ_j/(sμ_iλ_j+δ)) Q_Gᵀ and ∂/∂A likewise, also where A has a
    repeated (and a zero) eigenvalue, against autograd of the dense log-determinant."""
    torch.manual_seed(6)
    QG, _ = torch.linalg.qr(torch.randn(3, 3))
    QA, _ = torch.linalg.qr(torch.randn(4, 4))
    mu, lam = torch.tensor([0.5, 1.5, 3.0]), torch.tensor([0.0, 2.0, 2.0, 5.0])
    G = (QG * mu) @ QG.T
    A = (QA * lam) @ QA.T
    s, delta = torch.tensor(0.8), torch.tensor(0.3)
    G1, A1 = G.clone().requires_grad_(True), A.clone().requires_grad_(True)
    grads = torch.autograd.grad(Kronecker(G1, A1).logdet(s, delta), [G1, A1])
    G2, A2 = G.clone().requires_grad_(True), A.clone().requires_grad_(True)
    dense = torch.logdet(s * torch.kron(G2, A2) + delta * torch.eye(12))
    expected = torch.autograd.grad(dense, [G2, A2])
    Lam = s * torch.outer(mu, lam) + delta
    formula = [s * (QG * (lam / Lam).sum(1)) @ QG.T, s * (QA * (mu[:, None] / Lam).sum(0)) @ QA.T]
    for g, e, f in zip(grads, expected, formula):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)


# ---- online: η's own learning rate, schedule and checkpoint ---------------------------------

def online(model, batches, **kw):
    args = dict(hessian_structure="kron", n_epochs=3, lr=1e-2, n_hypersteps=2,
                laplace_kwargs={"kfac_approx": "reduce"},
                hyperparameters=model.hyperparameters(), hyper_gradient="jvp",
                lr_hyperparameters=0.05)
    args.update(kw)
    return marglik.marglik_training(model, batches, "classification", **args)


@pytest.mark.parametrize("method", ["minibatch", "jvp", "refit"])
def test_eta_steps_by_its_own_learning_rate_and_schedule(method):
    torch.manual_seed(7)
    model = augmented(S=2)
    x, y = data("classification", 8)
    start = model.augmentation.eta.detach().clone()
    _, _, history = online(model, loader(x, y, 4), hyper_gradient=method, n_hypersteps=1,
                           hyper_scheduler_cls=torch.optim.lr_scheduler.StepLR,
                           hyper_scheduler_kwargs={"step_size": 1, "gamma": 0.0})
    etas = torch.tensor([h[0] for h in history["hyperparameters"]])
    steps = torch.diff(torch.cat([start[None], etas]), dim=0).abs()
    # Adam's first step is lr·g/(|g| + ε): the learning rate itself; then the schedule stops η
    torch.testing.assert_close(steps[0], torch.full((2,), 0.05), rtol=1e-6, atol=0)
    assert (steps[1:] == 0).all()
    assert history["prior_precision"][0] != pytest.approx(1.0)  # δ steps with lr_hyp


def test_resume_keeps_eta_its_optimizer_and_schedule(tmp_path):
    x, y = data("classification", 8)
    kw = dict(hyper_scheduler_cls=torch.optim.lr_scheduler.StepLR,
              hyper_scheduler_kwargs={"step_size": 1, "gamma": 0.5})
    torch.manual_seed(8)
    straight = augmented(S=2)
    torch.manual_seed(9)
    _, _, h_straight = online(straight, loader(x, y, 4), **kw)
    torch.manual_seed(8)
    resumed = augmented(S=2)
    path = tmp_path / "run.pt"
    torch.manual_seed(9)
    online(resumed, loader(x, y, 4), n_epochs=2, checkpoint=path, **kw)
    torch.manual_seed(8)
    again = augmented(S=2)  # fresh η and weights: everything comes from the checkpoint
    _, _, h_resumed = online(again, loader(x, y, 4), checkpoint=path, **kw)
    assert h_resumed["hyperparameters"] == h_straight["hyperparameters"]
    assert h_resumed["log_marglik"] == h_straight["log_marglik"]
    for a, b in zip(again.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(a, b)


def test_the_best_state_keeps_eta_at_which_its_evidence_was_fitted():
    torch.manual_seed(10)
    model = augmented(S=2)
    x, y = data("classification", 8)
    _, model, history = online(model, loader(x, y, 4), n_epochs=2)
    best = max(range(2), key=lambda e: history["log_marglik"][e])
    before = history["hyperparameters"][best - 1][0] if best else [0.5, 0.2]
    assert model.augmentation.eta.tolist() == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize(("kw", "match"), [
    ({"hyper_gradient": "exact"}, "hyper_gradient must be one of"),
    ({"hyper_gradient": "jvp", "hyperparameters": None}, "apply only with hyperparameters"),
    ({"hyper_scheduler_cls": torch.optim.lr_scheduler.StepLR, "hyperparameters": None,
      "hyper_gradient": "refit", "lr_hyperparameters": None}, "apply only with hyperparameters"),
    ({"lr_hyperparameters": 0.0}, "lr_hyperparameters must be positive"),
    ({"lr_hyperparameters": float("nan")}, "lr_hyperparameters must be positive"),
    ({"evidence": "bound"}, "applies to evidence='laplace'"),
])
def test_bad_hyperparameter_options_raise(kw, match):
    model = augmented(S=2)
    x, y = data("classification", 4)
    with pytest.raises(ValueError, match=match):
        online(model, loader(x, y, 4), **kw)


def test_step_without_extra_leaves_the_hyperparameters_alone():
    from marglik.evidence.optimize import HyperparameterStep
    h = torch.tensor([0.3], requires_grad=True)
    hyper = HyperparameterStep(torch.zeros(()), extra=[h], lr=0.1, extra_lr=0.01)
    hyper.step(lambda d, s: -(d - 2) ** 2 - (h - 1).square().sum(), extra=False)
    assert h.item() == 0.3 and hyper.log_prior.item() == pytest.approx(0.1)
    hyper.step(lambda d, s: -(d - 2) ** 2 - (h - 1).square().sum())
    assert h.item() == pytest.approx(0.31)

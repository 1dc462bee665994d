"""Online hyperparameter learning on the stochastic evidence bound (``evidence="bound"``).

References: the data-partitioned bound of :class:`marglik.evidence.PartitionedEvidence` (itself
tested against the exact evidence), the same Adam steps taken by hand, central finite differences
of refits for a hyperparameter inside the model, and an uninterrupted run for resuming.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marglik import Laplace
from marglik.evidence import HyperparameterStep, PartitionedEvidence
from marglik.training import marglik_training
from marglik.training.hyperparameters import minibatch_bound


def classification_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long() + (x[:, 0] > 1).long()  # 3 classes


def regression_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(n, 1, generator=g)
    return x, torch.sin(x) + 0.3 * torch.randn(n, 1, generator=g)


def net(d_in=2, d_out=3, width=6):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out))


def batches_of(x, y, m):
    return [(x[i:i + m], y[i:i + m]) for i in range(0, len(x), m)]


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise"])
def test_the_batch_estimates_average_to_the_partitioned_bound_with_gradients(task, prior):
    torch.manual_seed(0)
    x, y = classification_data() if task == "classification" else regression_data()
    model = net() if task == "classification" else net(1, 1)
    batches = batches_of(x, y, 6)
    la = Laplace(model, task, hessian_structure="full").fit(batches)
    bound = PartitionedEvidence(la, [[b] for b in batches])
    shape = la.prior.shape(prior)
    for scale in (0.1, 1.0, 10.0):
        delta = torch.full(shape, scale).requires_grad_(True)
        sigma = torch.tensor(0.7, requires_grad=True) if task == "regression" else None
        mean = 0.0
        for b in batches:
            la_b = Laplace(model, task, hessian_structure="full").fit([b])
            mean = mean + minibatch_bound(la_b, len(x), delta, sigma) / len(batches)
        expected = bound(delta, sigma)
        torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-10)
        wrt = [delta] if sigma is None else [delta, sigma]
        for g, e in zip(torch.autograd.grad(mean, wrt), torch.autograd.grad(expected, wrt)):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
        assert mean.item() <= la.log_marginal_likelihood(delta, sigma).item() + 1e-9


def test_an_update_takes_adam_steps_on_the_next_batches_estimates_in_turn():
    """θ held fixed (SGD, lr 0): the 10 hyperparameter steps of one update equal Adam run by hand
    on the partitioned bound's one-partition estimates of batches 0, 1, 2, 3, 0, 1, ... (an
    independent route: its data fit is the whole data's, whose δ-gradient is zero)."""
    torch.manual_seed(0)
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    model = net()
    start = [p.detach().clone() for p in model.parameters()]
    _, _, history = marglik_training(
        model, loader, "classification", hessian_structure="full", n_epochs=1, lr_hyp=0.3,
        evidence="bound", optimizer_cls=torch.optim.SGD, optimizer_kwargs={"lr": 0.0},
    )
    assert all(torch.equal(a, p) for a, p in zip(start, model.parameters()))
    batches = batches_of(x, y, 6)
    la = Laplace(model, "classification", hessian_structure="full").fit(batches)
    bound = PartitionedEvidence(la, [[b] for b in batches])
    hyper = HyperparameterStep(torch.zeros(la.prior.shape("layerwise")), lr=0.3)
    for b in [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]:  # 4 batches, cycled
        hyper.step(lambda d, s, b=b: bound.estimate([b], d))
    torch.testing.assert_close(
        torch.tensor(history["prior_precision"][-1]), hyper.prior_precision, rtol=1e-10, atol=0
    )
    assert len(history["neg_log_marglik"]) == 10
    # the epoch's evidence is the mean of the estimates before each step
    assert history["log_marglik"][0] == pytest.approx(
        -sum(history["neg_log_marglik"]) / 10, rel=1e-12)


def test_burn_in_frequency_and_steps_per_update():
    torch.manual_seed(0)
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 3 batches
    _, _, history = marglik_training(
        net(), loader, "classification", n_epochs=7, n_epochs_burnin=2, marglik_frequency=2,
        n_hypersteps=2, evidence="bound",
    )
    evaluated = [e for e, v in enumerate(history["log_marglik"]) if not math.isnan(v)]
    assert evaluated == [2, 4, 6]
    assert len(history["neg_log_marglik"]) == 3 * 2
    deltas = [tuple(d) for d in history["prior_precision"]]
    assert deltas[0] == deltas[1] == (1.0,) * 4  # burn-in leaves δ alone
    assert deltas[2] != deltas[1] and deltas[3] == deltas[2]
    # no steps: δ stays, the epochs still get the estimate of the bound
    _, _, history = marglik_training(net(), loader, "classification", n_epochs=2,
                                     n_hypersteps=0, evidence="bound")
    assert history["prior_precision"] == [[1.0] * 4] * 2 and history["neg_log_marglik"] == []
    assert all(math.isfinite(v) for v in history["log_marglik"])


def test_learns_noise_and_prior_for_regression():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = 8 * torch.rand(120, 1, generator=g)
    y = torch.sin(x) + 0.3 * torch.randn(120, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    la, _, history = marglik_training(
        net(1, 1, 20), loader, "regression", n_epochs=200, lr=1e-2, n_epochs_burnin=20,
        lr_hyp=0.05, evidence="bound",
    )
    assert 0.2 < la.sigma_noise.item() < 0.45  # true noise 0.3
    evaluated = [v for v in history["log_marglik"] if not math.isnan(v)]
    assert len(evaluated) == 180 and evaluated[-1] > evaluated[0]


def test_the_bound_steps_on_its_own_loader():
    """bound_loader: one big batch (M = N) makes every estimate the exact evidence."""
    torch.manual_seed(0)
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    model = net()
    _, _, history = marglik_training(
        model, loader, "classification", hessian_structure="full", n_epochs=1, n_hypersteps=3,
        evidence="bound", bound_loader=[(x, y)], optimizer_cls=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.0},
    )
    la = Laplace(model, "classification", hessian_structure="full").fit([(x, y)])
    hyper = HyperparameterStep(torch.zeros(la.prior.shape("layerwise")), lr=0.1)
    expected = [hyper.step(lambda d, s: la.log_marginal_likelihood(d)) for _ in range(3)]
    torch.testing.assert_close(torch.tensor(history["neg_log_marglik"]),
                               -torch.tensor(expected), rtol=1e-10, atol=0)


def test_hyperparameter_gradient_of_the_batch_estimate_matches_finite_differences():
    """An input scale exp(h) inside the model: d estimate / dh from a graph fit equals central
    differences of plain refits at fixed θ (data fit and curvature both depend on h)."""
    torch.manual_seed(0)
    x, y = classification_data()
    batch = (x[:8], y[:8])
    h = torch.tensor([0.2, -0.1], requires_grad=True)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, inp):
            return self.body(inp * h.exp())

    model = Scaled()
    delta = torch.tensor(0.5)

    def estimate(create_graph):
        la = Laplace(model, "classification", hessian_structure="full")
        la.fit([batch], create_graph=create_graph)
        return minibatch_bound(la, len(x), delta, None)

    (grad,) = torch.autograd.grad(estimate(True), h)
    eps = 1e-5
    for i in range(2):
        with torch.no_grad():
            h[i] += eps
            up = estimate(False).item()
            h[i] -= 2 * eps
            down = estimate(False).item()
            h[i] += eps
        assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-8)


def test_a_registered_hyperparameter_is_learned_with_the_bound():
    torch.manual_seed(0)
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    h = torch.zeros(2, requires_grad=True)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, inp):
            return self.body(inp * h.exp())

    _, _, history = marglik_training(
        Scaled(), loader, "classification", hessian_structure="kron", n_epochs=3,
        hyperparameters=[h], evidence="bound",
    )
    assert len(history["hyperparameters"]) == 3 and not torch.equal(h.detach(), torch.zeros(2))


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    x, y = regression_data(48)
    kwargs = dict(likelihood="regression", n_epochs=5, lr=1e-2, marglik_frequency=2,
                  evidence="bound")

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=12, shuffle=True,
                          generator=torch.Generator().manual_seed(2))

    class Interrupt(Exception):
        pass

    def stop_at_2(epoch, model, la, history):
        if epoch == 2:
            raise Interrupt

    def bound_loader():  # its own shuffling generator, saved in the checkpoint too
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                          generator=torch.Generator().manual_seed(5))

    torch.manual_seed(1)
    model_a = net(1, 1)
    la_a, _, hist_a = marglik_training(model_a, loader(), bound_loader=bound_loader(), **kwargs)
    torch.manual_seed(1)
    model_b = net(1, 1)
    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        marglik_training(model_b, loader(), checkpoint=path, callback=stop_at_2,
                         bound_loader=bound_loader(), **kwargs)
    la_c, model_c, hist_c = marglik_training(net(1, 1), loader(), checkpoint=path,
                                             bound_loader=bound_loader(), **kwargs)
    assert hist_c["loss"] == hist_a["loss"] and hist_c["prior_precision"] == hist_a[
        "prior_precision"]
    assert hist_c["neg_log_marglik"] == hist_a["neg_log_marglik"]
    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)


def test_bad_arguments_raise():
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(ValueError, match="evidence must be one of"):
        marglik_training(net(), loader, n_epochs=1, evidence="stochastic")
    with pytest.raises(ValueError, match="n_hypersteps must be a non-negative integer"):
        marglik_training(net(), loader, n_epochs=1, evidence="bound", n_hypersteps=-1)
    h = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="hyper_batches applies to evidence='laplace'"):
        marglik_training(net(), loader, n_epochs=1, evidence="bound", hyperparameters=[h],
                         hyper_batches=1)
    with pytest.raises(ValueError, match="bound_loader applies only with evidence='bound'"):
        marglik_training(net(), loader, n_epochs=1, bound_loader=loader)
    with pytest.raises(ValueError, match="the loader of the bound's batches is empty"):
        marglik_training(net(), loader, n_epochs=1, evidence="bound", bound_loader=[])

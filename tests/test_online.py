"""Online evidence maximisation (Algorithm 1 of Immer et al. 2021): learning, best state, resume."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marglik.training import marglik_training, select_architecture


def sinusoid(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 8 * torch.rand(n, 1, generator=g)
    return x, torch.sin(x) + 0.3 * torch.randn(n, 1, generator=g)


def regression_loader(seed=0):
    x, y = sinusoid(seed=seed)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=20,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def net(width=20):
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1))


def test_learns_noise_and_layerwise_prior_and_keeps_the_best_state():
    torch.manual_seed(0)
    la, model, history = marglik_training(
        net(),
        regression_loader(),
        "regression",
        n_epochs=150,
        lr=1e-2,
        n_epochs_burnin=10,
        marglik_frequency=10,
        n_hypersteps=30,
    )
    assert 0.2 < la.sigma_noise.item() < 0.45  # true noise 0.3
    assert la.prior_precision.shape == (4,)
    evaluated = [v for v in history["log_marglik"] if not math.isnan(v)]
    assert len(evaluated) == 14 and len(history["loss"]) == 150
    # the returned posterior is refitted at the best-evidence state
    torch.testing.assert_close(
        la.log_marginal_likelihood().item(), max(evaluated), rtol=1e-8, atol=1e-8
    )
    assert evaluated[-1] > evaluated[0]


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_classification_structures(structure):
    torch.manual_seed(0)
    x = torch.randn(40, 2)
    y = (x[:, 0] * x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    model = nn.Sequential(nn.Linear(2, 10), nn.Tanh(), nn.Linear(10, 2))
    la, _, history = marglik_training(
        model,
        loader,
        "classification",
        hessian_structure=structure,
        prior_structure="scalar",
        n_epochs=30,
        lr=1e-2,
        n_hypersteps=10,
    )
    assert la.hessian_structure == structure and la.prior_precision.shape == ()
    assert history["loss"][-1] < history["loss"][0]


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    kwargs = dict(likelihood="regression", n_epochs=6, lr=1e-2, marglik_frequency=2, n_hypersteps=5)
    torch.manual_seed(1)
    model_a = net()
    torch.manual_seed(3)
    la_a, _, hist_a = marglik_training(model_a, regression_loader(), **kwargs)

    class Interrupt(Exception):
        pass

    def stop_at_3(epoch, model, la, history):
        if epoch == 3:
            raise Interrupt

    torch.manual_seed(1)
    model_b = net()
    path = tmp_path / "run.pt"
    torch.manual_seed(3)
    with pytest.raises(Interrupt):
        marglik_training(
            model_b, regression_loader(), checkpoint=path, callback=stop_at_3, **kwargs
        )
    torch.manual_seed(123)  # a resumed run restores the RNG state itself
    model_c = net()  # fresh weights: everything comes from the checkpoint
    la_c, _, hist_c = marglik_training(model_c, regression_loader(), checkpoint=path, **kwargs)
    assert hist_c["loss"] == hist_a["loss"] and hist_c["sigma_noise"] == hist_a["sigma_noise"]
    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)
    assert torch.equal(la_a.prior_precision, la_c.prior_precision)


def test_architecture_selection_prefers_a_network_that_can_fit():
    torch.manual_seed(0)
    candidates = {"linear": lambda: nn.Linear(1, 1), "tanh-20": lambda: net(20)}
    best, scores = select_architecture(
        candidates,
        regression_loader(),
        "regression",
        n_epochs=100,
        lr=1e-2,
        marglik_frequency=10,
        n_hypersteps=20,
    )
    assert best == "tanh-20" and scores["tanh-20"] > scores["linear"] + 10


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tune_sigma"):
        marglik_training(net(), regression_loader(), "classification", tune_sigma=True)
    with pytest.raises(ValueError, match="prior_structure"):
        marglik_training(net(), regression_loader(), "regression", prior_structure="blocks")
    with pytest.raises(ValueError, match="empty"):
        marglik_training(net(), [], "regression")


def test_frozen_parameters_are_left_out_of_the_posterior_and_the_layerwise_prior():
    torch.manual_seed(0)
    x = torch.randn(30, 2)
    y = x.sum(-1, keepdim=True) + 0.1 * torch.randn(30, 1)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    la, model, history = marglik_training(
        model, loader, "regression", hessian_structure="kron", n_epochs=2, n_hypersteps=3
    )
    assert la.subset.names == ["0.weight", "2.weight", "2.bias"]
    assert len(history["prior_precision"][-1]) == 3
    torch.testing.assert_close(model[0].bias, frozen)

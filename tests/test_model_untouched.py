"""Every pass the library makes leaves the model exactly as it was.

A model with BatchNorm1d/2d and Dropout left in train mode, a forward pre-hook registered by the
user and some frozen parameters is fingerprinted (training flags, ``requires_grad`` flags, buffer
values and identities, parameter values, hook dictionaries) before and after fitting, predicting,
evaluating and optimising the evidence, and saving / loading the posterior.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.runtime import eval_mode, preserved
from marglik.training import marglik_training

HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def network() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.3),
        nn.Tanh(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():  # running statistics that a forward pass in train mode would move
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    model[0].bias.requires_grad_(False)
    model[5].weight.requires_grad_(False)
    model.register_forward_pre_hook(lambda m, args: None)
    model[4].register_forward_hook(lambda m, args, out: None)
    model.train()
    return model


def data(n=12):
    x = torch.randn(n, 1, 4, 4)
    y = torch.randint(0, 3, (n,))
    return x, y, DataLoader(TensorDataset(x, y), batch_size=4)


def fingerprint(model: nn.Module) -> dict:
    return {
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_ids": [(n, id(b)) for n, b in model.named_buffers()],
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "hooks": [(n, a, list(getattr(m, a))) for n, m in model.named_modules() for a in HOOKS],
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "buffer_ids", "hooks"):
        assert after[key] == before[key], key
    for key in ("buffers", "parameters"):
        assert after[key].keys() == before[key].keys()
        for name, value in before[key].items():
            assert torch.equal(after[key][name], value), (key, name)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["diag", "kron", "full", "lowrank"])
def test_fit_predict_evidence_and_saving_leave_the_model_as_it_was(subset, structure):
    model = network()
    x, y, loader = data()
    before = fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KFAC falls back to diagonal blocks for BatchNorm
        la = marglik.Laplace(model, "classification", subset, structure, rank=4).fit(loader)
    assert_same(before, fingerprint(model))
    if subset == "last_layer":
        assert la.subset.names == ["8.weight", "8.bias"] and la.last_layer_name == "8"
    else:  # the frozen parameters are not in the posterior
        assert "0.bias" not in la.subset.names and "5.weight" not in la.subset.names
        assert len(la.subset.names) == 8

    for call in (
        lambda: la(x[:5]),
        lambda: la(x[:5], pred_type="nn", n_samples=3),
        lambda: la(x[:5], link_approx="mc", n_samples=3),
        lambda: la.functional_moments(x[:5]),
        lambda: list(la.functional_moment_chunks(x[:5], chunk_size=2)),
        lambda: la.function_samples(x[:5], n_samples=2),
        lambda: la.log_marginal_likelihood(),
        lambda: la.optimize_prior_precision(n_steps=3),
    ):
        call()
        assert_same(before, fingerprint(model))
    state = la.state_dict()
    again = marglik.Laplace(model, "classification", subset, structure, rank=4)
    again.load_state_dict(state)
    assert_same(before, fingerprint(model))
    torch.testing.assert_close(again.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_a_forward_pass_in_train_mode_would_change_the_fingerprint():
    """The test can fail: the fingerprint sees what a forward pass in train mode does."""
    model = network()
    x, _, _ = data()
    before = fingerprint(model)
    model(x)
    with pytest.raises(AssertionError):
        assert_same(before, fingerprint(model))


def test_preserved_restores_buffers_in_place_flags_modes_and_hooks():
    model = network()
    x, _, _ = data()
    before = fingerprint(model)
    mean = model[1].running_mean
    with preserved(model):
        model(x)  # train mode: running statistics move
        model[5].running_var = torch.zeros(6)  # a buffer replaced by another tensor
        model.eval()
        model[4].weight.requires_grad_(False)
        model[4].register_forward_hook(lambda m, args, out: None)
        assert not torch.equal(mean, before["buffers"]["1.running_mean"])
    assert model[1].running_mean is mean
    assert_same(before, fingerprint(model))


def test_nested_eval_mode_saves_buffers_once_and_keeps_unchanged_buffers_untouched():
    model = network()
    x, _, _ = data()
    version = model[1].running_mean._version
    with preserved(model):
        with eval_mode(model, ["4.weight"]):
            assert not model.training and model[4].weight.requires_grad
            assert not model[4].bias.requires_grad
            model(x)
        assert model.training and model[4].bias.requires_grad
        with eval_mode(model, requires_grad=None):  # None: flags as they are
            assert model[4].bias.requires_grad and not model[0].bias.requires_grad
    # nothing changed the buffers, so nothing was copied back (graphs that saved them stay valid)
    assert model[1].running_mean._version == version


def test_marglik_training_restores_hooks_and_requires_grad_flags():
    model = network()
    _, _, loader = data()
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    hooks = [(n, a, list(getattr(m, a))) for n, m in model.named_modules() for a in HOOKS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la, model, history = marglik_training(
            model, loader, "classification", hessian_structure="diag", n_epochs=2,
            n_hypersteps=2,
        )
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [(n, a, list(getattr(m, a))) for n, m in model.named_modules() for a in HOOKS] == hooks
    assert "0.bias" not in la.subset.names and len(history["log_marglik"]) == 2

"""Silent layers: registered modules whose hooks do not fire get exact curvature, never zeros.

A Linear used through ``F.linear(x, m.weight)``, a Linear that is never called, and a Linear
whose weight is also used outside its own forward (tied) cannot be recorded by forward hooks.
The curvature engine and the layer-wise predictive detect them on the first batch, warn once
naming them, and give their parameters the exact per-sample (``torch.func``) path: diagonal
and full curvature equal brute force, KFAC gives them exact diagonal blocks, and the layer-wise
predictive equals the generic one and brute force J Σ Jᵀ (float64, tests/oracle.py).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.predictive import glm_moments
from marglik.structures import Diagonal, Kronecker
from tests import oracle


class Functional(nn.Module):
    """``lin`` is used through F.linear on its weight and bias: its hooks never fire."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)))


class Unused(nn.Module):
    """``unused`` is never called: its exact curvature (and Jacobian) is zero."""

    def __init__(self):
        super().__init__()
        self.lin, self.unused, self.out = nn.Linear(3, 5), nn.Linear(3, 2), nn.Linear(5, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


class Tied(nn.Module):
    """``lin`` runs as a module (its hook fires) and its weight is used again functionally."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.out(torch.tanh(F.linear(h, self.lin.weight)))


class Tokens(nn.Module):
    """A functional Linear over shared positions (tokens), pooled."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)).mean(1))


MODELS = {
    "functional": (Functional, (3,), ["lin"]),
    "unused": (Unused, (3,), ["unused"]),
    "tied": (Tied, (4,), ["lin"]),
    "tokens": (Tokens, (5, 3), ["lin"]),
}


def loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(model, x, y, structure):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la = marglik.Laplace(model, "classification", hessian_structure=structure)
        la.fit(loader(x, y))
    return la, [str(w.message) for w in caught]


def setup(name):
    make, shape, silent = MODELS[name]
    model = make()
    x = torch.randn(10, *shape)
    with torch.no_grad():
        y = torch.randint(0, model(x).shape[-1], (10,))
    return model, x, y, silent


def rel_close(actual, expected, rtol=1e-8):
    scale = expected.abs().max().clamp_min(1e-300)
    assert float((actual - expected).abs().max() / scale) <= rtol


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("name", MODELS)
def test_silent_layers_get_exact_curvature_and_one_warning(name, structure):
    model, x, y, silent = setup(name)
    la, messages = fit(model, x, y, structure)
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    named = [m for m in messages if "cannot be recorded as modules" in m]
    if structure == "full":  # torch.func for the whole subset: nothing to detect
        assert not named
        rel_close(la.H.to_dense(), H)
    else:
        assert len(named) == 1 and all(f"'{s}'" in named[0] for s in silent)
    if structure == "diag":
        rel_close(la.H.diag(), H.diagonal())
    if structure == "kron":  # the silent layer's tensors: exact diagonal blocks
        names = [n for n, _ in model.named_parameters()]
        sizes = [p.numel() for p in model.parameters()]
        starts = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
        dense = la.H.to_dense()
        for n, size in zip(names, sizes):
            if n.split(".")[0] in silent:
                s = starts[n]
                block = dense[s : s + size, s : s + size]
                rel_close(block, torch.diag(H.diagonal()[s : s + size]))
        kinds = {type(b) for b in la.H.blocks}
        assert Diagonal in kinds and Kronecker in kinds  # "out" keeps its Kronecker block


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("name", MODELS)
def test_layerwise_predictive_and_evidence_equal_brute_force(name, structure):
    model, x, y, silent = setup(name)
    la, _ = fit(model, x, y, structure)
    xt = torch.randn(5, *x.shape[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f_lw, v_lw = glm_moments(la, xt, backend="layerwise", chunk_size=2)
    named = [str(w.message) for w in caught if "cannot be recorded" in str(w.message)]
    assert len(named) == 1 and all(f"'{s}'" in named[0] for s in silent)  # once per call
    f_gen, v_gen = glm_moments(la, xt, backend="generic")
    J = oracle.jacobians(model, xt)
    expected = J @ torch.linalg.inv(la.posterior_precision) @ J.mT
    rel_close(v_lw, expected)
    rel_close(v_gen, expected)
    _, joint = glm_moments(la, xt, joint=True, backend="layerwise")
    rel_close(joint, J.reshape(-1, J.shape[-1]) @ torch.linalg.inv(la.posterior_precision)
              @ J.reshape(-1, J.shape[-1]).T)
    with torch.no_grad():
        torch.testing.assert_close(f_lw, model(xt), rtol=0, atol=1e-12)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    log_lik = -oracle.categorical_nll(model(x), y).detach()
    delta = torch.ones_like(theta)
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    if structure == "diag":
        H = torch.diag(H.diagonal())
    elif structure == "kron":
        H = la.H.to_dense()
    rel_close(la.log_marginal_likelihood(),
              oracle.laplace_evidence(log_lik, theta, H, delta))


def test_unused_layer_has_zero_curvature_and_zero_jacobian():
    model, x, y, _ = setup("unused")
    la, _ = fit(model, x, y, "diag")
    n_lin = sum(p.numel() for p in model.lin.parameters())
    n_unused = sum(p.numel() for p in model.unused.parameters())
    assert torch.all(la.H.diag()[n_lin : n_lin + n_unused] == 0)


def test_the_model_is_left_untouched():
    model, x, y, _ = setup("functional")
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    fit(model, x, y, "kron")
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert not model.lin._forward_hooks and not model.out._forward_hooks


class Conditional(nn.Module):
    """``extra`` runs only on the first batch (inputs with a positive first entry)."""

    def __init__(self):
        super().__init__()
        self.lin, self.extra = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.extra(h) if bool(x[0, 0] > 0) else h


def test_a_layer_that_stops_running_after_the_first_batch_is_a_clear_error():
    model = Conditional()
    x = torch.randn(8, 3)
    x[0, 0], x[4, 0] = 1.0, -1.0
    y = torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="ran on the first batch but not on this one"):
        marglik.Laplace(model, "classification", hessian_structure="diag").fit(loader(x, y))

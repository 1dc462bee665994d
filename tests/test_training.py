"""MAP training helper: the loss is mean NLL + δ‖θ‖²/(2N), and Adam decreases it."""

import math

import pytest
import torch
from torch import nn

from marglik.likelihoods import Gaussian
from marglik.training import map_loss, prior_term, train_map


def toy_regression(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, generator=g) * 6 - 3
    y = torch.sin(X) + 0.1 * torch.randn(n, 1, generator=g)
    return X, y


def mlp(n_in: int = 1, n_out: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 20), nn.Tanh(), nn.Linear(20, n_out))


def test_train_map_reduces_loss_regression():
    X, y = toy_regression()
    model = mlp()
    history = train_map(model, [(X, y)], "regression", n_epochs=200, lr=1e-2, prior_precision=1.0)
    assert len(history["loss"]) == 200
    const = 0.5 * math.log(2 * math.pi)  # the Gaussian normaliser at σ = 1
    assert history["loss"][-1] - const < 0.2 * (history["loss"][0] - const)
    assert not model.training  # left in eval mode


def test_train_map_reduces_loss_classification_minibatches():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(90, 2, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 0] > 1).long()
    data = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=g)
    model = mlp(2, 3)
    history = train_map(model, loader, "classification", n_epochs=30, lr=1e-2, weight_decay=1e-3)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    with torch.no_grad():
        acc = (model(X).argmax(-1) == y).double().mean()
    assert acc > 0.9


def test_prior_term_scalar_layerwise_per_parameter():
    model = nn.Linear(3, 2)  # weight (2, 3), bias (2,)
    w, b = model.weight.detach(), model.bias.detach()
    N = 7
    scalar = prior_term(model, 2.0, N)
    assert torch.allclose(scalar, 2.0 * (w.square().sum() + b.square().sum()) / (2 * N))
    layerwise = prior_term(model, torch.tensor([3.0, 5.0]), N)
    assert torch.allclose(layerwise, (3.0 * w.square().sum() + 5.0 * b.square().sum()) / (2 * N))
    delta = torch.arange(1.0, 9.0)
    per_param = prior_term(model, delta, N)
    theta = torch.cat([w.reshape(-1), b])
    assert torch.allclose(per_param, (delta * theta.square()).sum() / (2 * N))
    with pytest.raises(ValueError, match="one per"):
        prior_term(model, torch.ones(3), N)


def test_map_loss_gradient_by_hand_on_a_linear_model():
    """Gaussian σ, linear f = Xw: ∇ = −Xᵀ(y − Xw)/(Bσ²) + δw/N."""
    g = torch.Generator().manual_seed(3)
    B, N, D, delta, sigma = 5, 40, 3, 4.0, 0.7
    X, y = torch.randn(B, D, generator=g), torch.randn(B, 1, generator=g)
    model = nn.Linear(D, 1, bias=False)
    loss = map_loss(model, Gaussian(sigma), X, y, delta, N)
    (grad,) = torch.autograd.grad(loss, model.weight)
    w = model.weight.detach().reshape(D, 1)
    expected = -X.T @ (y - X @ w) / (B * sigma**2) + delta * w / N
    assert torch.allclose(grad.reshape(D, 1), expected, atol=1e-12)
    # and the value: mean Gaussian NLL + δ‖w‖²/(2N)
    nll = ((y - X @ w).square() / (2 * sigma**2) + math.log(sigma * math.sqrt(2 * math.pi))).mean()
    assert torch.allclose(loss, nll + delta * w.square().sum() / (2 * N))


def test_weight_decay_is_prior_precision_over_n():
    X, y = toy_regression(32)
    a, b = mlp(), mlp()
    b.load_state_dict(a.state_dict())
    train_map(a, [(X, y)], "regression", n_epochs=20, prior_precision=3.2)
    train_map(b, [(X, y)], "regression", n_epochs=20, weight_decay=3.2 / 32)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q)
    with pytest.raises(ValueError, match="not both"):
        train_map(a, [(X, y)], "regression", prior_precision=1.0, weight_decay=0.1)

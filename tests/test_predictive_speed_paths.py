"""Fast paths of the GLM predictive for full posteriors, against brute force (float64).

A ``"full"`` posterior's layer-wise predictive contracts the Jacobian against the dense block's
cached Cholesky factor (one triangular solve per chunk) unless the block already holds its
eigendecomposition. Both paths, per input and joint, equal J Σ Jᵀ with dense ``torch.func``
Jacobians and an explicit inverse of the posterior precision to 1e-10 relative, for an MLP, a
CNN and a tiny ``nn.TransformerEncoderLayer`` token classifier (embedding, attention, LayerNorm),
with a scalar, layer-wise and per-parameter δ, over all weights and the last layer. The factor is
made once and reused across predictive calls, and made again when δ, σ or the curvature change.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.predictive import glm_moments
from marglik.structures import Dense
from tests import oracle


class Tokens(nn.Module):
    """Embedding → TransformerEncoderLayer (batch first) → mean over tokens → Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(2, 3, 2),
                         nn.Flatten(), nn.Linear(12, 4))


MODELS = {
    # name: (constructor, input maker)
    "mlp": (mlp, lambda n: torch.randn(n, 3)),
    "cnn": (cnn, lambda n: torch.randn(n, 1, 5, 5)),
    "transformer": (Tokens, lambda n: torch.randint(0, 7, (n, 4))),
}


def rel_err(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


def fitted(name, task="regression", subset="all", n=12):
    make, inputs = MODELS[name]
    model = make()
    x = inputs(n)
    with torch.no_grad():
        f = model(x)
    y = torch.randint(0, f.shape[-1], (n,)) if task == "classification" else torch.randn(f.shape)
    sigma = {"sigma_noise": 0.7} if task == "regression" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = marglik.Laplace(model, task, subset_of_weights=subset, hessian_structure="full",
                             **sigma)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    return la, inputs


def set_delta(la, kind):
    gen = torch.Generator().manual_seed(3)
    if kind == "scalar":
        la.prior_precision = torch.tensor(0.8)
    elif kind == "layerwise":
        la.prior_precision = torch.rand(len(la.subset.names), generator=gen) + 0.5
    else:
        la.prior_precision = torch.rand(la.n_params, generator=gen) + 0.5


def brute_force(la, x):
    """Dense per-sample Jacobians (N, D, P) and Σ = P⁻¹ from the explicit precision."""
    J = oracle.jacobians(la.model, x, la.subset.names)
    return J, torch.linalg.inv(la.posterior_precision)


@pytest.fixture
def counter(monkeypatch):
    """Count the O(p³) factorisations."""
    counts = {"eigh": 0, "cholesky_ex": 0}
    for name in counts:
        original = getattr(torch.linalg, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    return counts


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("delta", ["scalar", "layerwise", "per_parameter"])
@pytest.mark.parametrize("name", MODELS)
def test_full_predictive_equals_brute_force_on_both_paths(name, delta, subset, counter):
    la, inputs = fitted(name, subset=subset)
    set_delta(la, delta)
    xt = inputs(5)
    J, Sigma = brute_force(la, xt)
    expected = J @ Sigma @ J.mT
    Jj = J[:3].reshape(-1, J.shape[-1])
    expected_joint = Jj @ Sigma @ Jj.T
    # Cholesky path: a fresh posterior holds no eigendecomposition, and none is made.
    f, v = glm_moments(la, xt, backend="layerwise", chunk_size=2)
    _, joint = glm_moments(la, xt[:3], joint=True, backend="layerwise")
    assert counter["eigh"] == 0 and counter["cholesky_ex"] == 1
    assert rel_err(v, expected) <= 1e-10
    assert rel_err(joint, expected_joint) <= 1e-10
    with torch.no_grad():
        assert rel_err(f, la.model(xt)) <= 1e-12
    # Eigenbasis path: once the block holds its eigendecomposition, a scalar δ uses it.
    for block in la.H.blocks:
        block.eig()
    _, v_eig = glm_moments(la, xt, backend="layerwise", chunk_size=2)
    _, joint_eig = glm_moments(la, xt[:3], joint=True, backend="layerwise")
    assert rel_err(v_eig, expected) <= 1e-10
    assert rel_err(joint_eig, expected_joint) <= 1e-10
    # The generic backend agrees too.
    _, v_gen = glm_moments(la, xt, backend="generic")
    assert rel_err(v_gen, expected) <= 1e-10


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_classification_full_predictive_equals_brute_force(name):
    la, inputs = fitted(name, task="classification")
    xt = inputs(4)
    J, Sigma = brute_force(la, xt)
    _, v = glm_moments(la, xt, backend="layerwise")
    assert rel_err(v, J @ Sigma @ J.mT) <= 1e-10


def test_the_factor_is_reused_and_made_again_when_delta_sigma_or_curvature_change(counter):
    la, inputs = fitted("transformer")
    xt = inputs(4)

    def check():
        J, Sigma = brute_force(la, xt)
        _, v = glm_moments(la, xt, backend="layerwise")
        assert rel_err(v, J @ Sigma @ J.mT) <= 1e-10

    check()
    assert counter["cholesky_ex"] == 1
    for _ in range(2):  # reused across calls, with and without chunking
        glm_moments(la, xt, backend="layerwise", chunk_size=1)
        la(xt)
    assert counter["cholesky_ex"] == 1
    la.prior_precision = torch.tensor(2.5)  # δ
    check()
    assert counter["cholesky_ex"] == 2
    la.prior_precision = torch.rand(len(la.subset.names)) + 0.5  # layer-wise δ
    check()
    assert counter["cholesky_ex"] == 3
    la.sigma_noise = torch.tensor(0.4)  # σ changes the scale of H
    check()
    assert counter["cholesky_ex"] == 4
    x2 = inputs(9)
    with torch.no_grad():
        y2 = la.model(x2) + torch.randn(9, 3)
    la.fit(DataLoader(TensorDataset(x2, y2), batch_size=5))  # new curvature
    check()
    assert counter["cholesky_ex"] == 5
    assert counter["eigh"] == 0


def test_dense_cholesky_cache(counter):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 7, generator=g)
    H = B @ B.T
    block = Dense(H.clone())
    scale, delta = torch.tensor(1.5), torch.rand(6, generator=g) + 0.2
    expected = torch.linalg.cholesky(scale * H + torch.diag(delta))
    assert rel_err(block.cholesky(scale, delta), expected) <= 1e-12
    v = torch.randn(3, 6, generator=g)
    P = scale * H + torch.diag(delta)
    assert rel_err(block.solve(v, scale, delta), torch.linalg.solve(P, v.T).T) <= 1e-10
    assert rel_err(block.inv_quad(v, scale, delta), v @ torch.linalg.inv(P) @ v.T) <= 1e-10
    assert counter["cholesky_ex"] == 1  # one factor served the three calls
    block.cholesky(scale.clone(), delta.clone())  # equal values: the cache
    assert counter["cholesky_ex"] == 1
    block.cholesky(scale, 0.5)
    assert counter["cholesky_ex"] == 2
    block.H.mul_(2.0)  # changed in place: made again
    assert rel_err(block.cholesky(scale, 0.5),
                   torch.linalg.cholesky(2 * scale * H + 0.5 * torch.eye(6))) <= 1e-12
    assert counter["cholesky_ex"] == 3
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        Dense(-H).cholesky(1.0, 0.1)


@pytest.mark.parametrize("shape", ["1x1", "contiguous", "transposed"])
def test_dense_cholesky_leaves_the_curvature_unchanged(shape):
    g = torch.Generator().manual_seed(2)
    n = 1 if shape == "1x1" else 5
    B = torch.randn(n, n + 1, generator=g)
    H = B @ B.T + torch.triu(torch.rand(n, n, generator=g), 1) * 1e-3  # not exactly symmetric
    if shape == "transposed":
        H = H.T.contiguous().T  # same values, column-major storage
    before = H.clone()
    C = Dense(H).cholesky(2.0, 0.3)
    assert torch.equal(H, before)
    P = 2.0 * 0.5 * (before + before.T) + 0.3 * torch.eye(n)
    assert rel_err(C @ C.T, P) <= 1e-12


def test_dense_cholesky_with_hyperparameters_that_require_grad_is_differentiable(counter):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(5, 6, generator=g)
    H = B @ B.T
    J = torch.randn(2, 5, generator=g)
    block = Dense(H)
    for _ in range(2):  # never cached: each call has its own graph
        delta = (torch.rand(5, generator=g) + 0.3).requires_grad_(True)
        block.inv_quad(J, 2.0, delta).trace().backward()
        d0 = delta.detach().clone().requires_grad_(True)
        (J @ torch.linalg.inv(2.0 * H + torch.diag(d0)) @ J.T).trace().backward()
        assert rel_err(delta.grad, d0.grad) <= 1e-10
    assert counter["cholesky_ex"] == 2

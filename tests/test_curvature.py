"""Curvature of every structure against brute-force references (tests/oracle.py), float64."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from tests import oracle


def loader(x, y, batch_size=7):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def mlp(d_in=3, d_out=4):
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out))


def cnn():  # in-place activations must not corrupt the recorded layer outputs
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(2, 2, 3), nn.Flatten(),
        nn.Linear(8, 3),
    )


class PerPosition(nn.Module):
    """Token model: Linear on (N, R, D) with a LayerNorm (not expressible by KFAC)."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def data(task, n=20, x_shape=(3,), d_out=4):
    x = torch.randn(n, *x_shape)
    if task == "classification":
        return x, torch.randint(0, d_out, (n,)), oracle.categorical_nll
    if task == "binary":
        return x, torch.randint(0, 2, (n, d_out)).double(), oracle.bernoulli_nll
    return x, torch.randn(n, d_out), oracle.gaussian_nll(0.7)


def fitted(model, task, x, y, structure, **kw):
    sigma = {"sigma_noise": 0.7} if task == "regression" else {}
    la = marglik.Laplace(model, task, hessian_structure=structure, **sigma, **kw)
    return la.fit(loader(x, y))


@pytest.mark.parametrize("task", ["classification", "regression", "binary"])
@pytest.mark.parametrize("make_model", [mlp, cnn])
def test_full_and_diag_ggn_equal_brute_force(task, make_model):
    model = make_model()
    d_out = 4 if make_model is mlp else 3
    x, y, nll = data(task, x_shape=(3,) if make_model is mlp else (1, 4, 4), d_out=d_out)
    H = oracle.ggn(model, x, y, nll)
    torch.testing.assert_close(
        fitted(model, task, x, y, "full").H.to_dense(), H, rtol=1e-9, atol=1e-10
    )
    torch.testing.assert_close(
        fitted(model, task, x, y, "diag").H.diag(), H.diagonal(), rtol=1e-9, atol=1e-10
    )


def test_ggn_with_shared_positions_and_unsupported_layers():
    model = PerPosition()
    x, y = torch.randn(10, 5, 3), torch.randint(0, 2, (10, 5))
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    full = fitted(model, "classification", x, y, "full").H.to_dense()
    torch.testing.assert_close(full, H, rtol=1e-9, atol=1e-10)
    diag = fitted(model, "classification", x, y, "diag").H.diag()
    torch.testing.assert_close(diag, H.diagonal(), rtol=1e-9, atol=1e-10)
    with pytest.warns(UserWarning, match="KFAC cannot express"):
        kron = fitted(model, "classification", x, y, "kron").H
    # the LayerNorm parameters (entries 16..23) get their exact diagonal inside the KFAC posterior
    torch.testing.assert_close(kron.diag()[16:24], H.diagonal()[16:24], rtol=1e-9, atol=1e-10)


def test_empirical_fisher_equals_brute_force():
    model = mlp()
    x, y, nll = data("classification")
    F = oracle.empirical_fisher(model, x, y, nll)
    la = fitted(model, "classification", x, y, "full", curvature="ef")
    torch.testing.assert_close(la.H.to_dense(), F, rtol=1e-9, atol=1e-10)
    la = fitted(model, "classification", x, y, "diag", curvature="ef")
    torch.testing.assert_close(la.H.diag(), F.diagonal(), rtol=1e-9, atol=1e-10)


def test_monte_carlo_ggn_is_unbiased():
    model = mlp()
    x, y, nll = data("classification")
    H = oracle.ggn(model, x, y, nll)
    la = fitted(model, "classification", x, y, "full", curvature="ggn-mc", mc_samples=4000)
    err = (la.H.to_dense() - H).norm() / H.norm()
    assert err < 0.05  # MC error ~ 1/sqrt(4000 · 20) per entry, far below 5 %
    la1 = fitted(model, "classification", x, y, "full", curvature="ggn-mc", mc_samples=1)
    assert (la1.H.to_dense() - H).norm() / H.norm() > err  # one sample is noisier


def test_kfac_single_linear_layer_is_exact_for_regression():
    model = nn.Linear(3, 2)
    x, y = torch.randn(15, 3), torch.randn(15, 2)
    H = oracle.ggn(model, x, y, oracle.gaussian_nll(0.7))
    blocks = fitted(model, "regression", x, y, "kron").H.blocks
    torch.testing.assert_close(blocks[0].to_dense(), H[:6, :6], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(blocks[1].to_dense(), H[6:, 6:], rtol=1e-10, atol=1e-12)


class ChannelsLast(nn.Module):
    """Likelihoods take outputs as (N, *positions, C): move conv channels last."""

    def forward(self, x):
        return x.movedim(1, -1)


class MeanOverPositions(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(self.dims)


SETTINGS = {
    # name: (model, input shape, output shape, setting in which it is exact)
    "linear-expand": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)),
        (5, 3),
        (5, 2),
        "expand",
    ),
    "linear-reduce": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), MeanOverPositions(1)),
        (5, 3),
        (2,),
        "reduce",
    ),
    "conv-expand": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1), ChannelsLast()),
        (2, 4, 4),
        (4, 4, 2),
        "expand",
    ),
    "conv-reduce": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1), MeanOverPositions((2, 3)), nn.Linear(2, 2)
        ),
        (2, 4, 4),
        (2,),
        "reduce",
    ),
    "conv1d-expand": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, padding="same"), nn.Conv1d(3, 2, 1), ChannelsLast()
        ),
        (2, 6),
        (6, 2),
        "expand",
    ),
}


def kfac_blocks_vs_exact(name, approx, batch_size=4):
    make, x_shape, y_shape, _ = SETTINGS[name]
    model = make()
    x, y = torch.randn(8, *x_shape), torch.randn(8, *y_shape)
    H = oracle.ggn(model, x, y, oracle.gaussian_nll(1.0))
    la = marglik.Laplace(model, "regression", hessian_structure="kron", kfac_approx=approx)
    la.fit(loader(x, y, batch_size))
    errors, offset = [], 0
    for block in la.H.blocks:
        exact = H[offset : offset + block.size, offset : offset + block.size]
        errors.append(((block.to_dense() - exact).norm() / exact.norm()).item())
        offset += block.size
    return errors


@pytest.mark.parametrize("name", SETTINGS)
def test_kfac_is_exact_for_deep_linear_networks_in_its_setting(name):
    """Eschenhagen et al. 2023: expand exact in the expand setting, reduce in the reduce setting."""
    exact_in = SETTINGS[name][3]
    other = "reduce" if exact_in == "expand" else "expand"
    assert max(kfac_blocks_vs_exact(name, exact_in)) < 1e-12
    assert max(kfac_blocks_vs_exact(name, other)) > 1e-3


def test_kfac_does_not_depend_on_the_batch_size():
    model = cnn()
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    dense = [fitted(model, "classification", x, y, "kron").H.to_dense()]
    for bs in (1, 5, 12):
        la = marglik.Laplace(model, "classification", hessian_structure="kron").fit(
            loader(x, y, bs)
        )
        dense.append(la.H.to_dense())
    for d in dense[1:]:
        torch.testing.assert_close(d, dense[0], rtol=1e-10, atol=1e-12)


def test_lowrank_recovers_the_top_eigenpairs():
    model = mlp()
    x, y, nll = data("classification")
    H = oracle.ggn(model, x, y, nll)
    full_rank = fitted(model, "classification", x, y, "lowrank", rank=H.shape[0])
    torch.testing.assert_close(full_rank.H.to_dense(), H, rtol=1e-8, atol=1e-8)
    la = fitted(model, "classification", x, y, "lowrank", rank=5)
    expected = torch.linalg.eigvalsh(H).flip(0)[:5]
    torch.testing.assert_close(la.H.blocks[0].s, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("structure", ["full", "diag", "kron", "lowrank"])
def test_fit_leaves_the_model_exactly_as_it_was(structure):
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 4))
    model.train()
    model[3].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, _ = data("classification")
    fitted(model, "classification", x, y, structure, rank=3)
    assert model.training and all(m.training for m in model.modules())
    assert not model[3].bias.requires_grad and model[0].weight.requires_grad
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_kfac_accumulates_in_the_model_dtype_at_least_float32():
    model = mlp().float()
    x, y, _ = data("classification")
    la = marglik.Laplace(model, "classification").fit(loader(x.float(), y))
    assert la.H.dtype == torch.float32 and la.mean.dtype == torch.float32


def test_kfac_with_monte_carlo_and_empirical_fisher_columns():
    model = mlp()
    x, y, _ = data("classification")
    exact = fitted(model, "classification", x, y, "kron").H.to_dense()
    mc = fitted(model, "classification", x, y, "kron", curvature="ggn-mc", mc_samples=4000)
    mc = mc.H.to_dense()
    assert (mc - exact).norm() / exact.norm() < 0.05
    # a single linear layer's empirical-Fisher KFAC: G = Σ_n g_n g_nᵀ, A = 1/N Σ_n a_n a_nᵀ
    lin = nn.Linear(3, 4)
    ef = fitted(lin, "classification", x, y, "kron", curvature="ef").H.blocks[0]
    g = torch.softmax(lin(x), -1).detach() - nn.functional.one_hot(y, 4)
    torch.testing.assert_close(ef.to_dense(), torch.kron(g.T @ g, x.T @ x / len(x)))

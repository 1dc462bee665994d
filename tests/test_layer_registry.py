"""Layer registry: a toy layer type registered from outside the library gets exact closed forms.

The toy type is a bilinear layer out = Σ_ij W_{o,ij} x1_i x2_j + b_o over any leading positions,
i.e. out = a Wᵀ + b with a = x1 ⊗ x2 (row-major) and W (D_out, D1, D2) flattened to
(D_out, D1·D2): it fits the registry's form, takes two forward arguments and is not a subclass
of anything registered. Everything is checked against the brute-force references in
tests/oracle.py (float64).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.builtin_layers import LINEAR
from marglik.curvature.layers import layer_map, supported
from marglik.curvature.registry import LayerType, layer_type, registered_layer
from marglik.curvature.subsets import select_subset
from marglik.posterior.layerwise import layerwise_plan
from marglik.predictive import glm_moments
from marglik.structures import Dense, Diagonal, Kronecker
from tests import oracle


class Bilinear(nn.Module):
    """out (N, *, D_out) = x1ᵀ W_o x2 + b_o for x1 (N, *, D1), x2 (N, *, D2)."""

    def __init__(self, d1: int, d2: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d1, d2) / (d1 * d2) ** 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x1, x2):
        return torch.einsum("...i,oij,...j->...o", x1, self.weight, x2) + self.bias


def bilinear_inputs(module, args):
    """a = x1 ⊗ x2 per position: (N, R, D1·D2)."""
    x1, x2 = args
    a = torch.einsum("...i,...j->...ij", x1, x2)
    return a.reshape(x1.shape[0], -1, x1.shape[-1] * x2.shape[-1])


def bilinear_output_grads(module, g):
    """(K, N, *, D_out) -> (K, N, R, D_out)."""
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


BILINEAR = LayerType(inputs=bilinear_inputs, output_grads=bilinear_output_grads)


class Head(nn.Module):
    """The toy layer alone: x (N, *, 5) -> bilinear(x[..., :3], x[..., 3:]) (N, *, 2)."""

    def __init__(self):
        super().__init__()
        self.bil = Bilinear(3, 2, 2)

    def forward(self, x):
        return self.bil(x[..., :3], x[..., 3:])


class Net(nn.Module):
    """Linear -> tanh -> toy(h, x) -> tanh -> Linear, over any leading positions."""

    def __init__(self, d_out=3):
        super().__init__()
        self.pre, self.bil, self.out = nn.Linear(4, 3), Bilinear(3, 2, 4), nn.Linear(4, d_out)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        return self.out(torch.tanh(self.bil(h, x[..., :2])))


@pytest.fixture
def bilinear_registered():
    with registered_layer(Bilinear, BILINEAR):
        yield
    assert layer_type(Bilinear(1, 1, 1)) is None  # the registry is restored


def loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def data(model, x_shape, task, n=10):
    x = torch.randn(n, *x_shape)
    with torch.no_grad():
        f = model(x)
    if task == "classification":
        return x, torch.randint(0, f.shape[-1], f.shape[:-1]), oracle.categorical_nll
    return x, torch.randn(f.shape), oracle.gaussian_nll(0.7)


def fitted(model, task, x, y, structure, create_graph=False):
    sigma = {"sigma_noise": 0.7} if task == "regression" else {}
    la = marglik.Laplace(model, task, hessian_structure=structure, **sigma)
    return la.fit(loader(x, y), create_graph=create_graph)


POSITIONS = {"no sharing": (4,), "shared positions": (3, 4)}


# ------------------------------------------------------------------------------ the registry
def test_lookup_follows_the_mro_and_applies(bilinear_registered):
    class SubBilinear(Bilinear):
        pass

    assert layer_type(SubBilinear(2, 2, 1)) is BILINEAR  # subclasses resolve through the MRO
    assert layer_type(nn.Linear(2, 3)) is LINEAR
    assert layer_type(nn.Conv2d(2, 2, 3, groups=2)) is None  # the conv entry does not apply
    never = LayerType(bilinear_inputs, bilinear_output_grads, applies=lambda m: False)
    with registered_layer(SubBilinear, never):  # the most specific entry decides
        assert layer_type(SubBilinear(2, 2, 1)) is None and not supported(SubBilinear(2, 2, 1))
        assert layer_type(Bilinear(2, 2, 1)) is BILINEAR
    assert layer_type(SubBilinear(2, 2, 1)) is BILINEAR


def test_layer_map_owns_the_registered_parameters(bilinear_registered):
    model = Net()
    lmap = layer_map(model, select_subset(model, "all"))
    assert [rec.name for rec in lmap.layers] == ["pre", "bil", "out"]
    assert lmap.owner["bil.weight"][1] == "weight" and lmap.owner["bil.bias"][1] == "bias"
    assert lmap.owner["bil.weight"][0].kind is BILINEAR


# ------------------------------------------------------------------------------ curvature
@pytest.mark.parametrize("shape", POSITIONS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_exact_diagonal_and_full_with_a_registered_layer(bilinear_registered, task, shape):
    model = Net()
    x, y, nll = data(model, POSITIONS[shape], task)
    H = oracle.ggn(model, x, y, nll)
    diag = fitted(model, task, x, y, "diag").H
    torch.testing.assert_close(diag.diag(), H.diagonal(), rtol=1e-10, atol=1e-10)
    graph = fitted(model, task, x, y, "diag", create_graph=True).H  # hooks keep the graph
    torch.testing.assert_close(graph.diag(), H.diagonal(), rtol=1e-10, atol=1e-10)
    full = fitted(model, task, x, y, "full", create_graph=True).H  # layer gradients Σ_r b aᵀ
    torch.testing.assert_close(full.to_dense(), H, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(5,), (3, 5)], ids=["no sharing", "shared positions"])
def test_kfac_is_exact_for_a_registered_last_layer_with_gaussian_likelihood(
    bilinear_registered, shape
):
    """A single layer with a constant output Hessian: G ⊗ A is the exact GGN block
    (KFAC-expand with per-position outputs, Eschenhagen et al. 2023)."""
    model = Head()
    x, y, nll = data(model, shape, "regression")
    H = oracle.ggn(model, x, y, nll)
    blocks = fitted(model, "regression", x, y, "kron").H.blocks
    assert isinstance(blocks[0], Kronecker) and isinstance(blocks[1], Dense)
    torch.testing.assert_close(blocks[0].to_dense(), H[:12, :12], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(blocks[1].to_dense(), H[12:, 12:], rtol=1e-10, atol=1e-12)


def test_without_registration_the_layer_gets_exact_diagonal_blocks():
    model = Head()
    x, y, nll = data(model, (5,), "regression")
    assert not supported(model.bil)
    with pytest.warns(UserWarning, match=r"KFAC cannot express \['bil.weight', 'bil.bias'\]"):
        blocks = fitted(model, "regression", x, y, "kron").H.blocks
    assert len(blocks) == 1 and isinstance(blocks[0], Diagonal)
    H = oracle.ggn(model, x, y, nll)
    torch.testing.assert_close(
        blocks[0].to_dense().diagonal(), H.diagonal(), rtol=1e-10, atol=1e-12
    )


def test_a_registered_type_that_does_not_apply_is_unsupported():
    model = Net()
    x, y, nll = data(model, (4,), "classification")
    never = LayerType(bilinear_inputs, bilinear_output_grads, applies=lambda m: False)
    with registered_layer(Bilinear, never):
        assert not supported(model.bil)
        assert "bil.weight" not in layer_map(model, select_subset(model, "all")).owner
        with pytest.warns(UserWarning, match="KFAC cannot express"):
            la = fitted(model, "classification", x, y, "kron")
    kinds = [type(b) for b in la.H.blocks]  # pre: W, b; bil: one diagonal; out: W, b
    assert kinds == [Kronecker, Dense, Diagonal, Kronecker, Dense]
    H = oracle.ggn(model, x, y, nll)
    lo = model.pre.weight.numel() + model.pre.bias.numel()
    hi = lo + model.bil.weight.numel() + model.bil.bias.numel()
    torch.testing.assert_close(
        la.H.blocks[2].to_dense().diagonal(), H.diagonal()[lo:hi], rtol=1e-10, atol=1e-12
    )


def test_a_mismatched_registration_is_reported():
    wrong = LayerType(
        lambda m, args: args[0].reshape(args[0].shape[0], 1, -1),  # x1 only
        bilinear_output_grads,
    )
    model = Head()
    x, y, _ = data(model, (5,), "regression")
    with registered_layer(Bilinear, wrong), pytest.raises(ValueError, match="registered inputs"):
        fitted(model, "regression", x, y, "kron")


class SquaredLinear(nn.Linear):
    """A Linear subclass on squared inputs: out = (x²) Wᵀ + b."""

    def forward(self, x):
        return F.linear(x.square(), self.weight, self.bias)


def test_the_engine_uses_the_registry_entry_of_a_subclass():
    model = nn.Sequential(SquaredLinear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y, nll = data(model, (3,), "regression")
    H = oracle.ggn(model, x, y, nll)
    # inherited nn.Linear entry: a = x instead of x², the layer's diagonal is wrong
    inherited = fitted(model, "regression", x, y, "diag").H.diag()
    assert not torch.allclose(inherited[:12], H.diagonal()[:12], rtol=1e-3)
    squared = LayerType(lambda m, args: LINEAR.inputs(m, (args[0].square(),)), LINEAR.output_grads)
    with registered_layer(SquaredLinear, squared):
        diag = fitted(model, "regression", x, y, "diag").H.diag()
        torch.testing.assert_close(diag, H.diagonal(), rtol=1e-10, atol=1e-10)
        lone = SquaredLinear(3, 2)
        H1 = oracle.ggn(lone, x, y, nll)
        weight, bias = fitted(lone, "regression", x, y, "kron").H.blocks
        assert isinstance(weight, Kronecker)
        torch.testing.assert_close(weight.to_dense(), H1[:6, :6], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bias.to_dense(), H1[6:, 6:], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ predictive
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("shape", POSITIONS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_layerwise_predictive_with_a_registered_layer(bilinear_registered, task, shape, structure):
    model = Net()
    x, y, _ = data(model, POSITIONS[shape], task)
    la = fitted(model, task, x, y, structure)
    plan = layerwise_plan(la)
    assert plan is not None and "bil" in [rec.name for rec in plan.layers]
    assert plan.others is None  # every tensor is contracted layer-wise, none by torch.func
    xt = torch.randn(5, *POSITIONS[shape])
    J = oracle.jacobians(model, xt, la.subset.names)
    expected = J @ la.posterior_covariance @ J.mT
    f, cov = glm_moments(la, xt, backend="layerwise")
    torch.testing.assert_close(cov, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f, model(xt), rtol=0, atol=1e-12)
    _, joint = glm_moments(la, xt[:3], joint=True, backend="layerwise")
    Jj = J[:3].reshape(-1, J.shape[-1])
    torch.testing.assert_close(joint, Jj @ la.posterior_covariance @ Jj.T, rtol=1e-10, atol=1e-12)

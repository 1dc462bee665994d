"""Soft-equivariant layers ½(FC + Conv) and their per-path priors (NeurIPS 2023, issue 14).

Every check is against brute force in float64 (tests/oracle.py: dense ``torch.func`` Jacobians,
explicit GGN sums, slogdet): forwards against explicit weight matrices, KFAC blocks in the
settings where KFAC is exact (deep linear networks), exact diagonals and full GGNs otherwise,
and the evidence and its gradient in each path's prior precision.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.layers import (
    FactoredFC,
    GroupedLinear,
    SoftEquivariantConv1d,
    SoftEquivariantConv2d,
    SoftEquivariantLinear,
    equivariance_balance,
    equivariance_prior_groups,
)
from marglik.structures import Dense, Kronecker
from tests import oracle


def loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fc_matrix(fc):
    """The FC path as an explicit matrix (rows (d, y), columns (c, x)) and bias (C_out·Y,)."""
    if isinstance(fc, FactoredFC):
        U, V = fc.u.weight, fc.v.weight  # (C_out, C_in, X), (Y, C_out, C_in)
        W = V.permute(1, 0, 2)[:, :, :, None] * U[:, None, :, :]  # (d, y, c, x)
        b = (fc.v.bias.expand(fc.v.groups, -1).reshape(-1) if fc.v.bias is not None
             else torch.zeros(W.shape[0] * W.shape[1]))
        return W.reshape(W.shape[0] * W.shape[1], -1), b
    if isinstance(fc, nn.Linear):
        return fc.weight, fc.bias
    return fc.linear.weight, fc.linear.bias


CASES = {
    "2d dense": (lambda: SoftEquivariantConv2d(2, 3, (4, 5), 3, fc="dense"), (2, 4, 5)),
    "2d factored": (lambda: SoftEquivariantConv2d(2, 3, (4, 5), 3, fc="factored"), (2, 4, 5)),
    "1d dense": (lambda: SoftEquivariantConv1d(2, 3, 6, 5, fc="dense"), (2, 6)),
    "1d factored": (lambda: SoftEquivariantConv1d(2, 3, 6, 3, fc="factored"), (2, 6)),
    "linear": (lambda: SoftEquivariantLinear(7, 3), (7,)),
}


# ------------------------------------------------------------------------------ forwards
@pytest.mark.parametrize("case", CASES)
def test_forward_is_the_explicit_half_sum_of_the_paths(case):
    make, shape = CASES[case]
    layer = make()
    x = torch.randn(4, *shape)
    W, b = fc_matrix(layer.fc)
    fc = x.flatten(1) @ W.T + b
    conv = layer.conv
    if isinstance(layer, SoftEquivariantLinear):
        path = F.conv1d(x[:, None], conv.weight, conv.bias, padding=conv.padding)
    elif isinstance(conv, nn.Conv2d):
        path = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
    else:
        path = F.conv1d(x, conv.weight, conv.bias, padding=conv.padding)
    expected = 0.5 * (fc + path.flatten(1))
    torch.testing.assert_close(layer(x).flatten(1), expected, rtol=1e-12, atol=1e-12)
    assert layer.path_parameters()["fc"] and layer.path_parameters()["conv"]


def test_grouped_linear_is_a_block_diagonal_matrix():
    layer = GroupedLinear(3, 4, 2)
    x = torch.randn(5, 3, 4)
    blocks = torch.block_diag(*layer.weight.permute(1, 0, 2))  # (G·D_out, G·D_in)
    expected = x.flatten(1) @ blocks.T + layer.bias.repeat(3)
    torch.testing.assert_close(layer(x).flatten(1), expected, rtol=1e-12, atol=1e-12)


def test_the_factored_path_is_its_dense_weight():
    fc = FactoredFC((2, 3, 3), (4, 3, 3))
    x = torch.randn(3, 2, 3, 3)
    expected = x.flatten(1) @ fc.dense_weight().T + fc.v.bias.repeat(4)
    torch.testing.assert_close(fc(x).flatten(1), expected, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in fc.parameters()) == 2 * 4 * (9 + 9) + 9


# ------------------------------------------------------------------------------ KFAC exactness
class SumGroups(nn.Module):
    def forward(self, x):
        return x.sum(1)


def assert_blocks_exact(model, la, H, names):
    sl = oracle.parameter_slices(model)
    blocks = dict(zip(sl, la.H.blocks, strict=True))
    for name in names:
        block = blocks[name]
        assert isinstance(block, Kronecker if name.endswith("weight") else Dense), name
        torch.testing.assert_close(block.to_dense(), H[sl[name], sl[name]],
                                   rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_grouped_linear_kfac_is_exact_in_its_setting(approx):
    """Deep linear networks (Eschenhagen et al., NeurIPS 2023): expand — every group followed by
    the same map to its own outputs; reduce — the groups summed before the output map."""
    if approx == "expand":
        model = nn.Sequential(GroupedLinear(3, 4, 5), nn.Linear(5, 2))
    else:
        model = nn.Sequential(GroupedLinear(3, 4, 5), SumGroups(), nn.Linear(5, 2))
    x = torch.randn(8, 3, 4)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    la = marglik.Laplace(model, "regression", hessian_structure="kron", kfac_approx=approx,
                         sigma_noise=0.7).fit(loader(x, y, 3))
    H = oracle.ggn(model, x, y, oracle.gaussian_nll(0.7))
    assert_blocks_exact(model, la, H, ["0.weight", "0.bias", "1.weight" if approx == "expand"
                                       else "2.weight"])


def test_kfac_of_soft_layers_is_exact_in_a_deep_linear_network():
    """Linear network, Gaussian outputs per channel and position (flattened, so that KFAC's
    columns are the output elements): the FC paths (no sharing), the last layer's convolution
    and factored output map (one output per position: expand) get their exact GGN blocks (the
    first convolution's are KFAC-expand approximations: its positions mix downstream)."""
    model = nn.Sequential(SoftEquivariantConv2d(1, 2, (3, 3), fc="dense"),
                          SoftEquivariantConv2d(2, 2, (3, 3), fc="factored"), nn.Flatten())
    x = torch.randn(6, 1, 3, 3)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    la = marglik.Laplace(model, "regression", hessian_structure="kron",
                         sigma_noise=0.5).fit(loader(x, y, 4))
    H = oracle.ggn(model, x, y, oracle.gaussian_nll(0.5))
    exact = ["0.fc.linear.weight", "0.fc.linear.bias",
             "1.fc.v.weight", "1.fc.v.bias", "1.conv.weight", "1.conv.bias"]
    assert_blocks_exact(model, la, H, exact)
    # every tensor its own block, none dropped
    assert len(la.H.blocks) == len(oracle.parameter_slices(model))


class Net(nn.Module):
    """soft 2-D layer -> tanh -> soft linear layer -> tanh -> Linear."""

    def __init__(self, fc="factored"):
        super().__init__()
        self.soft = SoftEquivariantConv2d(1, 2, (3, 3), fc=fc)
        self.vec = SoftEquivariantLinear(18, 3)
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.vec(torch.tanh(self.soft(x)).flatten(1))))


@pytest.mark.parametrize("fc", ["dense", "factored"])
def test_diagonal_and_full_curvature_are_exact(fc):
    model = Net(fc)
    x = torch.randn(7, 1, 3, 3)
    y = torch.randint(0, 3, (7,))
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    diag = marglik.Laplace(model, "classification", hessian_structure="diag").fit(loader(x, y))
    torch.testing.assert_close(diag.H.diag(), H.diagonal(), rtol=1e-10, atol=1e-12)
    full = marglik.Laplace(model, "classification", hessian_structure="full").fit(loader(x, y))
    torch.testing.assert_close(full.H.to_dense(), H, rtol=1e-10, atol=1e-12)


def test_kfac_factors_of_a_grouped_layer_are_the_definition():
    """In a nonlinear network the weight block of a GroupedLinear is G ⊗ A with
    A = 1/(N·R) Σ_{n,g} a aᵀ (a_{n,g} = e_g ⊗ x_{n,g}) and G = Σ_{k,n,g} b bᵀ (expand)."""
    model = Net("factored")
    x = torch.randn(5, 1, 3, 3)
    y = torch.randint(0, 3, (5,))
    la = marglik.Laplace(model, "classification", hessian_structure="kron").fit(loader(x, y))
    block = dict(zip(oracle.parameter_slices(model), la.H.blocks, strict=True))["soft.fc.u.weight"]
    u = model.soft.fc.u
    xin = x.reshape(5, 1, 9)  # the u input: (N, G=C_in, X)
    a = torch.zeros(5, 1, 1, 9)
    a[:, 0, 0] = xin[:, 0]
    A = torch.einsum("ngi,ngj->ij", a.flatten(2), a.flatten(2)) / (5 * 1)

    def grads_of_u_output(xi):  # Jacobian of the outputs w.r.t. u's output
        h = u(xi.reshape(1, 1, 9))

        def rest(h):
            fc = model.soft.fc.v(h.transpose(1, 2)).reshape(1, 2, 3, 3)
            out = torch.tanh(0.5 * (fc + model.soft.conv(xi[None])))
            return model.head(torch.tanh(model.vec(out.flatten(1))))[0]

        return torch.func.jacrev(rest)(h)[:, 0]  # (C, G, D_out)

    J = torch.stack([grads_of_u_output(xi) for xi in x])  # (N, C, G, D_out)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("ncgi,ncd,ndgj->ij", J, Lam, J)
    torch.testing.assert_close(block.to_dense(), torch.kron(G, A), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ per-path priors
def test_prior_groups_are_one_per_path_and_partition_the_weights():
    model = Net()
    groups = equivariance_prior_groups(model)
    assert groups == [
        ["soft.fc.u.weight", "soft.fc.v.weight", "soft.fc.v.bias"],
        ["soft.conv.weight", "soft.conv.bias"],
        ["vec.fc.weight", "vec.fc.bias"],
        ["vec.conv.weight", "vec.conv.bias"],
        ["head.weight"], ["head.bias"],
    ]
    model.head.bias.requires_grad_(False)  # frozen tensors are not in the posterior
    assert equivariance_prior_groups(model)[-1] == ["head.weight"]


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_evidence_and_its_gradient_in_each_path_precision(structure):
    model = Net()
    x = torch.randn(9, 1, 3, 3)
    y = torch.randint(0, 3, (9,))
    groups = equivariance_prior_groups(model)
    la = marglik.Laplace(model, "classification", hessian_structure=structure,
                         prior_groups=groups).fit(loader(x, y))
    delta = torch.tensor([0.5, 2.0, 1.5, 0.3, 1.0, 4.0], requires_grad=True)
    logz = la.log_marginal_likelihood(delta)
    (grad,) = torch.autograd.grad(logz, delta)
    if structure == "full":  # the evidence itself, with explicit matrices
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        sl = oracle.parameter_slices(model)
        per_param = torch.empty_like(theta)
        for g, members in enumerate(groups):
            for name in members:
                per_param[sl[name]] = delta[g].detach()
        with torch.no_grad():
            loglik = -oracle.categorical_nll(model(x), y)
        H = oracle.ggn(model, x, y, oracle.categorical_nll)
        torch.testing.assert_close(logz.detach(), oracle.laplace_evidence(
            loglik, theta, H, per_param), rtol=1e-10, atol=1e-10)
    eps = 1e-5
    for g in range(len(groups)):
        step = torch.zeros(len(groups))
        step[g] = eps * delta[g].item()
        hi = la.log_marginal_likelihood(delta.detach() + step)
        lo = la.log_marginal_likelihood(delta.detach() - step)
        fd = (hi - lo) / (2 * step[g])
        torch.testing.assert_close(grad[g], fd, rtol=1e-6, atol=1e-9)


def test_marglik_training_learns_one_precision_per_path_and_reports_the_balance():
    torch.manual_seed(1)
    model = nn.Sequential(SoftEquivariantConv1d(1, 2, 8, 3, fc="factored"), nn.Tanh(),
                          nn.Flatten(), nn.Linear(16, 2))
    x = torch.randn(32, 1, 8)
    y = (x[:, 0, 2] > 0).long()
    groups = equivariance_prior_groups(model)
    la, model, history = marglik.marglik_training(
        model, loader(x, y, 16), "classification", prior_structure="layerwise", n_epochs=3,
        n_hypersteps=5, laplace_kwargs={"prior_groups": groups}, optimizer_kwargs={"lr": 1e-2},
    )
    assert la.prior_precision.shape == (len(groups),) and la.prior.groups == groups
    balance = equivariance_balance(model, la.prior_precision)
    (b,) = balance.values()
    d = la.prior_precision
    assert list(balance) == ["0"]
    assert (b.delta_fc, b.delta_conv) == (d[0].item(), d[1].item())
    assert b.convolutional == pytest.approx(d[0].item() / (d[0].item() + d[1].item()), rel=1e-12)
    assert not torch.allclose(d, torch.ones_like(d))  # the evidence moved them


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SoftEquivariantConv2d(1, 2, (3, 3), kernel_size=2)
    with pytest.raises(ValueError, match="fc must be one of"):
        SoftEquivariantConv2d(1, 2, (3, 3), fc="sparse-ish")
    with pytest.raises(ValueError, match="shape must have 2 entries"):
        SoftEquivariantConv2d(1, 2, 3)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        SoftEquivariantConv1d(0, 2, 5)
    with pytest.raises(ValueError, match=r"GroupedLinear expects inputs \(N, 3, 4\)"):
        GroupedLinear(3, 4, 2)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"expects inputs \(N, 1, 3, 3\)"):
        SoftEquivariantConv2d(1, 2, (3, 3))(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"SoftEquivariantLinear expects inputs \(N, 7\)"):
        SoftEquivariantLinear(7)(torch.randn(2, 6))
    with pytest.raises(ValueError, match="no SoftEquivariant layer"):
        equivariance_prior_groups(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        equivariance_prior_groups("net")
    model = Net()
    with pytest.raises(ValueError, match=r"one value per prior group \(6\)"):
        equivariance_balance(model, torch.ones(5))
    per_tensor = [[n] for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="'soft.fc' are not one prior group"):
        equivariance_balance(model, torch.ones(len(per_tensor)), per_tensor)

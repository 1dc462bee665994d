"""Soft-equivariant layers: circular padding of the conv path and the initialisations (issue 14).

The circular conv path is checked against the cyclic convolution written out with ``F.pad`` and
``torch.roll`` (exact equivariance to cyclic shifts), its curvature against brute force in
float64 (tests/oracle.py); the initialisations against their definitions (bounds, variances,
zero tensors, the ``fc_off`` layer's output ½ conv(x) and its nonzero gradient).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.layers import (
    INITS,
    PADDING_MODES,
    SoftEquivariantConv1d,
    SoftEquivariantConv2d,
    equivariance_prior_groups,
)
from tests import oracle


def loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def conv_of(layer):
    """The Conv module of a conv path (the second child of the circular Sequential)."""
    return layer.conv[-1] if isinstance(layer.conv, nn.Sequential) else layer.conv


# ------------------------------------------------------------------------------ circular padding
def test_circular_conv_path_is_the_cyclic_convolution_and_shift_equivariant():
    layer = SoftEquivariantConv2d(2, 3, (5, 6), 3, padding_mode="circular")
    conv = conv_of(layer)
    assert conv.padding == (0, 0) and conv.padding_mode == "zeros"  # what the registry handles
    x = torch.randn(4, 2, 5, 6)
    # wrap-around padding written out by indexing, independent of CircularPad2d
    rows, cols = torch.arange(-1, 6) % 5, torch.arange(-1, 7) % 6
    padded = x[:, :, rows][:, :, :, cols]
    expected = F.conv2d(padded, conv.weight, conv.bias)
    torch.testing.assert_close(layer.conv(x), expected, rtol=1e-12, atol=1e-12)
    shifted = torch.roll(x, shifts=(2, -3), dims=(2, 3))
    torch.testing.assert_close(layer.conv(shifted),
                               torch.roll(expected, shifts=(2, -3), dims=(2, 3)),
                               rtol=1e-12, atol=1e-12)
    fc = layer.fc(x)
    torch.testing.assert_close(layer(x), 0.5 * (fc + expected), rtol=1e-12, atol=1e-12)


def test_circular_1d_path_and_zero_padding_default():
    layer = SoftEquivariantConv1d(2, 3, 7, 5, padding_mode="circular")
    x = torch.randn(3, 2, 7)
    conv = conv_of(layer)
    expected = F.conv1d(x[:, :, torch.arange(-2, 9) % 7], conv.weight, conv.bias)
    torch.testing.assert_close(layer.conv(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.conv(torch.roll(x, 3, 2)), torch.roll(expected, 3, 2),
                               rtol=1e-12, atol=1e-12)
    default = SoftEquivariantConv2d(1, 2, (4, 4))
    assert isinstance(default.conv, nn.Conv2d) and default.conv.padding == (1, 1)
    assert set(PADDING_MODES) == {"zeros", "circular"}


class CircularNet(nn.Module):
    """circular soft 2-D layer -> tanh -> Linear (classification)."""

    def __init__(self):
        super().__init__()
        self.soft = SoftEquivariantConv2d(1, 2, (3, 4), fc="factored", padding_mode="circular")
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.soft(x)).flatten(1))


def test_circular_layer_diagonal_and_full_curvature_are_exact():
    model = CircularNet()
    x = torch.randn(7, 1, 3, 4)
    y = torch.randint(0, 3, (7,))
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    diag = marglik.Laplace(model, "classification", hessian_structure="diag").fit(loader(x, y))
    torch.testing.assert_close(diag.H.diag(), H.diagonal(), rtol=1e-10, atol=1e-12)
    full = marglik.Laplace(model, "classification", hessian_structure="full").fit(loader(x, y))
    torch.testing.assert_close(full.H.to_dense(), H, rtol=1e-10, atol=1e-12)


def test_circular_conv_kfac_is_exact_as_the_last_linear_layer():
    """One soft layer, Gaussian outputs per element: the circular conv's weight and bias blocks
    are its exact GGN blocks (KFAC-expand is exact for a last linear layer shared over positions
    with one output column per position and channel)."""
    model = nn.Sequential(SoftEquivariantConv2d(2, 2, (3, 3), fc="factored",
                                                padding_mode="circular"), nn.Flatten())
    x = torch.randn(6, 2, 3, 3)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    la = marglik.Laplace(model, "regression", hessian_structure="kron",
                         sigma_noise=0.5).fit(loader(x, y))
    H = oracle.ggn(model, x, y, oracle.gaussian_nll(0.5))
    start, sl = 0, {}
    for name, p in model.named_parameters():
        sl[name] = slice(start, start + p.numel())
        start += p.numel()
    blocks = dict(zip(sl, la.H.blocks, strict=True))
    for name in ("0.conv.1.weight", "0.conv.1.bias", "0.fc.v.weight", "0.fc.v.bias"):
        torch.testing.assert_close(blocks[name].to_dense(), H[sl[name], sl[name]],
                                   rtol=1e-9, atol=1e-11, msg=name)
    groups = equivariance_prior_groups(model)
    assert groups == [["0.fc.u.weight", "0.fc.v.weight", "0.fc.v.bias"],
                      ["0.conv.1.weight", "0.conv.1.bias"]]


# ------------------------------------------------------------------------------ initialisations
def test_kaiming_init_matches_its_definition():
    layer = SoftEquivariantConv2d(8, 16, (12, 12), 3, fc="factored", init="kaiming",
                                  padding_mode="circular")
    conv, u, v = conv_of(layer), layer.fc.u, layer.fc.v
    assert torch.count_nonzero(conv.bias) == 0 and torch.count_nonzero(v.bias) == 0
    # uniform with variance 2/fan_in (conv), 1/fan_in (U: X = 144, V: C_in = 8)
    for w, var in ((conv.weight, 2 / (8 * 9)), (u.weight, 1 / 144), (v.weight, 1 / 8)):
        bound = math.sqrt(3 * var)
        assert w.abs().max() <= bound
        assert w.var().item() == pytest.approx(var, rel=0.1)


def test_fc_off_layer_starts_as_half_the_convolution_and_can_switch_the_fc_path_on():
    for make in (lambda: SoftEquivariantConv2d(2, 3, (4, 5), 3, fc="factored", init="fc_off"),
                 lambda: SoftEquivariantConv2d(2, 3, (4, 5), 3, fc="dense", init="fc_off"),
                 lambda: SoftEquivariantConv1d(2, 3, 6, 3, fc="dense", init="fc_off",
                                               padding_mode="circular")):
        layer = make()
        x = torch.randn(5, *layer.fc.in_shape)
        out = layer(x)
        torch.testing.assert_close(out, 0.5 * layer.conv(x), rtol=0, atol=0)
        out.square().sum().backward()
        last = [m for m in layer.fc.modules() if isinstance(getattr(m, "weight", None),
                                                              nn.Parameter)][-1]
        assert torch.count_nonzero(last.weight) == 0
        assert last.weight.grad.abs().max() > 0  # the data can switch the FC path on
        assert torch.count_nonzero(conv_of(layer).weight) == conv_of(layer).weight.numel()
    # ½ conv(x) starts at the Kaiming scale: conv weights U(±2·√(6/fan_in)), variance 8/fan_in
    layer = SoftEquivariantConv2d(8, 16, (4, 4), 3, init="fc_off", padding_mode="circular")
    w = conv_of(layer).weight
    assert w.abs().max() <= 2 * math.sqrt(6 / 72) and w.var().item() == pytest.approx(8 / 72,
                                                                                         rel=0.1)
    assert torch.count_nonzero(conv_of(layer).bias) == 0
    assert layer.fc.u.weight.var().item() == pytest.approx(1 / 16, rel=0.1)


def test_torch_init_is_the_default_and_reset_parameters_reinitialises():
    torch.manual_seed(3)
    default = SoftEquivariantConv2d(2, 3, (4, 4), 3)
    torch.manual_seed(3)
    named = SoftEquivariantConv2d(2, 3, (4, 4), 3, init="torch")
    for a, b in zip(default.parameters(), named.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer = SoftEquivariantConv2d(2, 3, (4, 4), 3, fc="factored")
    layer.reset_parameters("fc_off")
    assert torch.count_nonzero(layer.fc.v.weight) == 0
    layer.reset_parameters("torch")
    assert layer.fc.v.weight.abs().max() <= 1 / math.sqrt(2)  # U(±1/√fan_in), fan_in = C_in
    assert torch.count_nonzero(layer.fc.v.weight) == layer.fc.v.weight.numel()
    assert set(INITS) == {"torch", "kaiming", "fc_off"}


def test_bad_padding_and_init_are_named():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        SoftEquivariantConv2d(1, 2, (3, 3), padding_mode="reflect")
    with pytest.raises(ValueError, match="init must be one of"):
        SoftEquivariantConv1d(1, 2, 5, init="xavier")
    with pytest.raises(ValueError, match="init must be one of"):
        SoftEquivariantConv2d(1, 2, (3, 3)).reset_parameters("zeros")

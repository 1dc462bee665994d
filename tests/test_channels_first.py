"""KFAC warns when a model returns a convolution's channels-first output as it is: the likelihood
takes the last dimension as the outputs, so the KFAC blocks would not be the exact GGN's."""

import warnings

import pytest
import torch
from torch import nn

import marglik


class Net(nn.Module):
    def __init__(self, channels_last: bool):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.channels_last = channels_last

    def forward(self, x):
        out = self.c2(torch.tanh(self.c1(x)))
        return out.movedim(1, -1) if self.channels_last else out


def fit(model, structure, y):
    x = torch.randn(8, 2, 6, 6)
    la = marglik.Laplace(model, "regression", hessian_structure=structure)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit([(x, y)])
    return [str(w.message) for w in caught if "channels-first" in str(w.message)]


def test_channels_first_conv_output_warns_for_kfac():
    messages = fit(Net(channels_last=False), "kron", torch.randn(8, 3, 6, 6))
    assert len(messages) == 1
    assert "'c2'" in messages[0] and "movedim(1, -1)" in messages[0]


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_exact_structures_do_not_warn(structure):
    assert fit(Net(channels_last=False), structure, torch.randn(8, 3, 6, 6)) == []


def test_channels_last_output_does_not_warn():
    assert fit(Net(channels_last=True), "kron", torch.randn(8, 6, 6, 3)) == []


def test_flattened_linear_head_does_not_warn():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    assert fit(model, "kron", torch.randn(8, 3)) == []

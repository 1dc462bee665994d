"""Convolutions with ``padding_mode`` "circular", "reflect" or "replicate" are registered layers:
their patches are taken from the input padded as the module pads it. Checked against the
brute-force GGN (tests/oracle.py, float64): KFAC-expand blocks where KFAC is exact (a last conv
layer, Gaussian outputs per element), the exact diagonal and full GGN of a deeper net."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from tests import oracle

MODES = ["circular", "reflect", "replicate"]


def conv(dims, mode, c_in=2, c_out=3):
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, c_out, 3, padding=1, padding_mode=mode)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_last_conv_kfac_blocks_are_exact(mode, dims):
    model = nn.Sequential(conv(dims, mode), nn.Flatten())
    x = torch.randn(5, 2, *((4, 5) if dims == 2 else (6,)))
    with torch.no_grad():
        y = torch.randn_like(model(x))
    la = marglik.Laplace(model, "regression", hessian_structure="kron", sigma_noise=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    # a registered layer, not a diagonal fallback block
    assert not [w for w in caught if "cannot express" in str(w.message)]
    H = oracle.ggn(model, x, y, oracle.gaussian_nll(0.5))
    for (name, sl), block in zip(oracle.parameter_slices(model).items(), la.H.blocks, strict=True):
        torch.testing.assert_close(block.to_dense(), H[sl, sl], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_deeper_net_diagonal_and_full_ggn_are_exact(mode):
    model = nn.Sequential(conv(2, mode), nn.Tanh(), conv(2, mode, 3, 2), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(6, 2, 4, 4)
    y = torch.randint(0, 3, (6,))
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    diag = marglik.Laplace(model, "classification", hessian_structure="diag").fit(loader)
    torch.testing.assert_close(diag.H.diag(), H.diagonal(), rtol=1e-10, atol=1e-12)
    full = marglik.Laplace(model, "classification", hessian_structure="full").fit(loader)
    torch.testing.assert_close(full.H.to_dense(), H, rtol=1e-10, atol=1e-12)


"""The reference toy of methods.md §1: post-hoc evidence maximisation recovers the noise level."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik


def test_sinusoid_toy_recovers_noise_and_prior_with_full_ggn():
    torch.manual_seed(711)
    x = 8 * torch.rand(150, 1)
    y = torch.sin(x) + 0.3 * torch.randn(150, 1)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1000):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    la = marglik.Laplace(model, "regression", hessian_structure="full")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=50))
    history = la.optimize_prior_precision(method="marglik", tune_sigma=True, n_steps=1000,
                                          lr=0.05)
    # methods.md §1 (laplace-torch's evidence at θ*): σ ≈ 0.28 (true 0.3) and δ ≈ 0.10
    assert 0.27 < la.sigma_noise.item() < 0.32
    assert 0.05 < la.prior_precision.item() < 0.2
    assert history["log_marglik"][-1] > history["log_marglik"][0] + 10
    # the default, the tangent evidence over rescalings of the weight tensors, recovers σ too
    # (on the Euler ray alone, which a tanh network's outputs are not on, it gave σ = 0.37)
    la.optimize_prior_precision(tune_sigma=True)
    assert 0.27 < la.sigma_noise.item() < 0.32

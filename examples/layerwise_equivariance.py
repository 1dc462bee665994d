"""Layer-wise equivariance learned by the evidence (van der Ouderaa, Immer & van der Wilk, 2023).

Every layer is ½(fully-connected path + convolutional path) (``marglik.layers``), each path with
its own prior precision learned online by the Laplace evidence (``marglik_training``,
``prior_structure="layerwise"`` with one prior group per path). Two regression tasks on random
1-D signals x (N, 1, 16), both with targets of shape (N, 1, 16):

- *equivariant*: y = a fixed local filter of x (y_i = x_{i−1} − 2 x_i + x_{i+1}, zero padding),
  translation-equivariant: the evidence should switch the FC paths off (convolutional → 1);
- *position-dependent*: y = x reversed (y_i = x_{15−i}), which no convolution computes: the
  evidence should keep the FC paths (convolutional share well below 1 in some layer).

The learned balance per layer is printed (:func:`marglik.layers.equivariance_balance`).

Run: ``PYTHONPATH=src python examples/layerwise_equivariance.py`` (about a minute on one core).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.layers import SoftEquivariantConv1d, equivariance_balance, equivariance_prior_groups

LENGTH = 16


def make_data(task: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 1, LENGTH, generator=generator)
    if task == "equivariant":
        y = F.conv1d(x, torch.tensor([[[1.0, -2.0, 1.0]]]), padding=1)
    else:
        y = x.flip(-1)
    return x, (y + 0.05 * torch.randn(y.shape, generator=generator)).flatten(1)


def make_model() -> nn.Module:
    return nn.Sequential(
        SoftEquivariantConv1d(1, 4, LENGTH, kernel_size=3, fc="dense"), nn.Tanh(),
        SoftEquivariantConv1d(4, 1, LENGTH, kernel_size=3, fc="dense"), nn.Flatten(),
    )


def run(task: str, seed: int = 0) -> dict[str, marglik.layers.PathBalance]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = make_data(task, 256, generator)
    model = make_model()
    groups = equivariance_prior_groups(model)
    la, model, history = marglik.marglik_training(
        model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), "regression",
        hessian_structure="kron", prior_structure="layerwise", n_epochs=400,
        n_epochs_burnin=20, marglik_frequency=5, n_hypersteps=50,
        optimizer_kwargs={"lr": 1e-2}, laplace_kwargs={"prior_groups": groups},
    )
    x_test, y_test = make_data(task, 512, generator)
    with torch.no_grad():
        mse = (model(x_test) - y_test).square().mean().item()
    evidence = max(v for v in history["log_marglik"] if v == v)  # NaN: epochs not evaluated
    print(f"\n{task}: log evidence {evidence:.1f}, test MSE {mse:.4f}, "
          f"sigma {la.sigma_noise.item():.3f}")
    balance = equivariance_balance(model, la.prior_precision)
    for name, b in balance.items():
        print(f"  layer {name}: delta_fc {b.delta_fc:10.3g}  delta_conv {b.delta_conv:8.3g}  "
              f"convolutional {b.convolutional:.3f}")
    return balance


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    for task in ("equivariant", "position-dependent"):
        run(task)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""Cost of fitting curvature, as a ratio to one training epoch of the same model (JSON lines).

    python benchmarks/fit.py [--repeats 5] [--tile 1]

Models on sklearn digits (1,257 training images): MLP 64-256-256-10 (85k parameters) and CNN
Conv(1→16,3)-ReLU-Conv(16→32,3)-ReLU-MaxPool(2)-Linear(512→10) (10k parameters), float32, batch
size 128, one thread. The reference in the same run is one epoch of Adam training (forward +
backward + step) with the same batches: the closer a fit's ratio is to 1, the closer to the limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


def epoch(model: nn.Module, loader: DataLoader) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tile", type=int, default=1, help="repeat the training set this many times"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, _, _ = load_digits_split()
    x, y = x.repeat(args.tile, 1, 1, 1), y.repeat(args.tile)
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    for name, make in (("mlp", mlp), ("cnn", cnn)):
        model = make()
        n_params = sum(p.numel() for p in model.parameters())
        t_epoch = median_time(lambda model=model: epoch(model, loader), args.repeats)
        cases = [("kron", "expand"), ("diag", "expand")] + (
            [("kron", "reduce")] if name == "cnn" else []
        )
        for structure, approx in cases:

            def fit(model=model, structure=structure, approx=approx):
                marglik.Laplace(
                    model, "classification", hessian_structure=structure, kfac_approx=approx
                ).fit(loader)

            t_fit = median_time(fit, args.repeats)
            print(
                json.dumps(
                    {
                        "model": name,
                        "params": n_params,
                        "n": len(x),
                        "structure": structure,
                        "kfac_approx": approx if structure == "kron" else None,
                        "fit_s": round(t_fit, 4),
                        "epoch_s": round(t_epoch, 4),
                        "fit_over_epoch": round(t_fit / t_epoch, 2),
                        "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                    }
                )
            )


if __name__ == "__main__":
    main()

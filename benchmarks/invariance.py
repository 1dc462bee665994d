"""Learned invariances on MNIST by the evidence (LILA, NeurIPS 2022; issue 13): JSON lines.

    python benchmarks/invariance.py [--datasets mnist rotated translated] [--sizes 1000 5000]
        [--nets cnn mlp] [--methods none fixed augerino lila] [--S 8] [--epochs 16]
        [--lr-eta 0.3] [--seeds 0 1 2] [--workers 2] [--out benchmarks/invariance-results.jsonl]
    python benchmarks/invariance.py --preset issue --seeds 0 1 2 --workers 2 --out FILE
    python benchmarks/invariance.py --report FILE [--plot benchmarks/figures/invariance_eta.png]

``--preset issue`` runs the grid issue 13's targets need (:func:`issue_cells`) in place of
``--datasets/--sizes/--nets/--methods``. ``--workers`` processes of one thread each run the
cells, the dearest first; each record is appended to ``--out`` as its cell ends, and a last
line gives the wall time of the whole grid (``--resume``: only the cells ``--out`` lacks).
``--report`` (``benchmarks/invariance_report.py``) prints mean ± s.e. over the seeds, the
targets per seed and the wall time, and plots η.

Data (``marglik.data.mnist.load_mnist()``): the first N images of a seeded permutation of the
training split and the first ``--n-test`` test images, each transformed once with its own
random draw (the same for every method):

- ``mnist``: upright;
- ``rotated``: rotated by U[−π, π] (full rotation), training and test;
- ``translated``: shifted by U[−0.3, 0.3] half-images (±4.2 px) in x and y, training and test.

Nets (float32): ``cnn`` Conv(1→8, 5, stride 2, pad 2)-ReLU-Conv(8→16, 5, stride 2, pad 2)-ReLU-
Linear(784→10) (6,234 parameters); ``mlp`` 784-200-ReLU-10 (159,010 parameters). Batch 100,
Adam lr 3e-3 on θ for ``--epochs`` epochs (default :data:`EPOCHS`, its reason there), the same
for every method. Methods, all models averaged over S copies
(:class:`marglik.layers.AugmentedModel`) except ``none``:

- ``none``: the plain network (S = 1), δ learned by the KFAC evidence online
  (``marglik_training``, layer-wise prior, evidence every epoch, 20 hyper-steps);
- ``fixed``: full rotation, η_rotate = π frozen (same δ learning);
- ``augerino``: η of all six affine generators by the training loss − 0.01‖η‖₂
  (``train_augerino``, η's lr 1e-2, δ = 1 fixed);
- ``lila``: η of all six generators by the evidence (``hyper_gradient="jvp"``,
  ``hyper_batches=--hyper-batches``, η's Adam lr ``--lr-eta`` (default :data:`LR_ETA`),
  KFAC-reduce), δ as ``none``.
  η starts at 1 rad (rotation) and 0.1 (the others).

Each line: test accuracy and NLL of the MAP averaged network (softmax of the mean logits over
the S fixed nodes of eval mode), η of the evaluated model (``eta``: the best-evidence state that
``marglik_training`` restores) and η per generator after every epoch, wall time of θ's pass per
epoch (``fixed``: plain training with the same S, the cost reference) and of the evidence work.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from invariance_report import report  # benchmarks/invariance_report.py
from provenance import commit  # benchmarks/provenance.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik import metrics
from marglik.data.mnist import load_mnist
from marglik.layers import (
    GENERATOR_NAMES,
    AffineAugmentation,
    AugmentedModel,
    fixed_augmentation,
    no_augmentation,
)
from marglik.layers.augmentation import affine_matrices, lie_algebra, warp
from marglik.training.augerino import train_augerino

INIT = {"rotate": 1.0, "translate_x": 0.1, "translate_y": 0.1, "scale_x": 0.1, "scale_y": 0.1,
        "shear": 0.1}
#: η's budget, one setting for every dataset, size and net (chosen by η's step size, not by
#: accuracy): one evidence update per epoch after the burn-in epoch, and one Adam update moves η
#: by at most about its learning rate, so after U = EPOCHS − 1 updates η lies within
#: INIT ± LR_ETA·U. That reach must cover the way from the initial 1 rad to either end of the
#: rotation range [0, π] twice over, since Adam's steps fall to about half the learning rate
#: once the gradient shrinks (seen in the one-seed 16-epoch run): LR_ETA·(EPOCHS − 1) ≥
#: 2(π − 1) ≈ 4.3. The previous 0.2 × 7 updates (8 epochs) capped the extent at 2.4 rad.
EPOCHS = 16
LR_ETA = 0.3


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))


NETS = {"cnn": cnn, "mlp": mlp}


def transform(x: torch.Tensor, dataset: str, generator: torch.Generator) -> torch.Tensor:
    """Each image once by its own draw: rotation U[−π, π] or translation U[−0.3, 0.3]²."""
    if dataset == "mnist":
        return x
    names, eta = (("rotate",), [math.pi]) if dataset == "rotated" else (
        ("translate_x", "translate_y"), [0.3, 0.3])
    eps = 2 * torch.rand(len(x), len(names), generator=generator) - 1
    G = lie_algebra(names, 28, 28, x.dtype)
    return warp(x, affine_matrices(eps, torch.tensor(eta, dtype=x.dtype), G))


def data(dataset: str, n: int, n_test: int, seed: int):
    splits = load_mnist()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.x_train), generator=g)[:n]
    x, y = transform(splits.x_train[idx], dataset, g), splits.y_train[idx]
    xt, yt = transform(splits.x_test[:n_test], dataset, g), splits.y_test[:n_test]
    return x, y, xt, yt


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(c) for c in x.split(500)])
    probs = torch.softmax(logits, -1)
    return {"test_acc": float(metrics.accuracy(probs, y)), "test_nll": float(metrics.nll(probs, y))}


def build(method: str, net: nn.Module, S: int) -> AugmentedModel:
    if method == "none":
        return no_augmentation(net)
    if method == "fixed":
        return fixed_augmentation(net, ("rotate",), n_samples=S)
    return AugmentedModel(net, AffineAugmentation(GENERATOR_NAMES,
                                                  [INIT[g] for g in GENERATOR_NAMES]), S)


def run(args: argparse.Namespace, dataset: str, n: int, net_name: str, method: str,
        seed: int) -> dict:
    """One cell: train, evaluate, and the JSON record (η per epoch, timings, load, commit)."""
    load_start, cpu = os.getloadavg()[0], time.process_time()
    torch.manual_seed(seed)
    x, y, xt, yt = data(dataset, n, args.n_test, seed)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=g)
    model = build(method, NETS[net_name](), args.S)
    epochs: list[dict] = []
    clock = {"last": time.perf_counter()}

    def record(epoch, model, la, history) -> None:
        now = time.perf_counter()
        hyper = history["hyper_seconds"][-1] if "hyper_seconds" in history else 0.0
        eta = model.augmentation.eta.detach().abs().tolist()
        epochs.append({"epoch": epoch, "seconds": now - clock["last"], "hyper_seconds": hyper,
                       "eta": dict(zip(model.augmentation.generators, eta))})
        clock["last"] = now

    tic = time.perf_counter()
    if method == "augerino":
        history = train_augerino(model, loader, "classification", model.hyperparameters(),
                                 n_epochs=args.epochs, lr=args.lr, lr_aug=1e-2, strength=0.01,
                                 prior_precision=1.0)
        seconds = (time.perf_counter() - tic) / args.epochs
        for epoch, values in enumerate(history["hyperparameters"]):
            eta = [abs(v) for v in values[0]]
            epochs.append({"epoch": epoch, "seconds": seconds, "hyper_seconds": 0.0,
                           "eta": dict(zip(model.augmentation.generators, eta))})
    else:
        kw = {}
        if method == "lila":
            kw = dict(hyperparameters=model.hyperparameters(), hyper_gradient="jvp",
                      hyper_batches=args.hyper_batches, lr_hyperparameters=args.lr_eta)
        marglik.marglik_training(
            model, loader, "classification", hessian_structure="kron", n_epochs=args.epochs,
            lr=args.lr, n_hypersteps=20, marglik_frequency=1, n_epochs_burnin=args.burnin,
            laplace_kwargs={"kfac_approx": "reduce"}, callback=record, **kw)
    total = time.perf_counter() - tic
    # marglik_training restores the best-evidence state: η of the evaluated model
    final = dict(zip(model.augmentation.generators,
                     model.augmentation.eta.detach().abs().tolist()))
    return {"dataset": dataset, "n_train": n, "net": net_name, "method": method,
            "S": 1 if method == "none" else args.S, "epochs": args.epochs, "seed": seed,
            "lr_eta": args.lr_eta if method == "lila" else None,
            **evaluate(model, xt, yt), "eta": final, "eta_last_epoch": epochs[-1]["eta"],
            "eta_per_epoch": [e["eta"] for e in epochs],
            "epoch_seconds": sum(e["seconds"] - e["hyper_seconds"] for e in epochs) / len(epochs),
            "hyper_seconds": sum(e["hyper_seconds"] for e in epochs) / len(epochs),
            "total_seconds": total, "cpu_seconds": time.process_time() - cpu,
            "load_start": load_start, "load": os.getloadavg()[0], "commit": args.commit}


METHODS = ("none", "fixed", "augerino", "lila")
DATASETS = ("mnist", "rotated", "translated")
#: relative cost of a cell per training point (measured s/epoch ratios of the one-seed grid)
COST = {("mlp", "none"): 1, ("mlp", "fixed"): 4, ("mlp", "augerino"): 3, ("mlp", "lila"): 5,
        ("cnn", "none"): 2, ("cnn", "fixed"): 8, ("cnn", "augerino"): 4, ("cnn", "lila"): 14}


def issue_cells(seeds: list[int]) -> list[tuple]:
    """The grid issue 13's targets need: MNIST / rotated / translated at 1,000 and 5,000 points,
    the MLP with all four methods and the CNN (1,000 points) with none and LILA, every seed;
    plus rotated MNIST at 20,000 points (MLP, none and LILA, the first seed)."""
    cells = [(d, n, "mlp", m, s) for s in seeds for d in DATASETS for n in (1000, 5000)
             for m in METHODS]
    cells += [(d, 1000, "cnn", m, s) for s in seeds for d in DATASETS for m in ("none", "lila")]
    cells += [("rotated", 20000, "mlp", m, seeds[0]) for m in ("none", "lila")]
    return cells


PRESETS = {"issue": issue_cells}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_cell(args: argparse.Namespace, cell: tuple) -> dict:
    return run(args, *cell)


def run_cells(args: argparse.Namespace, cells: list[tuple]) -> None:
    """All cells on ``args.workers`` processes of one thread each, the dearest first (so the
    last to finish are short); each record is printed and appended to ``args.out`` as it ends,
    then one line with the preset's wall time."""
    cells = sorted(cells, key=lambda c: -c[1] * COST[(c[2], c[3])])
    load_start, tic = os.getloadavg()[0], time.perf_counter()

    cpu = []

    def emit(record: dict) -> None:
        cpu.append(record.get("cpu_seconds", 0.0))
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if args.workers == 1:
        for cell in cells:
            emit(run(args, *cell))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = [pool.submit(_run_cell, args, cell) for cell in cells]
            for future in as_completed(futures):
                emit(future.result())
    emit({"preset": args.preset, "cells": len(cells), "workers": args.workers,
          "epochs": args.epochs, "S": args.S, "lr_eta": args.lr_eta,
          "wall_seconds": time.perf_counter() - tic, "cpu_seconds": sum(cpu),
          "cpu_count": os.cpu_count(),
          "load_start": load_start, "load": os.getloadavg()[0], "commit": args.commit})


def pending(cells: list[tuple], path: str, epochs: int, S: int, lr_eta: float) -> list[tuple]:
    """The cells (data, N, net, method, seed) that the JSON lines at ``path`` lack with these
    epochs, S (1 for ``none``) and η learning rate (LILA only)."""
    done = set()
    for line in open(path):
        r = json.loads(line) if line.strip() else {}
        if ("dataset" in r and r["epochs"] == epochs and r["S"] == (1 if r["method"] == "none"
                                                                    else S)
                and r.get("lr_eta") == (lr_eta if r["method"] == "lila" else None)):
            done.add((r["dataset"], r["n_train"], r["net"], r["method"], r["seed"]))
    return [c for c in cells if c not in done]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named grid (overrides --datasets/--sizes/--nets/--methods)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000])
    p.add_argument("--nets", nargs="+", default=["cnn", "mlp"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--S", type=int, default=8)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--burnin", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-eta", type=float, default=LR_ETA)
    p.add_argument("--hyper-batches", type=int, default=3)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true",
                   help="skip the cells --out already holds with these epochs, S and η lr")
    p.add_argument("--report", default=None, help="print the tables of a results file")
    p.add_argument("--plot", default=None, help="with --report: the η plot (png)")
    args = p.parse_args()
    args.commit = commit()  # the HEAD at the start (the code the workers import)
    torch.set_num_threads(1)
    if args.report:
        report(args.report, args.plot)
        return
    bad = [m for m in args.methods if m not in METHODS] + [
        d for d in args.datasets if d not in DATASETS] + [m for m in args.nets if m not in NETS]
    if bad or args.workers < 1:
        p.error(f"unknown datasets / nets / methods {bad} or workers < 1")
    if args.preset:
        cells = PRESETS[args.preset](args.seeds)
    else:
        cells = [(d, n, net, m, s) for s in args.seeds for d in args.datasets
                 for n in args.sizes for net in args.nets for m in args.methods]
    if args.resume and args.out and os.path.exists(args.out):
        cells = pending(cells, args.out, args.epochs, args.S, args.lr_eta)
    run_cells(args, cells)


if __name__ == "__main__":
    main()

"""Learned invariances on MNIST by the evidence (LILA, NeurIPS 2022; issue 13): JSON lines.

    python benchmarks/invariance.py [--datasets mnist rotated translated] [--sizes 1000 5000]
        [--nets cnn mlp] [--methods none fixed augerino lila] [--S 8] [--epochs 20]
        [--seed 0] [--out benchmarks/invariance-results.jsonl]
    python benchmarks/invariance.py --report benchmarks/invariance-results.jsonl
        [--plot benchmarks/figures/invariance_eta.png]

Data (``marglik.data.mnist.load_mnist()``): the first N images of a seeded permutation of the
training split and the first ``--n-test`` test images, each transformed once with its own
random draw (the same for every method):

- ``mnist``: upright;
- ``rotated``: rotated by U[−π, π] (full rotation), training and test;
- ``translated``: shifted by U[−0.3, 0.3] half-images (±4.2 px) in x and y, training and test.

Nets (float32): ``cnn`` Conv(1→8, 5, stride 2, pad 2)-ReLU-Conv(8→16, 5, stride 2, pad 2)-ReLU-
Linear(784→10) (6,234 parameters); ``mlp`` 784-200-ReLU-10 (159,010 parameters). Batch 100,
Adam lr 3e-3 on θ for ``--epochs`` epochs. Methods, all models averaged over S copies
(:class:`marglik.layers.AugmentedModel`) except ``none``:

- ``none``: the plain network (S = 1), δ learned by the KFAC evidence online
  (``marglik_training``, layer-wise prior, evidence every epoch, 20 hyper-steps);
- ``fixed``: full rotation, η_rotate = π frozen (same δ learning);
- ``augerino``: η of all six affine generators by the training loss − 0.01‖η‖₂
  (``train_augerino``, η's lr 1e-2, δ = 1 fixed);
- ``lila``: η of all six generators by the evidence (``hyper_gradient="jvp"``,
  ``hyper_batches=--hyper-batches``, η's Adam lr ``--lr-eta``, KFAC-reduce), δ as ``none``.
  η starts at 1 rad (rotation) and 0.1 (the others).

Each line: test accuracy and NLL of the MAP averaged network (softmax of the mean logits over
the S fixed nodes of eval mode), η per generator after every epoch, wall time of θ's pass per
epoch (``fixed``: plain training with the same S, the cost reference) and of the evidence work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
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


def run(args, dataset: str, n: int, net_name: str, method: str) -> dict:
    torch.manual_seed(args.seed)
    x, y, xt, yt = data(dataset, n, args.n_test, args.seed)
    g = torch.Generator().manual_seed(args.seed)
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
    out = {"dataset": dataset, "n_train": n, "net": net_name, "method": method,
           "S": 1 if method == "none" else args.S, "epochs": args.epochs, "seed": args.seed,
           **evaluate(model, xt, yt), "eta": epochs[-1]["eta"],
           "eta_per_epoch": [e["eta"] for e in epochs],
           "epoch_seconds": sum(e["seconds"] - e["hyper_seconds"] for e in epochs) / len(epochs),
           "hyper_seconds": sum(e["hyper_seconds"] for e in epochs) / len(epochs),
           "total_seconds": total, "load": os.getloadavg()[0], "commit": commit()}
    return out


def report(path: str, plot: str | None) -> None:
    """Markdown tables (accuracy, NLL, learned extents, cost) and the η-over-training plot."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| data | N | net | method | S | test acc | test NLL | rotate | translate x / y | "
          "scale x / y | shear | θ s/epoch | evidence s/epoch |")
    print("|" + "---|" * 13)
    for r in rows:
        e = r["eta"]

        def get(k, e=e):
            return f"{e[k]:.2f}" if k in e else "–"
        print(f"| {r['dataset']} | {r['n_train']} | {r['net']} | {r['method']} | {r['S']} | "
              f"{r['test_acc']:.4f} | {r['test_nll']:.3f} | {get('rotate')} | "
              f"{get('translate_x')} / {get('translate_y')} | {get('scale_x')} / "
              f"{get('scale_y')} | {get('shear')} | {r['epoch_seconds']:.2f} | "
              f"{r['hyper_seconds']:.2f} |")
    lila = [r for r in rows if r["method"] == "lila"]
    if plot is None or not lila:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, len(lila))
    rows_ = -(-len(lila) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.8 * rows_), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(lila):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, lila):
        for name in GENERATOR_NAMES:
            ax.plot([e[name] for e in r["eta_per_epoch"]], label=name)
        ax.axhline(math.pi, color="grey", lw=0.5, ls="--")
        ax.set_title(f"{r['dataset']}, {r['n_train']}, {r['net']}", fontsize=9)
        ax.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel("learned extent |η|")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"wrote {plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "rotated", "translated"])
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000])
    p.add_argument("--nets", nargs="+", default=["cnn", "mlp"])
    p.add_argument("--methods", nargs="+", default=["none", "fixed", "augerino", "lila"])
    p.add_argument("--S", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--burnin", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-eta", type=float, default=0.2)
    p.add_argument("--hyper-batches", type=int, default=3)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="print the tables of a results file")
    p.add_argument("--plot", default=None, help="with --report: the η plot (png)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report(args.report, args.plot)
        return
    for dataset in args.datasets:
        for n in args.sizes:
            for net in args.nets:
                for method in args.methods:
                    line = json.dumps(run(args, dataset, n, net, method))
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(line + "\n")


if __name__ == "__main__":
    main()

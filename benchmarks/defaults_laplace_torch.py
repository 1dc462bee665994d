"""Each library at its defaults on networks trained as users train them (issue 18), side by side.

    lt-venv/bin/python benchmarks/defaults_laplace_torch.py [--splits 0 1 2 3] > FILE.jsonl

Run with laplace-torch's virtualenv (``benchmarks/README.md``). The networks are those of
``docs/calibration_experiments.py users`` (MLP 64-64-64-10 ReLU, plain ``torch.optim.Adam``,
lr 1e-3, weight decay 0 / 1e-4 / 1e-3, batch 64, 100 epochs, four digits splits). On each, every
library as a user ports code between them, with every argument at its default:
``Laplace(model, "classification")``, ``fit`` on the same unshuffled loader (batch 256),
``optimize_prior_precision()``, ``la(x)`` — laplace-torch 0.3's defaults are last-layer KFAC and
the evidence at θ* (``method="marglik"``); marglik's are all-weights KFAC and the tangent
evidence. Also the all-weights KFAC posterior of each library (``subset_of_weights="all"``,
``hessian_structure="kron"``, other arguments at their defaults). One JSON line per (weight
decay, split, row): test NLL, ECE, accuracy, seconds for fit + tuning; then a Markdown table of
the means over the splits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik import metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
from calibration_experiments import user_model  # noqa: E402

ROWS = {  # name -> (library, Laplace keyword arguments)
    "marglik default": ("marglik", {}),
    "laplace-torch default": ("laplace-torch", {}),
    "marglik all-weights KFAC": ("marglik", {"subset_of_weights": "all",
                                             "hessian_structure": "kron"}),
    "laplace-torch all-weights KFAC": ("laplace-torch", {"subset_of_weights": "all",
                                                         "hessian_structure": "kron"}),
}


def posterior(library: str, kwargs: dict, model, train) -> tuple[object, float]:
    """Laplace(model, "classification", **kwargs), fit, optimize_prior_precision() at defaults."""
    import laplace

    build = marglik.Laplace if library == "marglik" else laplace.Laplace
    start = time.perf_counter()
    la = build(model, "classification", **kwargs)
    la.fit(DataLoader(TensorDataset(*train), batch_size=256))
    la.optimize_prior_precision()
    return la, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 1e-4, 1e-3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results: dict[tuple[float, str], list[dict]] = {}
    for wd in args.weight_decays:
        for split in args.splits:
            model, train, (Xte, yte) = user_model(split, wd)
            with torch.no_grad():
                probs = {"MAP": (torch.softmax(model(Xte), -1), 0.0)}
            for name, (library, kwargs) in ROWS.items():
                la, seconds = posterior(library, kwargs, model, train)
                with torch.no_grad():
                    probs[name] = (la(Xte), seconds)
            for name, (p, seconds) in probs.items():
                line = {"weight_decay": wd, "split": split, "row": name,
                        "nll": float(metrics.nll(p, yte)), "ece": float(metrics.ece(p, yte)),
                        "acc": float(metrics.accuracy(p, yte)), "seconds": round(seconds, 2),
                        "load_1min": round(__import__("os").getloadavg()[0], 2)}
                results.setdefault((wd, name), []).append(line)
                print(json.dumps(line), flush=True)
    print("\n| weight decay | row | mean NLL | mean ECE | mean accuracy | splits |")
    print("|---|---|---|---|---|---|")
    for (wd, name), lines in results.items():
        mean = {k: statistics.mean(x[k] for x in lines) for k in ("nll", "ece", "acc")}
        print(f"| {wd:g} | {name} | {mean['nll']:.4f} | {mean['ece']:.4f} | {mean['acc']:.4f} "
              f"| {len(lines)} |")


if __name__ == "__main__":
    main()

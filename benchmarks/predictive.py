"""GLM-probit predictive on sklearn digits: time and peak memory, layer-wise vs generic path.

Not a test; one JSON line per case. Setting (docs/architecture.md §5): 540 test digits, an MLP
64-256-256-10 (85k parameters) and a CNN Conv(1→16,3,p1)-ReLU-Conv(16→32,3,p1)-ReLU-MaxPool(2)-
Flatten-Linear(512→10) (10k parameters), both briefly trained (full-batch Adam, seed 0), KFAC
(or ``--structure full``: the full GGN, a dense P×P block, factorised by Cholesky in the
predictive) over all weights (or ``--subset last_layer``) fitted on the 1,257 training digits,
float32, one thread. Each measurement runs
in a fresh subprocess that loads the saved model and posterior, so the peak resident memory of the
predictive call (``ru_maxrss`` after the call minus the resident memory just before it) is not
hidden by the training and fitting peaks.

    python benchmarks/predictive.py            # all cases
    python benchmarks/predictive.py --models mlp --backends layerwise
    python benchmarks/predictive.py --models cnn --structure full --backends layerwise
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split
from marglik.predictive import predict

TRAIN_STEPS = {"mlp": 300, "cnn": 300}


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                             nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10),
    )


def laplace(model: nn.Module, setting: str) -> marglik.Laplace:
    """``setting``: "<structure>:<subset>", e.g. "kron:all"."""
    structure, subset = setting.split(":")
    return marglik.Laplace(model, "classification", subset_of_weights=subset,
                           hessian_structure=structure)


def prepare(name: str, folder: str, setting: str) -> dict:
    """Train briefly, fit KFAC, tune δ by the evidence; save model and posterior."""
    torch.manual_seed(0)
    x, y, xt, yt = load_digits_split()
    model = make_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(TRAIN_STEPS[name]):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    la = laplace(model, setting)
    t0 = time.perf_counter()
    la.fit(DataLoader(TensorDataset(x, y), batch_size=256))
    fit_s = time.perf_counter() - t0
    la.optimize_prior_precision(method="marglik", n_steps=100)
    torch.save(model.state_dict(), os.path.join(folder, f"{name}_model.pt"))
    torch.save(la.state_dict(), os.path.join(folder, f"{name}_laplace.pt"))
    with torch.no_grad():
        logits = model(xt)
    return {
        "model": name, "setting": setting, "params": la.n_params, "train_steps": TRAIN_STEPS[name],
        "train_s": round(train_s, 2), "fit_s": round(fit_s, 2),
        "prior_precision": round(float(la.prior_precision), 4),
        "map_nll": round(nn.functional.cross_entropy(logits, yt).item(), 4),
        "map_acc": round((logits.argmax(-1) == yt).double().mean().item(), 4),
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, backend: str, folder: str, setting: str) -> dict:
    """Time and peak memory of the first predictive call (cold: includes the eigendecompositions
    of the Kronecker factors, or the Cholesky factor of a dense block), then the time of a second
    (warm) call, which reuses them."""
    _, _, xt, yt = load_digits_split()
    model = make_model(name)
    model.load_state_dict(torch.load(os.path.join(folder, f"{name}_model.pt"), weights_only=True))
    la = laplace(model, setting)
    la.load_state_dict(torch.load(os.path.join(folder, f"{name}_laplace.pt"), weights_only=True))
    before = rss_mb()
    t0 = time.perf_counter()
    probs = predict(la, xt, link_approx="probit", backend=backend)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t0 = time.perf_counter()
    predict(la, xt, link_approx="probit", backend=backend)
    warm = time.perf_counter() - t0
    torch.save(probs, os.path.join(folder, f"{name}_{backend}_probs.pt"))
    nll = -probs[torch.arange(len(yt)), yt].log().mean().item()
    return {
        "model": name, "setting": setting, "backend": backend, "n_test": len(yt),
        "time_s": round(seconds, 3), "warm_time_s": round(warm, 3),
        "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
        "peak_delta_mb": round(peak - before, 1), "glm_probit_nll": round(nll, 4),
        "glm_probit_acc": round((probs.argmax(-1) == yt).double().mean().item(), 4),
    }


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--backends", nargs="+", default=["layerwise", "generic"],
                        choices=["layerwise", "generic"])
    parser.add_argument("--structure", default="kron", choices=["kron", "full"])
    parser.add_argument("--subset", default="all", choices=["all", "last_layer"])
    parser.add_argument("--child", nargs=3, metavar=("TASK", "MODEL", "ARG"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        task, name, arg = args.child
        setting = f"{args.structure}:{args.subset}"
        if task == "prepare":
            result = prepare(name, args.folder, setting)
        else:
            result = measure(name, arg, args.folder, setting)
        print(json.dumps(result))
        return
    setting = ["--structure", args.structure, "--subset", args.subset]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            print(json.dumps({"case": "setup", **run_child("--child", "prepare", name, "-",
                                                         "--folder", folder, *setting)}),
                  flush=True)
            results = {}
            for backend in args.backends:
                results[backend] = run_child("--child", "measure", name, backend,
                                             "--folder", folder, *setting)
            if len(results) == 2:
                fast = torch.load(os.path.join(folder, f"{name}_layerwise_probs.pt"))
                slow = torch.load(os.path.join(folder, f"{name}_generic_probs.pt"))
                diff = (fast - slow).abs().max().item()
                ratio = results["generic"]["time_s"] / results["layerwise"]["time_s"]
                results["layerwise"]["speedup_vs_generic"] = round(ratio, 1)
                results["layerwise"]["max_abs_diff_vs_generic"] = float(f"{diff:.2e}")
            for result in results.values():
                print(json.dumps({"case": "predictive", **result}), flush=True)


if __name__ == "__main__":
    main()

"""Calibration study on real data: MNIST, rotated MNIST, Fashion-MNIST as OOD (issue 18, item 1).

    python benchmarks/calibration_study.py --out marglik-out/calibration/marglik.jsonl
    python benchmarks/calibration_study.py --quick --out /tmp/quick.jsonl      # smoke run
    python benchmarks/calibration_study.py --only map all-kron-layerwise-probit --nets lenet-map
    python benchmarks/calibration_report.py marglik-out/calibration/*.jsonl    # tables, plots
    lt-venv/bin/python benchmarks/calibration_laplace_torch.py ...             # laplace-torch

Networks (``NETS``), trained once per seed and cached under ``--cache`` (git-ignored), so that a
rerun only refits posteriors:
- ``lenet-map``: LeNet-5 (:func:`marglik.nets.lenet`) trained by Adam (lr 1e-3, batch 128) with
  weight decay chosen on the validation split (lowest NLL over ``--wd-grid``);
- ``lenet-online``: the same network trained by :func:`marglik.marglik_training` with its
  default arguments except ``n_epochs`` (the same epochs as one MAP run);
- ``ccexam``: the pretrained MNIST CNN of the ``ccexam`` package, a user's network
  (:func:`marglik.data.mnist.load_pretrained_mnist_cnn`; the same weights for every seed).

Rows (``ROWS``, a registry: row name → function that builds, fits and tunes a posterior and
returns a predictor ``(set name, x) -> probabilities``): ``map`` (the network), and
``{last,all}-{structure}-{scalar,layerwise}-{probit,mc,nn}``: a Laplace posterior over the last
layer (``kron``, ``full``) or all weights (``kron``, ``diag``, ``lowrank``), fitted once on the
training set, with the prior precision tuned by the evidence at the network's weights
(``optimize_prior_precision(method="marglik", prior_structure=...)``, laplace-torch's
default; rows ``all-kron-tangent-*``: a scalar δ by the evidence of the linearised model at its
own mode, ``method="tangent"`` (Antorán et al., ICML 2022), marglik's default since issue 18,
with its default search over rescalings of the weight tensors), and the GLM
predictive with the probit or Monte Carlo link (``--samples``, default 100 as in both
libraries), or the sampling (``nn``) predictive (``--nn-samples``, default 20 forward passes). A new
posterior variant is one more ``register_row`` call. The probit and MC links of one posterior
share its GLM moments (``marglik.predictive.glm_moments`` + ``apply_link``, exactly what
``la(x, link_approx=...)`` computes).

Evaluation sets: the first ``--n-test`` MNIST test images (``test``), the same images rotated by
each of ``--angles`` degrees (``rot15`` …), the first ``--n-ood`` Fashion-MNIST test images
(``fmnist``). Metrics (:mod:`marglik.metrics`): accuracy, NLL, ECE (15 bins), Brier, mean
confidence; on rotated sets the same per angle; on Fashion-MNIST the mean confidence and the
AUROC of max-probability scores (test against fmnist). One JSON line per (network, seed, row);
test probabilities and OOD confidences go to ``<cache>/preds/`` for the plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from marglik import metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_ANGLES = tuple(range(15, 181, 15))
Predictor = Callable[[str, Tensor], Tensor]


# ---- data -------------------------------------------------------------------------------------
@dataclass
class StudyData:
    """Training / validation tensors and the named evaluation sets ``name -> (x, y or None)``."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    eval_sets: dict[str, tuple[Tensor, Tensor | None]]
    angles: tuple[int, ...]
    source: str


def synthetic_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Tiny stand-in for MNIST (tests without the data packages): class k lights up a 4×4
    patch at a class-specific place of a noisy 28×28 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 28, 28, generator=g)
    rows, cols = (y // 5) * 12 + 4, (y % 5) * 5 + 2
    for dr in range(4):  # 16 fixed offsets, vectorised over images
        for dc in range(4):
            x[torch.arange(n), 0, rows + dr, cols + dc] += 0.7
    return x.clamp(0, 1), y


def load_study_data(source: str, n_train: int | None, n_test: int, n_ood: int,
                    angles: tuple[int, ...]) -> StudyData:
    """MNIST (or ``"synthetic"``) with the evaluation sets described in the module docstring."""
    from marglik.data.mnist import load_fashion_mnist, load_mnist, rotate_images

    if source == "mnist":
        s = load_mnist()
        x_tr, y_tr, x_val, y_val, x_te, y_te = s
        x_ood, _ = load_fashion_mnist("test")
    elif source == "synthetic":
        x_tr, y_tr = synthetic_images(n_train or 512, 0)
        x_val, y_val = synthetic_images(256, 1)
        x_te, y_te = synthetic_images(n_test, 2)
        x_ood = torch.rand(n_ood, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    else:
        raise ValueError(f"unknown data source {source!r}")
    if n_train is not None:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    sets: dict[str, tuple[Tensor, Tensor | None]] = {"test": (x_te, y_te)}
    for a in angles:
        sets[f"rot{a}"] = (rotate_images(x_te, a), y_te)
    sets["fmnist"] = (x_ood[:n_ood], None)
    return StudyData(x_tr, y_tr, x_val, y_val, sets, tuple(angles), source)


# ---- networks ---------------------------------------------------------------------------------
def _loader(x: Tensor, y: Tensor, batch: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle, generator=g)


@torch.no_grad()
def net_probs(model: nn.Module, x: Tensor, chunk: int = 1000) -> Tensor:
    """softmax(model(x)) in chunks, eval mode: (N, C)."""
    model.eval()
    return torch.cat([torch.softmax(model(x[i:i + chunk]), -1) for i in range(0, len(x), chunk)])


def train_adam(data: StudyData, weight_decay: float, epochs: int, seed: int) -> nn.Module:
    """LeNet by Adam (lr 1e-3, batch 128, coupled L2 ``weight_decay``) — a user's own loop."""
    from marglik.nets import lenet

    torch.manual_seed(seed)
    model = lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=weight_decay)
    for _ in range(epochs):
        model.train()
        for x, y in _loader(data.x_train, data.y_train, 128, True, seed):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def build_lenet_map(data: StudyData, args: argparse.Namespace, seed: int):
    """Weight decay by validation NLL over ``args.wd_grid``; returns (model, info)."""
    scores = {}
    best = None
    for wd in args.wd_grid:
        model = train_adam(data, wd, args.epochs, seed)
        scores[wd] = float(metrics.nll(net_probs(model, data.x_val), data.y_val))
        if best is None or scores[wd] < scores[best[0]]:
            best = (wd, model)
    return best[1], {"weight_decay": best[0], "val_nll": scores}


def build_lenet_online(data: StudyData, args: argparse.Namespace, seed: int):
    """``marglik_training`` with default arguments except ``n_epochs``; returns (model, info)."""
    import marglik
    from marglik.nets import lenet

    torch.manual_seed(seed)
    model = lenet()
    la, model, hist = marglik.marglik_training(
        model, _loader(data.x_train, data.y_train, 128, True, seed), "classification",
        n_epochs=args.epochs)
    delta = la.prior_precision.detach().reshape(-1).tolist()
    return model.eval(), {"prior_precision": delta, "n_epochs": args.epochs}


def build_ccexam(data: StudyData, args: argparse.Namespace, seed: int):
    from marglik.data.mnist import load_pretrained_mnist_cnn

    return load_pretrained_mnist_cnn(), {"source": "ccexam==1.0.0 weights/mnist.pth"}


NETS: dict[str, Callable] = {
    "lenet-map": build_lenet_map, "lenet-online": build_lenet_online, "ccexam": build_ccexam}


def net_architecture(name: str, data: StudyData) -> nn.Module:
    from marglik.nets import digit_cnn, lenet

    if name == "ccexam":
        from marglik.data.mnist import CCEXAM_MNIST_MEAN, CCEXAM_MNIST_STD
        return digit_cnn(28, CCEXAM_MNIST_MEAN, CCEXAM_MNIST_STD)
    return lenet()


def cache_tag(args: argparse.Namespace, data: StudyData) -> str:
    return f"{data.source}-n{len(data.x_train)}-e{args.epochs}"


def get_net(name: str, data: StudyData, args: argparse.Namespace, seed: int,
            train: bool = True) -> tuple[nn.Module, dict]:
    """The network ``name`` for ``seed``: from the cache, else built (and cached)."""
    path = Path(args.cache) / "nets" / f"{cache_tag(args, data)}-{name}-seed{seed}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model = net_architecture(name, data)
        model.load_state_dict(saved["state"])
        return model.eval(), json.loads(saved["info"])
    if not train:
        raise FileNotFoundError(f"{path} is missing: run benchmarks/calibration_study.py first")
    t0 = time.perf_counter()
    model, info = NETS[name](data, args, seed)
    info["train_s"] = round(time.perf_counter() - t0, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "info": json.dumps(info)}, path)
    return model.eval(), info


# ---- rows: the registry -----------------------------------------------------------------------
@dataclass
class Context:
    """What a row gets: the network, the training loader, options and shared caches."""

    model: nn.Module
    train_loader: DataLoader
    seed: int
    n_samples: int
    rank: int
    nn_samples: int = 20
    cache: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


RowFn = Callable[[Context], Predictor]
ROWS: dict[str, RowFn] = {}


def register_row(name: str, fn: RowFn, rows: dict[str, RowFn] = ROWS) -> None:
    """Add a row; its function gets a :class:`Context` and returns ``(set, x) -> probs``."""
    if name in rows:
        raise ValueError(f"row {name!r} is registered twice")
    rows[name] = fn


def map_row(ctx: Context) -> Predictor:
    return lambda name, x: net_probs(ctx.model, x)


def timed(ctx: Context, key: str, make: Callable):
    if key not in ctx.cache:
        t0 = time.perf_counter()
        ctx.cache[key] = make()
        ctx.timings[key] = round(time.perf_counter() - t0, 2)
    return ctx.cache[key]


def marglik_posterior(ctx: Context, subset: str, structure: str, prior: str):
    """Fitted once per (subset, structure); δ tuned by the evidence once per prior structure."""
    import marglik

    def fit():
        la = marglik.Laplace(ctx.model, "classification", subset_of_weights=subset,
                             hessian_structure=structure, seed=ctx.seed,
                             rank=ctx.rank if structure == "lowrank" else None)
        return la.fit(ctx.train_loader)

    fitted = timed(ctx, f"fit:{subset}-{structure}", fit)

    def tune():
        la = copy.deepcopy(fitted)
        if prior == "tangent":  # the linearised model's evidence at its own mode, scalar δ
            la.optimize_prior_precision(method="tangent", prior_structure="scalar",
                                        train_loader=ctx.train_loader)
        else:
            la.optimize_prior_precision(method="marglik", prior_structure=prior)
        return la

    return timed(ctx, f"tune:{subset}-{structure}-{prior}", tune)


def marglik_row(subset: str, structure: str, prior: str, link: str) -> RowFn:
    """A marglik Laplace row: GLM probit / MC (shared moments) or the ``nn`` predictive."""
    from marglik.predictive import apply_link, glm_moments

    def row(ctx: Context) -> Predictor:
        la = marglik_posterior(ctx, subset, structure, prior)
        key = f"{subset}-{structure}-{prior}"

        def predict(name: str, x: Tensor) -> Tensor:
            gen = torch.Generator().manual_seed(ctx.seed)
            if link == "nn":
                return la(x, pred_type="nn", n_samples=ctx.nn_samples, generator=gen)
            if f"moments:{key}:{name}" not in ctx.cache:  # shared by the links, timed once
                t0 = time.perf_counter()
                ctx.cache[f"moments:{key}:{name}"] = glm_moments(la, x)
                ctx.timings[f"moments:{key}"] = round(ctx.timings.get(f"moments:{key}", 0.0)
                                                      + time.perf_counter() - t0, 2)
            f, cov = ctx.cache[f"moments:{key}:{name}"]
            return apply_link(f, cov, link, False, ctx.n_samples, gen)

        return predict

    return row


POSTERIORS = (("last", "last_layer", "kron"), ("last", "last_layer", "full"),
              ("all", "all", "kron"), ("all", "all", "diag"), ("all", "all", "lowrank"))
PRIORS = ("scalar", "layerwise")
LINKS = ("probit", "mc", "nn")
#: (posterior, prior) pairs beyond the grid: the tangent evidence for all-weights KFAC
EXTRA = ((("all", "all", "kron"), "tangent"),)


def row_names() -> list[str]:
    """``map`` and every posterior row, in table order."""
    grid = [((short, subset, structure), prior) for short, subset, structure in POSTERIORS
            for prior in PRIORS]
    return ["map"] + [f"{short}-{structure}-{prior}-{link}"
                      for (short, _, structure), prior in grid + list(EXTRA) for link in LINKS]


register_row("map", map_row)
for _name in row_names()[1:]:
    _short, _structure, _prior, _link = _name.split("-")
    register_row(_name, marglik_row({"last": "last_layer", "all": "all"}[_short], _structure,
                                    _prior, _link))


# ---- evaluation -------------------------------------------------------------------------------
def evaluate(predict: Predictor, data: StudyData) -> tuple[dict, dict[str, Tensor]]:
    """Metrics of one row on every evaluation set, and the arrays the plots need."""
    out: dict = {}
    probs = {}
    for name, (x, _) in data.eval_sets.items():
        probs[name] = predict(name, x).double()
        probs[name] = probs[name] / probs[name].sum(-1, keepdim=True)  # float rounding only
    x_te, y_te = data.eval_sets["test"]
    p = probs["test"]
    out["test"] = _scores(p, y_te)
    out["shift"] = {str(a): _scores(probs[f"rot{a}"], y_te) for a in data.angles}
    conf_in, conf_out = metrics.confidence(p), metrics.confidence(probs["fmnist"])
    out["ood"] = {"conf": float(conf_out.mean()),
                  "auroc": float(metrics.ood_auroc(conf_in, conf_out))}
    arrays = {"test_probs": p.float(), "test_y": y_te, "ood_conf": conf_out.float()}
    return out, arrays


def _scores(p: Tensor, y: Tensor) -> dict[str, float]:
    return {"acc": float(metrics.accuracy(p, y)), "nll": float(metrics.nll(p, y)),
            "ece": float(metrics.ece(p, y)), "brier": float(metrics.brier(p, y)),
            "conf": float(metrics.confidence(p).mean())}


def run_rows(library: str, rows: dict[str, RowFn], names: list[str], net: str,
             model: nn.Module, info: dict, data: StudyData, args: argparse.Namespace,
             seed: int, emit: Callable[[dict], None]) -> None:
    """Evaluate ``names`` of ``rows`` on one network; one record per row through ``emit``."""
    ctx = Context(model, _loader(data.x_train, data.y_train, args.fit_batch, False),
                  seed, args.samples, args.rank, args.nn_samples)
    for name in names:
        t0 = time.perf_counter()
        before = dict(ctx.timings)
        torch.manual_seed(seed)
        try:
            scores, arrays = evaluate(rows[name](ctx), data)
        except Exception as e:  # one row failing must not lose the others
            emit({"library": library, "net": net, "seed": seed, "row": name,
                  "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        new = {k: v for k, v in ctx.timings.items() if k not in before}
        rec = {"library": library, "net": net, "seed": seed, "row": name,
               "n_train": len(data.x_train), "n_test": len(data.eval_sets["test"][0]),
               "n_ood": len(data.eval_sets["fmnist"][0]), "source": data.source,
               **scores, "seconds": round(time.perf_counter() - t0, 2), "steps_s": new,
               "net_info": info}
        la = ctx.cache.get(_tune_key(name))
        if la is not None and hasattr(la, "prior_precision"):
            rec["prior_precision"] = [round(float(v), 6)
                                      for v in torch.as_tensor(la.prior_precision).reshape(-1)]
        save_arrays(args, library, net, seed, name, arrays)
        emit(rec)


def _tune_key(row: str) -> str:
    parts = row.split("-")
    return "" if len(parts) < 4 else "tune:" + "-".join(
        [{"last": "last_layer", "all": "all"}[parts[0]], parts[1], parts[2]])


def save_arrays(args, library: str, net: str, seed: int, row: str, arrays: dict) -> None:
    folder = Path(args.cache) / "preds"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(arrays, folder / f"{library}-{net}-seed{seed}-{row}.pt")


# ---- command line -----------------------------------------------------------------------------
def environment() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status",
            "--porcelain", "--untracked-files=no")), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "load": [round(v, 2) for v in load],
            "argv": sys.argv[1:]}


def parse_args(argv=None, rows: dict[str, RowFn] = ROWS) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON lines file (appended); stdout too")
    p.add_argument("--cache", default=str(ROOT / "marglik-out" / "calibration"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--only", nargs="+", default=None, metavar="ROW",
                   help=f"rows to run (default all): {', '.join(rows)}")
    p.add_argument("--skip", nargs="+", default=[], metavar="ROW")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1,000 training images, 1 epoch, 200 test points, 3 angles")
    p.add_argument("--data", default="mnist", choices=["mnist", "synthetic"])
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--n-ood", type=int, default=2000)
    p.add_argument("--angles", type=int, nargs="+", default=list(DEFAULT_ANGLES))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--wd-grid", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--fit-batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=100, help="samples of the MC link")
    p.add_argument("--nn-samples", type=int, default=20,
                   help="weight samples of the nn predictive (a forward pass each)")
    p.add_argument("--rank", type=int, default=20, help="rank of the lowrank posterior")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; sizes given explicitly are kept
        args.n_train = args.n_train or 1000
        args.epochs, args.n_test, args.n_ood = 1, min(args.n_test, 200), min(args.n_ood, 200)
        args.wd_grid, args.rank = [1e-4], min(args.rank, 5)
        if args.angles == list(DEFAULT_ANGLES):
            args.angles = [30, 90, 180]
    unknown = sorted(set(args.only or []) - set(rows))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(rows)}")
    return args


def selected_rows(args, rows: dict[str, RowFn]) -> list[str]:
    names = args.only or list(rows)
    return [n for n in names if n not in args.skip]


def emitter(args, env: dict) -> Callable[[dict], None]:
    def emit(rec: dict) -> None:
        rec = {**rec, "env": env}
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return emit


def main(argv=None) -> None:
    torch.set_num_threads(1)
    args = parse_args(argv)
    data = load_study_data(args.data, args.n_train, args.n_test, args.n_ood, tuple(args.angles))
    emit = emitter(args, environment())
    names = selected_rows(args, ROWS)
    for seed in args.seeds:
        for net in args.nets:
            if net == "ccexam" and (seed != args.seeds[0] or args.data != "mnist"):
                continue  # fixed pretrained weights: one seed; needs the real MNIST
            model, info = get_net(net, data, args, seed)
            run_rows("marglik", ROWS, names, net, model, info, data, args, seed, emit)


if __name__ == "__main__":
    main()

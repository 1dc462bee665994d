"""``marglik demo``: the whole pipeline on two data sets that ship with scikit-learn.

1. digits (classification, 1,257 train / 540 test images): a 64-32-32-10 ReLU MLP trained to the
   MAP, then post-hoc Laplace posteriors — all weights (KFAC; full GGN as a check that KFAC is not
   the cause of what we see) and the last layer (KFAC and full) — with layer-wise prior precisions
   tuned by the evidence, and probit or Monte Carlo links.
2. diabetes (regression, 309 train / 133 test patients): a 10-50-1 tanh MLP trained to the MAP
   with a default prior, post-hoc Laplace with δ and σ tuned by the evidence; then the same network
   trained by online evidence maximisation (:func:`marglik.online.marglik_training`), whose
   posterior is used as it comes out of training, next to post-hoc ones at the same weights.

It prints a table (MAP vs Laplace: accuracy or RMSE, NLL, ECE or interval calibration error, log
evidence, seconds) and writes ``summary.json`` and plots (reliability diagrams, evidence traces,
regression predictive intervals) to ``--out``. The headline configurations are fixed, chosen from
measurements documented in ``docs/calibration.md``: the last-layer full-GGN posterior with the
probit link for classification, the evidence-trained all-weights KFAC posterior for regression.

Threads: small MLPs run far faster on one thread than on several, so the command sets
``torch.set_num_threads(--threads)`` (default 1). The library itself never changes threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from marglik.cli import CLIError

#: Monte Carlo samples of the logits for link_approx="mc"
MC_SAMPLES = 1000
HEADLINE_CLASSIFICATION = "Laplace last-layer full GGN (probit)"
HEADLINE_REGRESSION = "evidence-trained + Laplace all KFAC"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "digits_epochs": 3,
            "diabetes_epochs": 50,
            "online_epochs": 40,
            "evidence_every": 20,
            "hyper_steps": 10,
            "mc_samples": 100,
            "full_all_weights": False,
            "scan": False,
        }
    return {
        "digits_epochs": 150,
        "diabetes_epochs": 1000,
        "online_epochs": 1000,
        "evidence_every": 50,
        "hyper_steps": 200,
        "mc_samples": MC_SAMPLES,
        "full_all_weights": True,
        "scan": True,
    }


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def _progress() -> bool:
    return sys.stderr.isatty()


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _probs(la: Any, X: Tensor, link: str, n_samples: int, seed: int) -> Tensor:
    torch.manual_seed(seed)  # the Monte Carlo link draws logits
    if link == "mc":
        return la(X, pred_type="glm", link_approx="mc", n_samples=n_samples)
    return la(X, pred_type="glm", link_approx=link)


def _regression_moments(la: Any, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean (N, 1), function variance (N, 1), predictive variance with noise (N, 1))."""
    f_mean, f_var = la(X, pred_type="glm")
    f_var = f_var.reshape(len(X), -1)[:, :1]
    return f_mean.reshape(-1, 1), f_var, f_var + la.sigma_noise.reshape(()) ** 2


def _hyper(la: Any) -> dict[str, Any]:
    out = {"prior_precision": [round(v, 6) for v in la.prior_precision.reshape(-1).tolist()]}
    if la.sigma_noise is not None:
        out["sigma_noise"] = la.sigma_noise.reshape(()).item()
    return out


# ---- classification ---------------------------------------------------------------------------
def run_digits(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    import marglik
    from marglik import metrics
    from marglik.data import load_digits_split
    from marglik.training import train_map

    Xtr, ytr, Xte, yte = load_digits_split(flatten=True, seed=seed)
    torch.manual_seed(seed)
    model = _mlp([64, 32, 32, 10], nn.ReLU)
    data = torch.utils.data.TensorDataset(Xtr, ytr)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, generator=g)
    prior = 1.0
    with Stopwatch() as sw:
        train_map(
            model,
            loader,
            "classification",
            n_epochs=cfg["digits_epochs"],
            lr=3e-3,
            prior_precision=prior,
            progress=_progress(),
        )
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        map_probs = torch.softmax(model(Xte), -1)

    def row(
        method: str,
        link: str,
        P: int,
        probs: Tensor,
        log_z: float | None,
        seconds: float,
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "method": method,
            "link": link,
            "n_params": P,
            "accuracy": metrics.accuracy(probs, yte).item(),
            "nll": metrics.nll(probs, yte).item(),
            "ece": metrics.ece(probs, yte).item(),
            "log_marglik": log_z,
            "seconds": round(seconds, 2),
            **extra,
        }

    rows = [row(f"MAP (prior precision {prior:g})", "-", n_params, map_probs, None, sw.seconds)]
    probs_of = {"MAP": map_probs}
    traces: dict[str, list[float]] = {}
    train = [(Xtr, ytr)]
    configs = [
        ("Laplace all KFAC", "all", "kron", "layerwise", ["probit", "mc"]),
        ("Laplace all full GGN", "all", "full", "scalar", ["probit", "mc"]),
        ("Laplace last-layer KFAC", "last_layer", "kron", "layerwise", ["probit", "mc"]),
        ("Laplace last-layer full GGN", "last_layer", "full", "layerwise", ["probit", "mc"]),
    ]
    if not cfg["full_all_weights"]:
        configs = [c for c in configs if c[:3] != ("Laplace all full GGN", "all", "full")]
    for method, subset, structure, prior_structure, links in configs:
        with Stopwatch() as fit_sw:
            la = marglik.Laplace(
                model,
                "classification",
                subset_of_weights=subset,
                hessian_structure=structure,
                prior_precision=prior,
            )
            la.fit(train)
            hist = la.optimize_prior_precision(
                prior_structure=prior_structure,
                n_steps=cfg["hyper_steps"],
                lr=0.1,
                progress=_progress(),
            )
            log_z = la.log_marginal_likelihood().item()
        traces[method] = hist["log_marglik"]
        for link in links:
            with Stopwatch() as pred_sw:
                probs = _probs(la, Xte, link, cfg["mc_samples"], seed)
            probs_of[f"{method} ({link})"] = probs
            rows.append(
                row(
                    method,
                    link,
                    la.n_params,
                    probs,
                    log_z,
                    fit_sw.seconds + pred_sw.seconds,
                    prior_structure=prior_structure,
                    **_hyper(la),
                )
            )
        if subset == "all" and structure == "kron" and cfg["scan"]:
            scan = _delta_scan(la, Xte, yte, cfg, seed)
    out = {
        "data": "digits",
        "n_train": len(Xtr),
        "n_test": len(Xte),
        "model": "MLP 64-32-32-10 ReLU",
        "train_epochs": cfg["digits_epochs"],
        "rows": rows,
        "headline": HEADLINE_CLASSIFICATION,
        "evidence_traces": traces,
    }
    if cfg["scan"]:
        out["prior_scan_all_kfac"] = scan
    out["_probs"] = probs_of
    out["_test"] = yte
    return out


def _delta_scan(la: Any, Xte: Tensor, yte: Tensor, cfg: dict, seed: int) -> list[dict[str, float]]:
    """Test NLL of the all-weights posterior as the scalar δ grows beyond the evidence optimum."""
    from marglik import metrics

    saved = la.prior_precision
    la.optimize_prior_precision(prior_structure="scalar", n_steps=cfg["hyper_steps"], lr=0.1)
    best = la.prior_precision.item()
    scan = []
    for factor in (1, 10, 100, 1000):
        la.prior_precision = torch.tensor(best * factor)
        probs = _probs(la, Xte, "probit", cfg["mc_samples"], seed)
        scan.append(
            {
                "prior_precision": best * factor,
                "factor": factor,
                "log_marglik": la.log_marginal_likelihood().item(),
                "nll": metrics.nll(probs, yte).item(),
                "ece": metrics.ece(probs, yte).item(),
            }
        )
    la.prior_precision = saved
    return scan


# ---- regression -------------------------------------------------------------------------------
def run_diabetes(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    import marglik
    from marglik import metrics
    from marglik.data import load_regression_set
    from marglik.online import marglik_training
    from marglik.training import train_map

    split = load_regression_set("diabetes", seed=seed)
    Xtr, ytr, Xte, yte = split.X_train, split.y_train, split.X_test, split.y_test
    scale = split.y_std.item()
    train = [(Xtr, ytr)]

    def row(
        method: str,
        P: int,
        mean: Tensor,
        var: Tensor,
        log_z: float | None,
        seconds: float,
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "method": method,
            "n_params": P,
            "rmse": metrics.rmse(mean, yte).item() * scale,
            "nll": metrics.gaussian_nll(mean, var, yte).item() + math.log(scale),
            "calibration_error": metrics.regression_calibration_error(mean, var, yte).item(),
            "log_marglik": log_z,
            "seconds": round(seconds, 2),
            **extra,
        }

    rows, traces, predictions = [], {}, {}

    def laplace_rows(
        model: nn.Module, tag: str, prior: float, sigma: float, skip: tuple[str, ...] = ()
    ) -> None:
        configs = [
            ("Laplace all KFAC", "all", "kron", "layerwise"),
            ("Laplace all full GGN", "all", "full", "scalar"),
            ("Laplace last-layer KFAC", "last_layer", "kron", "layerwise"),
        ]
        for method, subset, structure, prior_structure in configs:
            if method in skip:
                continue
            with Stopwatch() as sw:
                la = marglik.Laplace(
                    model,
                    "regression",
                    subset_of_weights=subset,
                    hessian_structure=structure,
                    prior_precision=prior,
                    sigma_noise=sigma,
                )
                la.fit(train)
                hist = la.optimize_prior_precision(
                    prior_structure=prior_structure,
                    tune_sigma=True,
                    n_steps=cfg["hyper_steps"],
                    lr=0.1,
                    progress=_progress(),
                )
                mean, f_var, var = _regression_moments(la, Xte)
            name = f"{tag}{method}"
            traces[name] = hist["log_marglik"]
            predictions[name] = (la, mean, f_var, var)
            rows.append(
                row(
                    name,
                    la.n_params,
                    mean,
                    var,
                    la.log_marginal_likelihood().item(),
                    sw.seconds,
                    prior_structure=prior_structure,
                    **_hyper(la),
                )
            )

    # 1. MAP with a default prior, then post-hoc Laplace
    torch.manual_seed(seed)
    model = _mlp([Xtr.shape[1], 50, 1], nn.Tanh)
    prior = 1.0
    with Stopwatch() as sw:
        train_map(
            model,
            train,
            "regression",
            n_epochs=cfg["diabetes_epochs"],
            lr=1e-2,
            prior_precision=prior,
            sigma_noise=1.0,
            progress=_progress(),
        )
    with torch.no_grad():
        mean = model(Xte)
        sigma2 = (model(Xtr) - ytr).square().mean()  # noise: training residuals
    n_params = sum(p.numel() for p in model.parameters())
    rows.append(
        row(
            f"MAP (prior precision {prior:g}, sigma from residuals)",
            n_params,
            mean,
            sigma2.expand_as(mean),
            None,
            sw.seconds,
        )
    )
    laplace_rows(model, "", prior, 1.0)

    # 2. evidence-trained: online evidence maximisation (Immer et al. 2021, Algorithm 1)
    torch.manual_seed(seed)
    model = _mlp([Xtr.shape[1], 50, 1], nn.Tanh)
    every = cfg["evidence_every"]
    with Stopwatch() as sw:
        la, model, hist = marglik_training(
            model,
            train,
            "regression",
            hessian_structure="kron",
            prior_structure="layerwise",
            n_epochs=cfg["online_epochs"],
            lr=1e-2,
            n_epochs_burnin=every - 1,
            marglik_frequency=every,
            n_hypersteps=50,
            progress=_progress(),
        )
    with torch.no_grad():
        mean = model(Xte)
        sigma2 = (model(Xtr) - ytr).square().mean()
    rows.append(
        row(
            "evidence-trained MAP (sigma from residuals)",
            n_params,
            mean,
            sigma2.expand_as(mean),
            None,
            sw.seconds,
            epochs=cfg["online_epochs"],
        )
    )
    with Stopwatch() as pred_sw:
        mean, f_var, var = _regression_moments(la, Xte)
    name = HEADLINE_REGRESSION
    predictions[name] = (la, mean, f_var, var)
    rows.append(
        row(
            name,
            la.n_params,
            mean,
            var,
            la.log_marginal_likelihood().item(),
            sw.seconds + pred_sw.seconds,
            prior_structure="layerwise (tuned online)",
            **_hyper(la),
        )
    )
    evaluated = [(e + 1, v) for e, v in enumerate(hist["log_marglik"]) if not math.isnan(v)]
    tuned_prior = la.prior_precision.reshape(-1)
    laplace_rows(
        model,
        "evidence-trained + ",
        tuned_prior.log().mean().exp().item(),
        la.sigma_noise.reshape(()).item(),
        skip=("Laplace all KFAC",),
    )
    return {
        "data": "diabetes",
        "n_train": len(Xtr),
        "n_test": len(Xte),
        "model": "MLP 10-50-1 tanh",
        "train_epochs": cfg["diabetes_epochs"],
        "online_training": {
            "epochs": cfg["online_epochs"],
            "evidence_every": every,
            "evidence_epochs": [e for e, _ in evaluated],
            "log_marglik": [v for _, v in evaluated],
            "sigma_noise": [hist["sigma_noise"][e - 1] for e, _ in evaluated],
            "best_epoch": max(evaluated, key=lambda ev: ev[1])[0],
        },
        "rows": rows,
        "headline": HEADLINE_REGRESSION,
        "evidence_traces": traces,
        "_predictions": predictions,
        "_split": split,
    }


# ---- output -----------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_tables(digits: dict[str, Any], diabetes: dict[str, Any]) -> str:
    lines = [
        f"digits: classification, {digits['n_train']} train / {digits['n_test']} test, "
        f"{digits['model']}",
        f"  {'method':<34} {'link':<6} {'P':>5} {'acc':>7} {'NLL':>7} {'ECE':>7} "
        f"{'log Z':>9} {'s':>6}",
    ]
    for r in digits["rows"]:
        mark = "*" if f"{r['method']} ({r['link']})" == digits["headline"] else " "
        lines.append(
            f"{mark} {r['method']:<34} {r['link']:<6} {r['n_params']:>5} "
            f"{r['accuracy']:>7.4f} {r['nll']:>7.4f} {r['ece']:>7.4f} "
            f"{_fmt(r['log_marglik'], 1):>9} {r['seconds']:>6.1f}"
        )
    lines += [
        "",
        f"diabetes: regression, {diabetes['n_train']} train / {diabetes['n_test']} "
        f"test, {diabetes['model']} (RMSE and NLL in original units)",
        f"  {'method':<52} {'P':>5} {'RMSE':>7} {'NLL':>7} {'CalErr':>7} {'log Z':>9} {'s':>6}",
    ]
    for r in diabetes["rows"]:
        mark = "*" if r["method"] == diabetes["headline"] else " "
        lines.append(
            f"{mark} {r['method']:<52} {r['n_params']:>5} {r['rmse']:>7.2f} "
            f"{r['nll']:>7.4f} {r['calibration_error']:>7.4f} "
            f"{_fmt(r['log_marglik'], 1):>9} {r['seconds']:>6.1f}"
        )
    lines.append(
        "* headline configuration (docs/calibration.md). log Z: Laplace log evidence (last-layer "
        "values condition on the features: not comparable to all-weights ones). s: seconds to "
        "train (MAP rows) or to fit, tune and predict (Laplace rows)."
    )
    return "\n".join(lines)


def write_plots(out: Path, digits: dict[str, Any], diabetes: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marglik import plot

    files = []
    probs, yte = digits["_probs"], digits["_test"]
    shown = ["MAP", "Laplace all KFAC (probit)", digits["headline"]]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.5))
    for ax, name in zip(axes, shown):
        plot.reliability_diagram(probs[name], yte, ax=ax)
        ax.set_title(f"digits: {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files.append("reliability.png")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    plot.trace(digits["evidence_traces"], ax=axes[0], xlabel="Adam step on log δ")
    axes[0].set_title("digits: post-hoc evidence maximisation", fontsize=10)
    plot.trace(diabetes["evidence_traces"], ax=axes[1], xlabel="Adam step on log δ, log σ")
    axes[1].set_title("diabetes: post-hoc evidence maximisation", fontsize=10)
    online = diabetes["online_training"]
    axes[2].plot(
        online["evidence_epochs"], online["log_marglik"], "o-", ms=3, label="all-weights KFAC"
    )
    axes[2].axvline(online["best_epoch"], color="gray", ls="--", label="best (kept)")
    axes[2].set_xlabel("epoch")
    axes[2].set_title("diabetes: online evidence maximisation during training", fontsize=10)
    for ax in axes:
        ax.set_ylabel("log evidence")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "evidence_trace.png", dpi=110)
    plt.close(fig)
    files.append("evidence_trace.png")

    split = diabetes["_split"]
    la, mean, f_var, var = diabetes["_predictions"][diabetes["headline"]]
    ys, ym = split.y_std.item(), split.y_mean.item()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    y_true = split.y_test.reshape(-1) * ys + ym
    y_pred = mean.reshape(-1) * ys + ym
    ax.errorbar(
        y_true,
        y_pred,
        yerr=2 * var.reshape(-1).sqrt() * ys,
        fmt="o",
        ms=3,
        alpha=0.6,
        elinewidth=0.8,
        label="mean ± 2 std (with noise)",
    )
    lo, hi = float(y_true.min()), float(y_true.max())
    ax.plot([lo, hi], [lo, hi], "--", color="gray", label="y = x")
    ax.set_xlabel("true disease progression")
    ax.set_ylabel("predicted")
    ax.set_title(f"diabetes test set: {diabetes['headline']}", fontsize=10)
    ax.legend()
    # predictive bands along the first principal direction of the training inputs
    Xtr = split.X_train
    center = Xtr.mean(0)
    _, _, V = torch.linalg.svd(Xtr - center, full_matrices=False)
    v = V[0]
    t_train = (Xtr - center) @ v
    t = torch.linspace(float(t_train.min()) - 1.5, float(t_train.max()) + 1.5, 200)
    grid = center + t[:, None] * v
    with torch.no_grad():
        m, fv, _ = _regression_moments(la, grid)
    sigma = la.sigma_noise.reshape(()).item() * ys
    plot.predictive_bands(
        t,
        m.reshape(-1) * ys + ym,
        fv.reshape(-1).sqrt() * ys,
        x_train=t_train,
        y_train=split.y_train.reshape(-1) * ys + ym,
        aleatoric_std=sigma,
        ax=axes[1],
    )
    axes[1].set_xlabel("first principal direction of the standardised inputs")
    axes[1].set_ylabel("disease progression")
    axes[1].set_title("predictive bands along PC 1 (other directions at the mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "regression.png", dpi=110)
    plt.close(fig)
    files.append("regression.png")
    return files


def _public(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def cmd_demo(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise CLIError(
            "the demo's data sets ship with scikit-learn, which is not installed: "
            "pip install 'marglik[data]'"
        ) from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create output folder {str(out)!r}: {err.strerror}") from None
    torch.set_num_threads(args.threads)
    cfg = _settings(args.quick)
    start = time.perf_counter()
    print(
        f"marglik demo{' --quick' if args.quick else ''}: digits and diabetes, "
        f"{args.threads} thread(s); writing to {out}/",
        flush=True,
    )
    digits = run_digits(cfg, args.seed)
    diabetes = run_diabetes(cfg, args.seed)
    table = format_tables(digits, diabetes)
    print(table)
    if cfg["scan"]:
        scan = ", ".join(
            f"x{s['factor']}: NLL {s['nll']:.3f}" for s in digits["prior_scan_all_kfac"]
        )
        print(
            f"digits, all-weights KFAC (probit) as the scalar prior precision grows beyond its "
            f"evidence optimum {digits['prior_scan_all_kfac'][0]['prior_precision']:.3g}: "
            f"{scan}"
        )
    try:
        files = write_plots(out, digits, diabetes)
    except ImportError:
        files = []
        print("matplotlib is not installed: no plots (pip install 'marglik[plot]')")
    wall = time.perf_counter() - start
    summary = {
        "marglik_version": _version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "quick": args.quick,
        "seed": args.seed,
        "settings": cfg,
        "classification": _public(digits),
        "regression": _public(diabetes),
        "table": table.splitlines(),
        "files": files + ["summary.json"],
        "wall_time_s": round(wall, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {', '.join(summary['files'])} to {out}/ in {wall:.0f} s")
    return 0


def _version() -> str:
    import marglik

    return marglik.__version__


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train, fit Laplace and tune by the evidence on digits and diabetes",
        description="Train small MLPs on the digits and diabetes sets that ship with "
        "scikit-learn, compare MAP with Laplace posteriors tuned by the evidence, and "
        "write a table, plots and summary.json.",
    )
    parser.add_argument("--out", default="marglik-out", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few epochs and steps only (a smoke test, numbers meaningless)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and training")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for these small models)",
    )
    parser.set_defaults(func=cmd_demo)

"""The demo's report: the printed table, the plots and ``summary.json``."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch

from marglik.cli.demo.experiments import _regression_moments


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


def format_scan(scan: list[dict[str, float]]) -> str:
    """One line: test NLL of the all-weights KFAC posterior as the prior precision grows."""
    steps = ", ".join(f"x{s['factor']}: NLL {s['nll']:.3f}" for s in scan)
    return (
        f"digits, all-weights KFAC (probit) as the scalar prior precision grows beyond its "
        f"evidence optimum {scan[0]['prior_precision']:.3g}: {steps}"
    )


def _public(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def summary(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    digits: dict[str, Any],
    diabetes: dict[str, Any],
    table: str,
    files: list[str],
    wall: float,
) -> dict[str, Any]:
    """The content of ``summary.json``: version, date, machine, settings, results, table."""
    return {
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


def _version() -> str:
    import marglik

    return marglik.__version__

"""The model kinds ``marglik fit --model KIND`` can train: a table of name → how to fit.

A kind is a :class:`ModelKind`: a help line and a ``fit`` function that trains on the prepared
table, writes the model folder and returns the lines to print. Adding a kind is one entry in
:data:`MODEL_KINDS` (and, for ``marglik predict``, a ``load`` function reading its folder into
an object with ``features``, ``config`` and ``predict(X) -> TabularPrediction``); a kind whose
``fit`` is None is listed but refused with a one-line error (exit status 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marglik.applications.additive.folder import (
    ADDITIVE_FILES,
    AdditiveTableModel,
    fit_additive_table,
)
from marglik.applications.tabular import FILES, TabularModel, default_budget, fit_table
from marglik.applications.tabular.preprocessing import Prepared
from marglik.cli import CLIError
from marglik.cli.tabular.options import FitOptions
from marglik.cli.tabular.progress import ProgressLines

__all__ = ["MODEL_KINDS", "ModelKind", "kind_of_folder"]

#: ``fit(prepared, options, out, source, progress_bar, callback) -> lines to print``
FitFunction = Callable[[Prepared, FitOptions, Path, str, bool, Any], list[str]]


@dataclass(frozen=True)
class ModelKind:
    """One ``--model`` choice."""

    help: str
    fit: FitFunction | None = None
    load: Callable[[Path], Any] | None = None


def fit_mlp(
    prepared: Prepared,
    opts: FitOptions,
    out: Path,
    source: str,
    progress_bar: bool,
    callback: Any,
) -> list[str]:
    """Train the tanh MLP (:func:`marglik.applications.tabular.fit_table`) and save it."""
    table = prepared.table
    model, report = fit_table(
        table,
        opts.hidden,
        epochs=opts.epochs,
        evidence_every=opts.evidence_every,
        lr=opts.lr,
        seed=opts.seed,
        progress=progress_bar,
        callback=callback,
        source=source,
    )
    model.config["model"] = "mlp"
    report["preprocessing"] = prepared.summary
    model.save(out, report)
    training, hyper = report["training"], report["hyperparameters"]
    n_in, n_out = report["n_features"], model.config["n_outputs"]
    lines = [
        f"marglik fit: {table.task} on {report['n_train']} rows x {n_in} features, MLP "
        f"{n_in}-{'-'.join(map(str, opts.hidden))}-{n_out}, {training['epochs']} epochs "
        f"(evidence every {training['evidence_every']}) in {report['seconds']:.1f} s",
        f"  log evidence (best, epoch {training['best_epoch']}): {report['log_marglik']:.2f}",
        "  prior precision: " + ", ".join(
            f"{n}={v:.3g}"
            for n, v in zip(hyper["prior_precision_layers"], hyper["prior_precision"])
        ),
    ]
    if "sigma_noise_original_units" in hyper:
        lines.append(f"  noise sigma: {hyper['sigma_noise_original_units']:.4g} (original units)")
    lines.append("  train: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                         report["train_metrics"].items()))
    lines.append(f"  saved to {out}/ ({', '.join((*FILES, 'preprocessing.json'))})")
    return lines


def write_shapes(model: AdditiveTableModel, X: Any, out: Path, importances: list[float]) -> str:
    """Plot the shape functions (±2 std bands, data rug) to ``out/shapes.png``; the line to
    print (saying so when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return "  shapes.png not written: matplotlib is not installed (pip install 'marglik[plot]')"
    from marglik.applications.additive.plots import plot_shape_functions

    sf, _ = model.shapes(X)
    fig = plot_shape_functions(sf.grid.numpy(), sf.mean.numpy(), sf.std.numpy(), X=X.numpy(),
                               feature_names=model.features, importances=importances)
    fig.savefig(out / "shapes.png", dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    units = (f"logit of p({model.config['classes'][1]!r})" if model.task == "classification"
             else f"{model.config['target']!r} units")
    return f"  shape functions (±2 std bands, {units}): {out}/shapes.png"


def fit_additive_kind(
    prepared: Prepared,
    opts: FitOptions,
    out: Path,
    source: str,
    progress_bar: bool,
    callback: Any,
) -> list[str]:
    """Fit LA-NAM (:func:`marglik.applications.additive.folder.fit_additive_table`), save its
    folder and ``shapes.png``."""
    table = prepared.table
    if table.task == "classification" and len(table.classes) > 2:
        raise CLIError(f"--model additive does binary classification only; target "
                       f"{table.target_name!r} has {len(table.classes)} classes (use --model mlp)")
    d = table.X.shape[1]
    if opts.interactions > d * (d - 1) // 2:
        raise CLIError(f"--interactions must be at most {d * (d - 1) // 2} for {d} features, "
                       f"got {opts.interactions}")
    epochs, every, _ = default_budget(len(table.X), opts.epochs, opts.evidence_every)
    if callback is not None and opts.interactions:  # the second stage runs as many epochs
        print(f"marglik fit: then {epochs} epochs with {opts.interactions} interaction pair(s)",
              file=sys.stderr, flush=True)
        callback = ProgressLines(2 * epochs)
    model, report = fit_additive_table(
        table, tuple(opts.hidden), epochs=epochs, evidence_every=every, lr=opts.lr,
        interactions=opts.interactions, seed=opts.seed, callback=callback,
        progress=progress_bar,
    )
    report["data"] = source
    report["preprocessing"] = prepared.summary
    model.save(out, report)
    importances = report["feature_importances"]
    ranked = sorted(importances.items(), key=lambda kv: -kv[1])
    n_low = sum(v < 0.001 for _, v in ranked)
    n_in = report["n_features"]
    lines = [
        f"marglik fit: {table.task} on {report['n_train']} rows x {n_in} features, LA-NAM "
        f"({n_in} subnetworks 1-{'-'.join(map(str, opts.hidden))}-1"
        + (f", {len(report['pairs'])} pair(s)" if report["pairs"] else "")
        + f"), {epochs} epochs" + (f" + {epochs} with the pairs" if report["pairs"] else "")
        + f" (evidence every {every}) in {report['seconds']:.1f} s",
        f"  log evidence: {report['log_marglik']:.2f}",
        "  feature importance (normalised prior variance 1/delta): "
        + ", ".join(f"{n} {v:.3f}" for n, v in ranked if v >= 0.001 or len(ranked) <= 10)
        + (f" ({n_low} more below 0.001, in report.json)" if n_low and len(ranked) > 10 else ""),
    ]
    if report["pairs"]:
        lines.append("  interaction pairs: " + ", ".join(f"{a} x {b}" for a, b in report["pairs"]))
    if "sigma_noise_original_units" in report:
        lines.append(f"  noise sigma: {report['sigma_noise_original_units']:.4g} "
                     "(original units)")
    lines.append(write_shapes(model, table.X, out, [importances[f] for f in model.features]))
    lines.append(f"  saved to {out}/ ({', '.join((*ADDITIVE_FILES, 'preprocessing.json'))})")
    return lines


def kind_of_folder(folder: str | Path) -> str:
    """The ``"model"`` entry of a folder's ``config.json`` (``"mlp"`` when absent or
    unreadable: :meth:`TabularModel.load` then reports what is wrong)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "mlp"
    kind = config.get("model", "mlp") if isinstance(config, dict) else "mlp"
    if kind not in MODEL_KINDS or MODEL_KINDS[kind].load is None:
        raise CLIError(f"{str(folder)!r} holds a {kind!r} model, which this marglik cannot read")
    return kind


MODEL_KINDS: dict[str, ModelKind] = {
    "mlp": ModelKind(
        "tanh MLP, prior precision (and noise) tuned online by the Laplace evidence",
        fit_mlp,
        TabularModel.load,
    ),
    "additive": ModelKind(
        "Laplace neural additive model (LA-NAM): one small MLP per feature, a prior precision "
        "per feature tuned by the evidence, shape functions with bands in shapes.png; "
        "regression or binary classification",
        fit_additive_kind,
        AdditiveTableModel.load,
    ),
}

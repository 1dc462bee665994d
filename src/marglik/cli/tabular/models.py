"""The model kinds ``marglik fit --model KIND`` can train: a table of name → how to fit.

A kind is a :class:`ModelKind`: a help line and a ``fit`` function that trains on the prepared
table, writes the model folder and returns the lines to print. Adding a kind is one entry in
:data:`MODEL_KINDS` (and, for ``marglik predict``, a ``load`` function reading its folder into
an object with ``features``, ``config`` and ``predict(X) -> TabularPrediction``); a kind whose
``fit`` is None is listed but refused with a one-line error (exit status 2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marglik.applications.tabular import FILES, TabularModel, fit_table
from marglik.applications.tabular.preprocessing import Prepared
from marglik.cli import CLIError
from marglik.cli.tabular.options import FitOptions

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
    "additive": ModelKind("Laplace neural additive model (not available yet)"),
}

"""``marglik fit`` and ``marglik predict``: a hyperparameter-free Bayesian MLP for CSV tables.

The model, its folder format, training and prediction live in
:mod:`marglik.applications.tabular` (usable without the command line); this module parses the
arguments, calls it and prints.

``fit`` reads the CSV with :func:`marglik.data.read_table`, standardises the inputs (and, for
regression, the target), then trains the MLP by online evidence maximisation
(:func:`marglik.training.marglik_training`, Immer et al., ICML 2021, Algorithm 1): Adam on the MAP
objective with the current layer-wise prior precision δ (and noise σ); every ``--evidence-every``
epochs an all-weights KFAC Laplace posterior is fitted and δ (and σ) take 50 Adam steps on its log
marginal likelihood; the state with the highest evidence is kept. Nothing is set by hand but the
architecture and the training budget. The model folder it writes (``--out``) is described in
:mod:`marglik.applications.tabular`.

``predict`` reads the folder and a CSV with the same feature columns (any other columns, e.g. the
target, are ignored) and writes, per row, regression: ``mean``, ``std_with_noise``,
``std_without_noise`` in the target's original units; classification: ``p_<class>`` per class and
the predicted ``label``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from marglik.applications.tabular import (
    BATCH_SIZE,
    FILES,
    FULL_BATCH_MAX,
    TabularModel,
    check_table,
    fit_table,
    read_features,
)
from marglik.cli import CLIError, output_folder
from marglik.data import read_table


def parse_hidden(text: str) -> list[int]:
    """``"50"`` or ``"50,50"`` → widths of the hidden layers."""
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise CLIError(f"--hidden must be positive integers separated by commas, got {text!r}")
    return widths


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal (they go to stderr)."""
    return sys.stderr.isatty()


def _check_threads(threads: int) -> None:
    if threads < 1:
        raise CLIError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


# ---- fit --------------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    hidden = parse_hidden(args.hidden)
    for name in ("epochs", "evidence_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} must be at least 1, got {value}")
    _check_threads(args.threads)
    table = read_table(args.data, args.target, task=args.task)  # DataError: exit 2
    check_table(table, args.data)
    out = output_folder(args.out)

    model, report = fit_table(
        table,
        hidden,
        epochs=args.epochs,
        evidence_every=args.evidence_every,
        lr=args.lr,
        seed=args.seed,
        progress=progress_enabled(),
        source=str(args.data),
    )
    model.save(out, report)

    training, hyper = report["training"], report["hyperparameters"]
    n_in, n_out = report["n_features"], model.config["n_outputs"]
    print(
        f"marglik fit: {table.task} on {report['n_train']} rows x {n_in} features, MLP "
        f"{n_in}-{'-'.join(map(str, hidden))}-{n_out}, {training['epochs']} epochs "
        f"(evidence every {training['evidence_every']}) in {report['seconds']:.1f} s"
    )
    print(f"  log evidence (best, epoch {training['best_epoch']}): {report['log_marglik']:.2f}")
    deltas = ", ".join(
        f"{n}={v:.3g}" for n, v in zip(hyper["prior_precision_layers"], hyper["prior_precision"])
    )
    print(f"  prior precision: {deltas}")
    if "sigma_noise_original_units" in hyper:
        print(f"  noise sigma: {hyper['sigma_noise_original_units']:.4g} (original units)")
    print("  train: " + ", ".join(f"{k} {v:.4f}" for k, v in report["train_metrics"].items()))
    print(f"  saved to {out}/ ({', '.join(FILES)})")
    return 0


# ---- predict ----------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    _check_threads(args.threads)
    model = TabularModel.load(args.model_dir)
    pred = model.predict(read_features(args.data, model.features))
    if pred.probs is not None:
        columns = [f"p_{c}" for c in model.config["classes"]] + ["label"]
        rows = [
            [f"{p:.6g}" for p in ps] + [str(lab)]
            for ps, lab in zip(pred.probs.tolist(), pred.labels)
        ]
    else:
        columns = ["mean", "std_with_noise", "std_without_noise"]
        rows = [
            [f"{m:.6g}", f"{s:.6g}", f"{e:.6g}"]
            for m, s, e in zip(
                pred.mean.tolist(), pred.std_with_noise.tolist(), pred.std_without_noise.tolist()
            )
        ]
    if args.out is None:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        try:
            writer.writerow(columns)
            writer.writerows(rows)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into `head`: stop quietly
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return 0
    try:
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
    except OSError as err:
        raise CLIError(f"cannot write {args.out!r}: {err.strerror}") from None
    print(f"marglik predict: wrote {len(rows)} rows ({', '.join(columns)}) to {args.out}")
    return 0


# ---- registration -----------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit",
        help="train a Bayesian MLP on a CSV table, hyperparameters tuned by the evidence",
        description="Train an MLP on DATA.csv with its prior precision (and noise) tuned by the "
        "Laplace evidence, and save model, posterior and standardiser to --out.",
    )
    fit.add_argument("data", metavar="DATA.csv", help="CSV file with a header row")
    fit.add_argument("--target", required=True, help="name of the target column")
    fit.add_argument(
        "--task",
        choices=["regression", "classification"],
        default=None,
        help="default: inferred (integer targets with <= 20 values or string labels are classes)",
    )
    fit.add_argument("--out", default="marglik-model", help="model folder (default: %(default)s)")
    fit.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: 1000 for tables up to {FULL_BATCH_MAX} rows, trained "
        f"full-batch; 100 for larger ones, in mini-batches of {BATCH_SIZE})",
    )
    fit.add_argument(
        "--evidence-every",
        type=int,
        default=None,
        help="epochs between evidence updates of the hyperparameters (default: epochs / 20)",
    )
    fit.add_argument(
        "--hidden", default="50", help="hidden widths, e.g. 50 or 50,50 (default: %(default)s)"
    )
    fit.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for small MLPs)",
    )
    fit.set_defaults(func=cmd_fit)

    predict = subparsers.add_parser(
        "predict",
        help="predictive means and uncertainties from a 'marglik fit' model",
        description="Write predictions for the rows of DATA.csv as CSV: regression mean and "
        "std (with and without noise, original units); classification class "
        "probabilities and the predicted label.",
    )
    predict.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by 'marglik fit'")
    predict.add_argument("data", metavar="DATA.csv", help="CSV file with the feature columns")
    predict.add_argument("--out", default=None, help="output CSV (default: standard output)")
    predict.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    predict.set_defaults(func=cmd_predict)

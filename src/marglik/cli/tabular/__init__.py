"""``marglik fit`` and ``marglik predict``: Bayesian models for real CSV tables.

The models, their folder format, training and prediction live in
:mod:`marglik.applications.tabular` (usable without the command line); the reading of raw
files — column kinds, one-hot encoding, missing cells — in
:mod:`marglik.applications.tabular.preprocessing`. This package parses and checks the options
(:mod:`.options`), picks the model kind (:mod:`.models`), reports progress (:mod:`.progress`)
and prints.

``fit`` prints a summary of the file (columns, encodings, what was done with missing cells),
warns about options that do nothing, trains (progress lines on stderr when it is not a
terminal, a tqdm bar when it is) and writes the model folder (``--out``) with
``preprocessing.json``, which ``predict`` applies to new files. ``predict`` writes, per row,
regression: ``mean``, ``std_with_noise``, ``std_without_noise`` in the target's original units;
classification: ``p_<class>`` per class and the predicted ``label``; rows it cannot predict
(missing cells of a model fitted with ``--missing drop``) get empty cells.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

import torch

from marglik.applications.tabular import (
    BATCH_SIZE,
    FULL_BATCH_MAX,
    check_table,
    default_budget,
    read_features,
)
from marglik.applications.tabular.preprocessing import (
    MISSING_POLICIES,
    Preprocessing,
    prepare_table,
)
from marglik.cli import CLIError, output_folder
from marglik.cli.tabular.models import MODEL_KINDS, kind_of_folder
from marglik.cli.tabular.options import check_fit_options, check_threads, combination_warnings
from marglik.cli.tabular.progress import ProgressLines, progress_bar_wanted

#: files larger than this (bytes) get a "reading ..." line before they are read
LARGE_FILE = 5_000_000


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _names(text: str | None) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (for --categorical / --ignore)."""
    return [n.strip() for n in (text or "").split(",") if n.strip()]


# ---- fit --------------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    opts = check_fit_options(args)
    kind = MODEL_KINDS[args.model]
    if kind.fit is None:
        raise CLIError(f"--model {args.model} is not available yet in this version of marglik")
    torch.set_num_threads(opts.threads)
    if not args.quiet and _size(args.data) > LARGE_FILE:  # ~10 s per million cells
        print(f"marglik fit: reading {args.data} ...", file=sys.stderr, flush=True)
    prepared = prepare_table(
        args.data, args.target, task=args.task, missing=args.missing,
        categorical=_names(args.categorical), ignore=_names(args.ignore),
    )  # DataError (every problem of the file at once): exit 2
    check_table(prepared.table, args.data)
    for line in prepared.summary:
        print(f"marglik fit: {line}")
    epochs, every, _ = default_budget(len(prepared.table.X), opts.epochs, opts.evidence_every)
    warnings = combination_warnings(opts, epochs, every, prepared.n_missing, args.missing)
    if opts.interactions and args.model != "additive":
        warnings.append(f"--interactions does nothing for --model {args.model}")
    for warning in warnings:
        print(f"marglik fit: warning: {warning}", file=sys.stderr)
    out = output_folder(args.out)
    bar = progress_bar_wanted()
    callback = None if bar or args.quiet else ProgressLines(epochs)
    if callback is not None:
        print(f"marglik fit: training for {epochs} epochs ...", file=sys.stderr, flush=True)
    lines = kind.fit(prepared, opts, out, str(args.data), bar and not args.quiet, callback)
    prepared.preprocessing.save(out)
    print("\n".join(lines))
    return 0


# ---- predict ----------------------------------------------------------------------------------
def _write(columns: list[str], rows: list[list[str]], out: str | None) -> None:
    if out is None:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        try:
            writer.writerow(columns)
            writer.writerows(rows)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into `head`: stop quietly
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return
    try:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
    except OSError as err:
        raise CLIError(f"cannot write {out!r}: {err.strerror}") from None


def _prediction_rows(pred, classes: Sequence | None) -> tuple[list[str], list[list[str]]]:
    if pred.probs is not None:
        columns = [f"p_{c}" for c in classes] + ["label"]
        return columns, [[f"{p:.6g}" for p in ps] + [str(lab)]
                         for ps, lab in zip(pred.probs.tolist(), pred.labels)]
    columns = ["mean", "std_with_noise", "std_without_noise"]
    return columns, [
        [f"{m:.6g}", f"{s:.6g}", f"{e:.6g}"]
        for m, s, e in zip(
            pred.mean.tolist(), pred.std_with_noise.tolist(), pred.std_without_noise.tolist()
        )
    ]


def cmd_predict(args: argparse.Namespace) -> int:
    torch.set_num_threads(check_threads(args.threads))
    model = MODEL_KINDS[kind_of_folder(args.model_dir)].load(args.model_dir)
    preprocessing = Preprocessing.load(args.model_dir)
    if preprocessing is None:  # a folder from before preprocessing.json: numeric columns only
        X = read_features(args.data, model.features)
        kept = torch.ones(len(X), dtype=torch.bool)
    else:
        X, kept, notes = preprocessing.apply(args.data)
        for note in notes:
            print(f"marglik predict: note: {note}", file=sys.stderr)
    pred = model.predict(X)
    columns, predicted = _prediction_rows(pred, model.config.get("classes"))
    rows, it = [], iter(predicted)
    for k in kept.tolist():
        rows.append(next(it) if k else [""] * len(columns))
    _write(columns, rows, args.out)
    if args.out is not None:
        print(f"marglik predict: wrote {len(rows)} rows ({', '.join(columns)}) to {args.out}")
    return 0


# ---- registration -----------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit",
        help="train a Bayesian model on a CSV table, hyperparameters tuned by the evidence",
        description="Train a model on DATA.csv with its prior precision (and noise) tuned by "
        "the Laplace evidence; categorical columns are one-hot encoded, missing cells handled "
        "by --missing; save model, posterior and preprocessing to --out.",
    )
    fit.add_argument("data", metavar="DATA.csv", help="CSV file with a header row")
    fit.add_argument("--target", required=True, help="name of the target column")
    fit.add_argument(
        "--task",
        choices=["regression", "classification"],
        default=None,
        help="default: inferred (integer targets with <= 20 values or string labels are classes)",
    )
    fit.add_argument(
        "--model",
        choices=list(MODEL_KINDS),
        default="mlp",
        help="; ".join(f"{k}: {v.help}" for k, v in MODEL_KINDS.items())
        + " (default: %(default)s)",
    )
    fit.add_argument(
        "--missing",
        choices=MISSING_POLICIES,
        default="error",
        help="empty / NA / NaN cells: report them and stop (error, the default: imputing or "
        "dropping changes the data, so it is your choice), drop their rows, or impute "
        "(training mean / most frequent value; rows with a missing target are dropped)",
    )
    fit.add_argument("--categorical", default=None, metavar="COL[,COL]",
                     help="columns to one-hot encode even though their cells are numbers "
                     "(text columns are categorical anyway)")
    fit.add_argument("--ignore", default=None, metavar="COL[,COL]",
                     help="columns to leave out (e.g. identifiers)")
    fit.add_argument("--out", default="marglik-model", help="model folder (default: %(default)s)")
    fit.add_argument(
        "--epochs",
        default=None,
        help=f"training epochs (default: 1000 for tables up to {FULL_BATCH_MAX} rows, trained "
        f"full-batch; 100 for larger ones, in mini-batches of {BATCH_SIZE})",
    )
    fit.add_argument(
        "--evidence-every",
        default=None,
        help="epochs between evidence updates of the hyperparameters (default: epochs / 20)",
    )
    fit.add_argument(
        "--hidden", default=None,
        help="hidden widths, e.g. 50 or 50,50 (default: 50 for mlp; 64 per feature for "
        "additive)",
    )
    fit.add_argument(
        "--interactions", default="0", metavar="K",
        help="additive: pair subnetworks added in a second stage for the K feature pairs of "
        "highest posterior mutual information (default: %(default)s)",
    )
    fit.add_argument("--lr", default="0.01", help="Adam learning rate (default: %(default)s)")
    fit.add_argument("--seed", default="0", help="random seed, >= 0 (default: %(default)s)")
    fit.add_argument(
        "--threads",
        default="1",
        help="torch CPU threads (default 1: fastest for small MLPs)",
    )
    fit.add_argument("--quiet", action="store_true",
                     help="no progress lines (they go to stderr when it is not a terminal)")
    fit.set_defaults(func=cmd_fit)

    predict = subparsers.add_parser(
        "predict",
        help="predictive means and uncertainties from a 'marglik fit' model",
        description="Write predictions for the rows of DATA.csv as CSV, after the preprocessing "
        "of the fit: regression mean and std (with and without noise, original units); "
        "classification class probabilities and the predicted label.",
    )
    predict.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by 'marglik fit'")
    predict.add_argument("data", metavar="DATA.csv", help="CSV file with the feature columns")
    predict.add_argument("--out", default=None, help="output CSV (default: standard output)")
    predict.add_argument("--threads", default="1", help="torch CPU threads")
    predict.set_defaults(func=cmd_predict)

"""``marglik demo``: the whole pipeline on two data sets that ship with scikit-learn.

1. digits (classification, 1,257 train / 540 test images): a 64-32-32-10 ReLU MLP trained to the
   MAP, then post-hoc Laplace posteriors — all weights (KFAC; full GGN as a check that KFAC is not
   the cause of what we see) and the last layer (KFAC and full) — with layer-wise prior precisions
   tuned by the evidence, and probit or Monte Carlo links.
2. diabetes (regression, 309 train / 133 test patients): a 10-50-1 tanh MLP trained to the MAP
   with a default prior, post-hoc Laplace with δ and σ tuned by the evidence; then the same network
   trained by online evidence maximisation (:func:`marglik.training.marglik_training`), whose
   posterior is used as it comes out of training, next to post-hoc ones at the same weights.

It prints a table (MAP vs Laplace: accuracy or RMSE, NLL, ECE or interval calibration error, log
evidence, seconds) and writes ``summary.json`` and plots (reliability diagrams, evidence traces,
regression predictive intervals) to ``--out``. The headline configurations are fixed, chosen from
measurements documented in ``docs/calibration.md``: the last-layer full-GGN posterior with the
probit link for classification, the evidence-trained all-weights KFAC posterior for regression.

Layout: this module is the command (options, output folder, order of the steps);
:mod:`marglik.cli.demo.experiments` runs the two experiments with their settings;
:mod:`marglik.cli.demo.report` formats the table and writes the plots and ``summary.json``.

Threads: small MLPs run far faster on one thread than on several, so the command sets
``torch.set_num_threads(--threads)`` (default 1). The library itself never changes threads.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from marglik.cli import CLIError, output_folder
from marglik.cli.demo.experiments import run_diabetes, run_digits, settings
from marglik.cli.demo.report import format_scan, format_tables, summary, write_plots


def cmd_demo(args: argparse.Namespace) -> int:
    """Run both experiments, print the table, write the plots and ``summary.json``."""
    if args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise CLIError(
            "the demo's data sets ship with scikit-learn, which is not installed: "
            "pip install 'marglik[data]'"
        ) from None
    out = output_folder(args.out)
    torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
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
        print(format_scan(digits["prior_scan_all_kfac"]))
    try:
        files = write_plots(out, digits, diabetes)
    except ImportError:
        files = []
        print("matplotlib is not installed: no plots (pip install 'marglik[plot]')")
    wall = time.perf_counter() - start
    result = summary(args, cfg, digits, diabetes, table, files, wall)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {', '.join(result['files'])} to {out}/ in {wall:.0f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``marglik demo`` to the command line."""
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

"""``marglik cause-effect``: LOCI on one pair from a CSV file, or on a benchmark folder.

    marglik cause-effect PAIRS.csv --x COL --y COL [--method loci-h|loci-m] [--estimator spline|nn]
                         [--homoscedastic] [--ridge R] [--seed S] [--json]
    marglik cause-effect --benchmark FOLDER [--n-jobs J] [--method ...] [--estimator ...] [--json]

The CSV needs a header row; ``COL`` is a column name (or, if no column has that name, a 0-based
column index). The benchmark folder is in the ANLSMN (``pairs_gt.txt``) or Benchmark_simulated
(``pairmeta.txt``) layout. Heavy imports (numpy, torch, scikit-learn) happen only when the command
runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from marglik.cli import CLIError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cause-effect",
        help="decide x->y or y->x with LOCI (location-scale noise models)",
        description="Cause-effect direction with LOCI (Immer et al., ICML 2023).",
    )
    parser.add_argument("csv", nargs="?", type=Path, help="CSV file with a header row")
    parser.add_argument("--x", help="column of the first variable (name or 0-based index)")
    parser.add_argument("--y", help="column of the second variable (name or 0-based index)")
    parser.add_argument("--benchmark", type=Path, help="folder of pairs (ANLSMN or SIM layout)")
    parser.add_argument("--method", choices=["loci-h", "loci-m"], default="loci-h")
    parser.add_argument("--estimator", choices=["spline", "nn"], default="spline")
    parser.add_argument("--homoscedastic", action="store_true", help="one noise scale")
    parser.add_argument(
        "--ridge",
        type=float,
        default=None,
        help="fixed ridge of the spline estimator (default: chosen by the Laplace evidence)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=1, help="worker processes (--benchmark)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.csv is None) == (args.benchmark is None):
        raise CLIError("give either a CSV file (with --x and --y) or --benchmark FOLDER")
    options = {
        "method": args.method,
        "estimator": args.estimator,
        "homoscedastic": args.homoscedastic,
        "seed": args.seed,
    }
    if args.ridge is not None:
        if args.estimator != "spline":
            raise CLIError("--ridge applies to --estimator spline only")
        if not args.ridge > 0:
            raise CLIError(f"--ridge must be positive, got {args.ridge}")
        options["estimator_options"] = {"ridge": args.ridge}
    if args.benchmark is not None:
        return run_benchmark(args, options)
    if not args.x or not args.y:
        raise CLIError("--x and --y name the two columns of the CSV file")
    x, y = read_columns(args.csv, args.x, args.y)

    from marglik.applications.causal.loci import check_pair, loci

    try:
        check_pair(x, y, names=(f"column {args.x!r}", f"column {args.y!r}"))
        result = loci(x, y, **options)
    except ValueError as err:
        raise CLIError(f"{args.csv}: {err}") from None
    if args.json:
        payload = {"direction": result.direction, "score": result.score}
        payload.update(confidence=result.confidence, method=args.method, n=len(x))
        payload.update(estimator=args.estimator, homoscedastic=args.homoscedastic)
        print(json.dumps(payload))
    else:
        cause, effect = (args.x, args.y) if result.direction == "x->y" else (args.y, args.x)
        print(f"{cause} -> {effect}  (confidence {result.confidence:.4g}, {args.method})")
    return 0


def read_columns(path: Path, col_x: str, col_y: str) -> tuple[list[float], list[float]]:
    """Two numeric columns of a CSV file with a header row; CLIError on any problem.

    The file is read by :func:`marglik.data.tabular.read_csv_rows` (the reading step of
    :func:`~marglik.data.read_table`); only the two columns are parsed, so other columns may hold
    anything. ``col_x``/``col_y`` name a column, or give its 0-based index.
    """
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    from marglik.data.tabular import DataError, read_csv_rows

    try:
        header, rows, lines = read_csv_rows(path)
    except DataError as err:
        raise CLIError(str(err)) from None
    columns = []
    for col in (col_x, col_y):
        if col in header:
            columns.append(header.index(col))
        elif col.isdigit() and int(col) < len(header):
            columns.append(int(col))
        else:
            raise CLIError(f"{path}: no column {col!r} (columns: {', '.join(header)})")
    values: tuple[list[float], list[float]] = ([], [])
    for line, row in zip(lines, rows, strict=True):
        if not any(cell.strip() for cell in row):
            continue  # a row of empty cells
        for out, index, name in zip(values, columns, (col_x, col_y), strict=True):
            if index >= len(row):
                raise CLIError(f"{path}: line {line} has no value for column {name!r}")
            try:
                out.append(float(row[index]))
            except ValueError:
                raise CLIError(
                    f"{path}: line {line}, column {name!r}: non-numeric value {row[index]!r}"
                ) from None
    return values


def run_benchmark(args: argparse.Namespace, options: dict) -> int:
    import numpy as np

    from marglik.applications.causal.data import load_benchmark
    from marglik.applications.causal.loci import loci_batch
    from marglik.applications.causal.metrics import accuracy, audrc

    try:
        pairs = load_benchmark(args.benchmark)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    if not pairs:
        raise CLIError(f"{args.benchmark}: no pairs found")
    try:
        results = loci_batch([(p.x, p.y) for p in pairs], n_jobs=args.n_jobs, **options)
    except ValueError as err:
        raise CLIError(f"{args.benchmark}: {err}") from None
    pred = [r.direction for r in results]
    truth = [p.truth for p in pairs]
    weights = [p.weight for p in pairs]
    correct = [a == b for a, b in zip(pred, truth, strict=True)]
    summary = {
        "benchmark": str(args.benchmark),
        "n_pairs": len(pairs),
        "method": args.method,
        "estimator": args.estimator,
        "homoscedastic": args.homoscedastic,
        "accuracy": accuracy(pred, truth, weights),
        "audrc": audrc(np.array([r.confidence for r in results]), correct, weights),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.benchmark}: {len(pairs)} pairs, accuracy {summary['accuracy']:.3f}, "
            f"AUDRC {summary['audrc']:.3f} ({args.method}, {args.estimator})"
        )
    return 0

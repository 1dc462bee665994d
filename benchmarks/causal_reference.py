"""LOCI reference mode and the evidence variants on the development sets (issue #20).

For every dataset (AN, LS, MN-U, SIM, SIM-c from ``/work/shared/data/cause-effect``; Tübingen from
``cdt``, weighted, the 97 pairs of the LOCI evaluation) and configuration:

- ``ref-spline``: the authors' spline estimator (docs/causal.md §1), LOCI_M / LOCI_H (and LOCI_E
  from its evidence at the fixed ridge);
- ``spline``: the spline with its ridge chosen by the evidence (marglik's default);
- ``spline-ev``: knots and ridge chosen by the evidence (docs/causal.md §2) — LOCI_E with it is
  the headline fixed before the run;
- ``ref-nn``: the authors' neural estimator (5,000 float64 Adam steps, cosine schedule), both
  directions of all pairs of a dataset fitted as one batched model (:func:`loci_many`).

One process, one thread (``--jobs N``: N single-threaded processes over the (dataset,
configuration) tasks, the reference NN's first). Prints one JSON line per (dataset,
configuration, rule) with accuracy and AUDRC (weighted on Tübingen), then a summary;
``--markdown`` writes the table.
``--nn-dtype float32`` runs the reference NN's hidden-layer work in float32 (faster; docs/causal.md
§3). ``--speed K``
instead times the reference NN on the first K pairs of ``--speed-set`` one pair at a time
(:func:`loci`), batched (:func:`loci_many`) and batched in float32, at ``--nn-steps`` steps, and
prints pairs per second for each.

    python benchmarks/causal_reference.py --markdown /tmp/causal-ref.md
    python benchmarks/causal_reference.py --speed 20 --speed-set SIM --nn-steps 500
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from causal import DATASETS, load  # benchmarks/causal.py: the sets and their loading

from marglik.applications.causal.loci import loci, loci_many, single_threaded
from marglik.applications.causal.metrics import accuracy, audrc

#: configuration -> (estimator, reference mode)
CONFIGS = {  # in the order they run
    "ref-spline": ("spline", True),
    "spline": ("spline", False),
    "spline-ev": ("spline-ev", False),
    "ref-nn": ("nn", True),
}
#: run by default (``spline``'s LOCI_M / LOCI_H rows are in RESULTS-causal.md already)
DEFAULT = ["ref-spline", "spline-ev", "ref-nn"]
RULES = ("loci-m", "loci-h", "loci-e")
#: best published baseline accuracy (%) per set, methods.md §8 (the authors' result files)
BEST_BASELINE = {"AN": 100, "LS": 100, "MN-U": 99, "SIM": 78, "SIM-c": 82, "Tuebingen": 82}
# (from the authors' baseline_results/*.tab, RESIT_std·GroundTruth > 0 gives SIM 77 for RESIT)


def run_config(pairs, config: str, args) -> list:
    estimator, reference = CONFIGS[config]
    common = {"method": "loci-h", "estimator": estimator, "reference": reference}
    common["all_scores"] = True
    if estimator == "nn":
        common["estimator_options"] = {"steps": args.nn_steps, **nn_work(args)}
        common["max_fit_points"] = args.nn_fit_points or None
        return loci_many([(p.x, p.y) for p in pairs], **common)
    return [loci(p.x, p.y, **common) for p in pairs]


def run_task(task) -> tuple:
    """One (dataset, configuration): (name, config, pairs, results, (wall s, CPU s))."""
    name, config, pairs, args = task
    t0, c0 = time.perf_counter(), time.process_time()
    results = run_config(pairs, config, args)
    took = (round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1))
    return name, config, pairs, results, took


def run_tasks(tasks: list, jobs: int):
    """Yield :func:`run_task` of every task: in order in this process (``jobs`` = 1), or as they
    finish in ``jobs`` spawned single-threaded processes, the reference NN's tasks (the dearest)
    first, so that the processes finish together."""
    if jobs == 1:
        yield from map(run_task, tasks)
        return
    order = sorted(tasks, key=lambda t: (CONFIGS[t[1]][0] != "nn", -len(t[2])))
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=single_threaded) as pool:
        yield from pool.imap_unordered(run_task, order)


def nn_work(args) -> dict:
    """The reference NN's speed settings from the command line: compute dtype, chunk."""
    return {"compute_dtype": getattr(torch, args.nn_dtype), "chunk": args.nn_chunk}


def score_rows(name, pairs, config, results) -> list[dict]:
    truth = [p.truth for p in pairs]
    weights = [p.weight for p in pairs]
    rows = []
    for rule in RULES:
        if rule not in results[0].details["scores"]:
            continue
        scores = [r.details["scores"][rule] for r in results]
        pred = ["x->y" if s >= 0 else "y->x" for s in scores]
        correct = [p == t for p, t in zip(pred, truth, strict=True)]
        rows.append(
            {
                "dataset": name,
                "config": config,
                "rule": rule,
                "n_pairs": len(pairs),
                "accuracy": accuracy(pred, truth, weights),
                "audrc": audrc(np.abs(scores), correct, weights),
            }
        )
    return rows


def speed(args) -> None:
    """Pairs per second of the reference NN: one pair at a time (float64), batched in float64
    and batched with float32 hidden-layer work, on the first ``args.speed`` pairs of
    ``--speed-set``."""
    pairs = [(p.x, p.y) for p in load(args.speed_set, args.speed)]
    options = {"estimator": "nn", "reference": True, "max_fit_points": args.nn_fit_points or None}
    runs = {
        "one_at_a_time_float64": (False, {}),
        "batched_float64": (True, {}),
        "batched_float32": (True, {"compute_dtype": torch.float32}),
    }
    row: dict = {"speed_set": args.speed_set, "speed_pairs": len(pairs), "nn_steps": args.nn_steps}
    scores = {}
    for name, (batched, extra) in runs.items():
        opts = {**options, "estimator_options": {"steps": args.nn_steps, "chunk": args.nn_chunk}}
        opts["estimator_options"].update(extra)
        start = time.perf_counter()
        if batched:
            results = loci_many(pairs, **opts)
        else:
            results = [loci(x, y, **opts) for x, y in pairs]
        seconds = time.perf_counter() - start
        scores[name] = np.array([r.score for r in results])
        row[f"{name}_pairs_per_s"] = round(len(pairs) / seconds, 3)
        row[f"{name}_s"] = round(seconds, 2)
    exact = scores["one_at_a_time_float64"]
    for name in ("batched_float64", "batched_float32"):
        row[f"max_score_difference_{name}"] = float(np.abs(scores[name] - exact).max())
    row["float32_same_decisions"] = int(((scores["batched_float32"] >= 0) == (exact >= 0)).sum())
    row["load_average"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--configs", nargs="+", default=DEFAULT, choices=list(CONFIGS))
    parser.add_argument("--nn-steps", type=int, default=5000)
    parser.add_argument("--nn-fit-points", type=int, default=2000)
    parser.add_argument(
        "--nn-dtype",
        choices=["float64", "float32"],
        default="float64",
        help="dtype of the reference NN's hidden-layer work (float64: authors')",
    )
    parser.add_argument("--nn-chunk", type=int, default=4, help="networks per batched chunk")
    parser.add_argument("--speed-set", choices=DATASETS, default="AN")
    parser.add_argument("--subset", type=int, default=None, help="first K pairs of every set")
    parser.add_argument("--every", type=int, default=1, help="every K-th pair of every set only")
    parser.add_argument("--start", type=int, default=0, help="first pair index for --every")
    parser.add_argument("--speed", type=int, default=0, help="time K pairs instead (see above)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes, one thread each (one per core)"
    )
    parser.add_argument("--pairs-out", type=Path, default=None, help="per-pair scores (JSON lines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.speed:
        speed(args)
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    data = {name: load(name, args.subset)[args.start :: args.every] for name in args.datasets}
    tasks = [(name, config, pairs, args) for config in args.configs
             for name, pairs in data.items()]  # the cheap spline configurations first
    rows, seconds, cpu_seconds = [], {}, {}
    start = time.perf_counter()
    for name, config, pairs, results, (took, cpu) in run_tasks(tasks, args.jobs):
        seconds[f"{name}/{config}"] = took
        cpu_seconds[f"{name}/{config}"] = cpu
        if args.pairs_out:
            with args.pairs_out.open("a") as f:
                for p, r in zip(pairs, results, strict=True):
                    line = {"dataset": name, "config": config, "pair": p.name}
                    line.update(truth=p.truth, weight=p.weight, scores=r.details["scores"])
                    f.write(json.dumps(line) + "\n")
        for row in score_rows(name, pairs, config, results):
            row["seconds"] = took
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "wall_s": round(time.perf_counter() - start, 1),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_s": round(sum(cpu_seconds.values()), 1),
        "nn_steps": args.nn_steps,
        "nn_fit_points": args.nn_fit_points,
        "nn_dtype": args.nn_dtype,
        "nn_chunk": args.nn_chunk,
        "jobs": args.jobs,
        "every": args.every,
        "start": args.start,
        "commit": commit.stdout.strip(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    print(json.dumps(summary), flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(rows, list(data), summary, argv))
    return 0


def markdown(rows, names, summary, argv) -> str:
    table = {(r["dataset"], r["config"], r["rule"]): r for r in rows}
    head = "| configuration | rule | " + " | ".join(names) + " |\n|---|---|"
    body = head + "---|" * len(names) + "\n"
    for config in CONFIGS:
        for rule in RULES:
            cells = [table.get((n, config, rule)) for n in names]
            if not any(cells):
                continue
            text = [
                f"{100 * c['accuracy']:.0f} / {100 * c['audrc']:.0f}" if c else "–" for c in cells
            ]
            body += f"| {config} | {rule} | " + " | ".join(text) + " |\n"
    body += "| best published baseline | | " + " | ".join(
        str(BEST_BASELINE.get(n, "–")) for n in names
    )
    command = "python benchmarks/causal_reference.py " + " ".join(argv or sys.argv[1:])
    return (
        "Cells: accuracy % / AUDRC %.\n\n"
        + body
        + f" |\n\n- command: `{command}`\n- summary: `{json.dumps(summary)}`\n"
    )


if __name__ == "__main__":
    sys.exit(main())

"""LOCI on the cause–effect benchmarks: accuracy and AUDRC per dataset, estimator and decision rule.

Datasets: AN, LS, MN-U (ANLSMN layout), SIM, SIM-c (Benchmark_simulated) from
``/work/shared/data/cause-effect`` and the Tübingen pairs shipped in ``cdt`` (weighted accuracy
over the pairs with ``used_in_LOCI_eval`` True). For each pair and each configuration (``spline``,
``spline-homo``, ``nn``, ``nn-evidence``, ``nn-homo``) one
:func:`marglik.applications.causal.loci` call with ``method="loci-h"`` fits both directions once
and yields both the LOCI_H and LOCI_M scores.

- The spline ridge is chosen per pair and direction by the Laplace evidence of that fit's own data
  (``--spline-ridge R`` fixes it instead).
- NN fits of pairs above ``--nn-fit-points`` (2000) points use a seeded random subset of that size
  (the scores still use all points; HSIC subsamples to 2000 points anyway).
- ``nn-evidence`` (Laplace-evidence training with layer-wise priors) costs about 5× the plain NN
  fit, so it runs on every ``--evidence-every``-th pair only (10 by default); the table then adds
  the plain NN's rows on the same pairs for a like-for-like comparison.
- ``nn-homo`` is not run by default (time); ``spline-homo`` gives the homoscedastic (ANM) rows.

Every (dataset, pair, configuration) task goes to one pool of ``--jobs`` spawned, single-threaded
worker processes (most expensive first, for load balance). Prints one JSON line per result row and
a summary (wall time, summed task times per configuration, chosen ridges, load average), and
writes a Markdown table (``--markdown``).

    python benchmarks/causal.py --jobs 2 --markdown /tmp/causal-table.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from marglik.applications.causal.data import load_benchmark, load_tuebingen
from marglik.applications.causal.loci import loci, single_threaded
from marglik.applications.causal.metrics import accuracy, audrc

DATA = Path(os.environ.get("MARGLIK_CAUSE_EFFECT", "/work/shared/data/cause-effect"))
FOLDERS = {
    "AN": "ANLSMN_pairs/AN",
    "LS": "ANLSMN_pairs/LS",
    "MN-U": "ANLSMN_pairs/MN-U",
    "SIM": "Benchmark_simulated/SIM",
    "SIM-c": "Benchmark_simulated/SIM-c",
}
DATASETS = [*FOLDERS, "Tuebingen"]
#: configuration name -> (estimator, homoscedastic, Laplace-evidence NN training)
CONFIGS = {
    "spline": ("spline", False, False),
    "spline-homo": ("spline", True, False),
    "nn": ("nn", False, False),
    "nn-evidence": ("nn", False, True),
    "nn-homo": ("nn", True, False),
}
#: run by default (nn-homo is left out for time: it repeats spline-homo's ANM test, see RESULTS)
DEFAULT_CONFIGS = ["spline", "spline-homo", "nn", "nn-evidence"]
#: published accuracies (%) from methods.md §8 (the LOCI authors' result files)
BASELINES = {
    "QCCD": {"Tuebingen": 77, "LS": 100, "MN-U": 99, "SIM": 62, "AN": 100},
    "GRCI": {"Tuebingen": 82, "LS": 98, "MN-U": 88, "SIM": 77, "AN": 100},
    "CAM": {"Tuebingen": 58, "LS": 100, "MN-U": 86, "SIM": 57, "AN": 100},
    "IGCI": {"Tuebingen": 68},
    "RESIT": {"Tuebingen": 57, "LS": 61, "MN-U": 2, "SIM": 77, "AN": 100},
}


def load(name: str, subset: int | None):
    if name == "Tuebingen":
        pairs = load_tuebingen(DATA / "tuebingen_cdt_weights.tsv", loci_eval_only=True)
    else:
        pairs = load_benchmark(DATA / FOLDERS[name])
    return pairs[:subset] if subset else pairs


def run_task(task):
    dataset, index, x, y, config, args = task
    estimator, homoscedastic, evidence = CONFIGS[config]
    if estimator == "nn":
        options = {"steps": args.nn_steps, "evidence": evidence}
        fit_points = args.nn_fit_points or None
    else:
        options = {} if args.spline_ridge is None else {"ridge": args.spline_ridge}
        fit_points = None
    start, cpu = time.perf_counter(), time.process_time()
    result = loci(
        x,
        y,
        method="loci-h",
        estimator=estimator,
        homoscedastic=homoscedastic,
        seed=args.seed,
        estimator_options=options,
        max_fit_points=fit_points,
    )
    seconds = (time.perf_counter() - start, time.process_time() - cpu)
    return dataset, index, config, result, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--nn-steps", type=int, default=1000)
    parser.add_argument(
        "--nn-fit-points",
        type=int,
        default=2000,
        help="NN fits use a seeded random subset of this many points of larger pairs (0: all)",
    )
    parser.add_argument(
        "--spline-ridge",
        type=float,
        default=None,
        help="fixed spline ridge (default: chosen per pair and direction by the evidence)",
    )
    parser.add_argument(
        "--evidence-every",
        type=int,
        default=10,
        help="nn-evidence runs on every K-th pair of each dataset only (1: all pairs)",
    )
    parser.add_argument("--subset", type=int, default=None, help="first K pairs of every dataset")
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)

    data = {name: load(name, args.subset) for name in args.datasets}
    tasks = [
        (name, i, p.x, p.y, config, args)
        for name, pairs in data.items()
        for config in args.configs
        for i in pairs_of(config, len(pairs), args.evidence_every)
        for p in [pairs[i]]
    ]
    # most expensive first so the pool does not end on one big pair
    cost = {"spline": 1, "spline-homo": 1, "nn": 20, "nn-homo": 20, "nn-evidence": 50}
    tasks.sort(key=lambda t: -(min(len(t[2]), args.nn_fit_points or len(t[2])) * cost[t[4]]))
    start = time.perf_counter()
    results: dict = {}
    task_wall: dict = dict.fromkeys(args.configs, 0.0)
    task_cpu = 0.0
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, initializer=single_threaded) as pool:
        for done, output in enumerate(pool.imap_unordered(run_task, tasks), start=1):
            dataset, i, config, result, seconds = output
            results[(dataset, config, i)] = result
            task_wall[config] += seconds[0]
            task_cpu += seconds[1]
            if done % max(len(tasks) // 20, 1) == 0:
                elapsed = time.perf_counter() - start
                print(f"{done}/{len(tasks)} tasks, {elapsed:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    rows = []
    for name, pairs in data.items():
        for config in args.configs:
            index = pairs_of(config, len(pairs), args.evidence_every)
            # the plain NN on the evidence subset, for a like-for-like comparison
            compare = [config] + (
                ["nn"] if config == "nn-evidence" and "nn" in args.configs else []
            )
            for source in compare:
                for method in ("loci-m", "loci-h"):
                    row = score_row(results, pairs, index, source, method, name)
                    row["config"] = config if source == config else "nn (evidence pairs)"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    ridges = {}
    for config in ("spline", "spline-homo"):
        chosen = [
            r.details[f"ridge_{d}"]
            for (_, c, _), r in results.items()
            if c == config
            for d in ("x->y", "y->x")
            if f"ridge_{d}" in r.details
        ]
        if chosen:
            values, counts = np.unique(chosen, return_counts=True)
            ridges[config] = {f"{v:.0e}": int(c) for v, c in zip(values, counts, strict=True)}
    summary = {
        "wall_s": round(wall, 1),
        "task_wall_sum_s": {c: round(v, 1) for c, v in task_wall.items()},
        "task_cpu_s": round(task_cpu, 1),
        "jobs": args.jobs,
        "nn_steps": args.nn_steps,
        "nn_fit_points": args.nn_fit_points,
        "spline_ridge": args.spline_ridge or "evidence",
        "chosen_ridges": ridges,
        "evidence_every": args.evidence_every,
        "subset": args.subset,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(summary), flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(rows, data, args.configs, summary, argv))
    return 0


def pairs_of(config: str, n_pairs: int, every: int) -> list[int]:
    """Indices of the pairs a configuration runs on (nn-evidence: every ``every``-th pair)."""
    return list(range(0, n_pairs, every if config == "nn-evidence" else 1))


def score_row(results, pairs, index, config, method, name) -> dict:
    """Accuracy and AUDRC of one (dataset, configuration, decision rule) over pairs ``index``."""
    truth = [pairs[i].truth for i in index]
    weights = [pairs[i].weight for i in index]  # all 1 except Tübingen
    scores = [results[(name, config, i)].details["scores"][method] for i in index]
    pred = ["x->y" if v >= 0 else "y->x" for v in scores]
    correct = [p == t for p, t in zip(pred, truth, strict=True)]
    return {
        "dataset": name,
        "method": method,
        "config": config,
        "n_pairs": len(index),
        "accuracy": accuracy(pred, truth, weights),
        "audrc": audrc(np.abs(scores), correct, weights),
    }


LABELS = {
    "spline": "spline",
    "spline-homo": "spline (homosc.)",
    "nn": "NN",
    "nn-evidence": "NN+evidence †",
    "nn (evidence pairs)": "NN on the † pairs",
    "nn-homo": "NN (homosc.)",
}


def markdown(rows, data, configs, summary, argv) -> str:
    import torch

    names = list(data)
    table = {(r["dataset"], r["method"], r["config"]): r for r in rows}
    order = [c for c in LABELS if c in {r["config"] for r in rows}]
    order.sort(key=lambda c: c.endswith("homo"))  # homoscedastic rows last
    head = "| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    body = ""
    for config in order:
        for method in ("loci-m", "loci-h"):
            cells = []
            for n in names:
                r = table[(n, method, config)]
                cells.append(f"{100 * r['accuracy']:.0f} / {100 * r['audrc']:.0f}")
            rule = {"loci-m": "LOCI_M", "loci-h": "LOCI_H"}[method]
            body += f"| {rule} {LABELS[config]} | " + " | ".join(cells) + " |\n"
    for base, accs in BASELINES.items():
        body += (
            f"| {base} (published) | "
            + " | ".join(f"{accs[n]}" if n in accs else "–" for n in names)
            + " |\n"
        )
    counts = {
        n: table[(n, "loci-m", "nn-evidence")]["n_pairs"] for n in names if "nn-evidence" in configs
    }
    command = "python benchmarks/causal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return (
        "Cells: accuracy % / AUDRC % (ours); published rows: accuracy % only.\n"
        + (f"† every {summary['evidence_every']}-th pair only: {counts}\n" if counts else "")
        + "\n"
        + head
        + body
        + f"\n- command: `{command}`\n- date: {date.today()}\n"
        + f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}\n"
        + f"- torch {torch.__version__}, numpy {np.__version__}\n"
        + f"- wall {summary['wall_s']} s with {summary['jobs']} processes; "
        + f"load average at the end {summary['load_average']}\n"
        + f"- summary: `{json.dumps(summary)}`\n"
    )


if __name__ == "__main__":
    sys.exit(main())

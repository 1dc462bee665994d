"""LOCI on the cause–effect benchmarks: accuracy and AUDRC per dataset, estimator and decision rule.

Datasets: AN, LS, MN-U (ANLSMN layout), SIM, SIM-c (Benchmark_simulated) from
``/work/shared/data/cause-effect`` and the Tübingen pairs shipped in ``cdt`` (weighted accuracy
over the pairs with ``used_in_LOCI_eval`` True). For each pair and each estimator configuration
(spline / nn, heteroscedastic / homoscedastic) one :func:`marglik.causal.loci` call with
``method="loci-h"`` fits both directions once and yields both the LOCI_H and LOCI_M scores.

Every (dataset, pair, configuration) task goes to one pool of ``--jobs`` spawned, single-threaded
worker processes (largest pairs first, for load balance). Prints one JSON line per result row and
writes a Markdown table (``--markdown``).

    python benchmarks/causal.py --jobs 2 --nn-steps 1000 --markdown /tmp/causal-table.md
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

from marglik.causal.data import load_benchmark, load_tuebingen
from marglik.causal.loci import loci, single_threaded
from marglik.causal.metrics import accuracy, audrc

DATA = Path(os.environ.get("MARGLIK_CAUSE_EFFECT", "/work/shared/data/cause-effect"))
FOLDERS = {
    "AN": "ANLSMN_pairs/AN",
    "LS": "ANLSMN_pairs/LS",
    "MN-U": "ANLSMN_pairs/MN-U",
    "SIM": "Benchmark_simulated/SIM",
    "SIM-c": "Benchmark_simulated/SIM-c",
}
DATASETS = [*FOLDERS, "Tuebingen"]
#: (estimator, homoscedastic) configurations
CONFIGS = [("spline", False), ("spline", True), ("nn", False), ("nn", True)]
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
    dataset, index, x, y, estimator, homoscedastic, nn_steps, seed = task
    options = {"steps": nn_steps} if estimator == "nn" else {}
    start, cpu = time.perf_counter(), time.process_time()
    result = loci(
        x,
        y,
        method="loci-h",
        estimator=estimator,
        homoscedastic=homoscedastic,
        seed=seed,
        estimator_options=options,
    )
    seconds = (time.perf_counter() - start, time.process_time() - cpu)
    return dataset, index, estimator, homoscedastic, result, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--nn-steps", type=int, default=1000)
    parser.add_argument("--subset", type=int, default=None, help="first K pairs of every dataset")
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[f"{e}{'-homo' if h else ''}" for e, h in CONFIGS],
        choices=[f"{e}{'-homo' if h else ''}" for e, h in CONFIGS],
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)

    configs = [(c.removesuffix("-homo"), c.endswith("-homo")) for c in args.configs]
    data = {name: load(name, args.subset) for name in args.datasets}
    tasks = [
        (name, i, p.x, p.y, est, homo, args.nn_steps, args.seed)
        for name, pairs in data.items()
        for i, p in enumerate(pairs)
        for est, homo in configs
    ]
    # largest first (nn before spline at equal size) so the pool does not end on one big pair
    tasks.sort(key=lambda t: -(len(t[2]) * (20 if t[4] == "nn" else 1)))
    start = time.perf_counter()
    results: dict = {}
    task_wall, task_cpu = 0.0, 0.0
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, initializer=single_threaded) as pool:
        for done, output in enumerate(pool.imap_unordered(run_task, tasks), start=1):
            dataset, i, est, homo, result, seconds = output
            results[(dataset, est, homo, i)] = result
            task_wall, task_cpu = task_wall + seconds[0], task_cpu + seconds[1]
            if done % max(len(tasks) // 20, 1) == 0:
                elapsed = time.perf_counter() - start
                print(f"{done}/{len(tasks)} tasks, {elapsed:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    rows = []
    for name, pairs in data.items():
        truth = [p.truth for p in pairs]
        weights = [p.weight for p in pairs]  # all 1 except Tübingen
        for est, homo in configs:
            for method in ("loci-m", "loci-h"):
                scores = [
                    results[(name, est, homo, i)].details["scores"][method]
                    for i in range(len(pairs))
                ]
                pred = ["x->y" if s >= 0 else "y->x" for s in scores]
                correct = [p == t for p, t in zip(pred, truth, strict=True)]
                row = {
                    "dataset": name,
                    "method": method,
                    "estimator": est,
                    "homoscedastic": homo,
                    "n_pairs": len(pairs),
                    "accuracy": accuracy(pred, truth, weights),
                    "audrc": audrc(np.abs(scores), correct, weights),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {
        "wall_s": round(wall, 1),
        "task_wall_sum_s": round(task_wall, 1),
        "task_cpu_s": round(task_cpu, 1),
        "jobs": args.jobs,
        "nn_steps": args.nn_steps,
        "subset": args.subset,
    }
    print(json.dumps(summary), flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(rows, data, configs, summary, argv))
    return 0


def label(method: str, est: str, homo: bool) -> str:
    rule = {"loci-m": "LOCI_M", "loci-h": "LOCI_H"}[method]
    return f"{rule} {'spline' if est == 'spline' else 'NN'}{' (homosc.)' if homo else ''}"


def markdown(rows, data, configs, summary, argv) -> str:
    import torch

    names = list(data)
    table = {(r["dataset"], r["method"], r["estimator"], r["homoscedastic"]): r for r in rows}
    head = "| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    body = ""
    for homo in (False, True):
        for est, h in configs:
            if h != homo:
                continue
            for method in ("loci-m", "loci-h"):
                cells = []
                for n in names:
                    r = table[(n, method, est, homo)]
                    cells.append(f"{100 * r['accuracy']:.0f} / {100 * r['audrc']:.0f}")
                body += f"| {label(method, est, homo)} | " + " | ".join(cells) + " |\n"
    for base, accs in BASELINES.items():
        body += (
            f"| {base} (published) | "
            + " | ".join(f"{accs[n]}" if n in accs else "–" for n in names)
            + " |\n"
        )
    command = "python benchmarks/causal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return (
        "Cells: accuracy % / AUDRC % (ours); published rows: accuracy % only.\n\n"
        + head
        + body
        + f"\n- command: `{command}`\n- date: {date.today()}\n"
        + f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}\n"
        + f"- torch {torch.__version__}, numpy {np.__version__}\n"
        + f"- wall {summary['wall_s']} s with {summary['jobs']} processes; "
        + f"NN steps {summary['nn_steps']}; subset {summary['subset'] or 'all pairs'}\n"
    )


if __name__ == "__main__":
    sys.exit(main())

"""Tables and plots of ``benchmarks/invariance.py``'s JSON lines (issue 13), over seeds.

    python benchmarks/invariance.py --report RESULTS.jsonl [--plot FIGURE.png]

Cells with the same (data, N, net, method, S, epochs, η's lr) are grouped: each number is the
mean ± standard error (sample standard deviation / √k) over the k seeds present (the mean alone
when k = 1). The learned extents are those of the evaluated model (``eta``: the state with the
best evidence that ``marglik_training`` restores; the last epoch's for Augerino). Then the
targets of issue 13, per seed, from the LILA and no-augmentation cells of the same (N, net,
seed, epochs):

- rotated: rotation extent > 2.5 rad and accuracy ≥ 3 points above no augmentation;
- mnist (upright): rotation extent < 0.8 rad and accuracy not below no augmentation;
- translated: both translation extents above their initial 0.1 (half-image units) and the
  rotation extent below 0.8 rad (learns translation, not rotation).

``--plot``: the learned extents over training, one panel per LILA group (thin lines per seed,
thick the mean); and next to it ``*_rotated5k.png``: rotated MNIST at 5,000 points, one panel
per net, every seed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable

GENERATORS = ("translate_x", "translate_y", "rotate", "scale_x", "scale_y", "shear")
DATA_ORDER = {"mnist": 0, "rotated": 1, "translated": 2}
METHOD_ORDER = {"none": 0, "fixed": 1, "augerino": 2, "lila": 3}
ROTATED_MIN, UPRIGHT_MAX, GAIN, TRANSLATE_INIT = 2.5, 0.8, 0.03, 0.1


def load(path: str) -> tuple[list[dict], list[dict]]:
    """(cell records, preset records) of a JSON-lines file."""
    lines = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in lines if "dataset" in r], [r for r in lines if "preset" in r]


def group_key(r: dict) -> tuple:
    return (r["net"], r["n_train"], DATA_ORDER.get(r["dataset"], 9), r["dataset"],
            METHOD_ORDER.get(r["method"], 9), r["method"], r["S"], r["epochs"],
            r.get("lr_eta"))


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[group_key(r)].append(r)
    return dict(sorted(out.items(), key=lambda kv: kv[0][:8] + (kv[0][8] or 0.0,)))


def mean_se(values: list[float], digits: int) -> str:
    """"m ± s.e." over the values (the mean alone for one value)."""
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) / math.sqrt(len(values)):.{digits}f}"


def cell(rows: list[dict], get: Callable[[dict], float | None], digits: int) -> str:
    values = [get(r) for r in rows]
    return "–" if any(v is None for v in values) else mean_se(values, digits)


def extent(name: str) -> Callable[[dict], float | None]:
    return lambda r: r["eta"].get(name)


def cpu_per_epoch(r: dict) -> float | None:
    return r["cpu_seconds"] / r["epochs"] if "cpu_seconds" in r else None


def table(rows: list[dict]) -> None:
    print("| data | N | net | method | S | epochs | seeds | test acc | test NLL | rotate | "
          "translate x / y | scale x / y | shear | θ s/epoch | evidence s/epoch | CPU s/epoch |")
    print("|" + "---|" * 16)
    for key, rs in groups(rows).items():
        net, n, _, dataset, _, method, S, epochs, _ = key
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        e = {g: cell(rs, extent(g), 2) for g in GENERATORS}
        print(f"| {dataset} | {n} | {net} | {method} | {S} | {epochs} | {seeds} | "
              f"{cell(rs, lambda r: r['test_acc'], 4)} | {cell(rs, lambda r: r['test_nll'], 3)} "
              f"| {e['rotate']} | {e['translate_x']} / {e['translate_y']} | {e['scale_x']} / "
              f"{e['scale_y']} | {e['shear']} | {cell(rs, lambda r: r['epoch_seconds'], 2)} | "
              f"{cell(rs, lambda r: r['hyper_seconds'], 2)} | "
              f"{cell(rs, cpu_per_epoch, 2)} |")


def target(dataset: str, lila: dict, none: dict) -> tuple[str, bool]:
    """(what was measured, met?) for one seed's LILA and no-augmentation cells."""
    eta, gain = lila["eta"], lila["test_acc"] - none["test_acc"]
    if dataset == "rotated":
        return (f"rotate {eta['rotate']:.2f} rad, Δacc {100 * gain:+.1f} pts",
                eta["rotate"] > ROTATED_MIN and gain >= GAIN)
    if dataset == "mnist":
        return (f"rotate {eta['rotate']:.2f} rad, Δacc {100 * gain:+.1f} pts",
                eta["rotate"] < UPRIGHT_MAX and gain >= 0)
    return (f"translate {eta['translate_x']:.2f} / {eta['translate_y']:.2f}, rotate "
            f"{eta['rotate']:.2f} rad, Δacc {100 * gain:+.1f} pts",
            min(eta["translate_x"], eta["translate_y"]) > TRANSLATE_INIT
            and eta["rotate"] < UPRIGHT_MAX)


def targets(rows: list[dict]) -> None:
    print("\n| data | N | net | epochs | seed | LILA vs no augmentation | target met |")
    print("|" + "---|" * 7)
    index = {(r["dataset"], r["n_train"], r["net"], r["epochs"], r["seed"], r["method"]): r
             for r in rows}
    keys = sorted({k[:5] for k in index if k[5] == "lila"},
                  key=lambda k: (k[2], k[1], DATA_ORDER.get(k[0], 9), k[3], k[4]))
    for k in keys:
        if k + ("none",) not in index:
            continue
        text, met = target(k[0], index[k + ("lila",)], index[k + ("none",)])
        print(f"| {' | '.join(str(v) for v in k)} | {text} | {'yes' if met else 'no'} |")


def makespan(seconds: list[float], workers: int) -> float:
    """Wall time of jobs of these lengths on ``workers`` processes, dearest first, each to the
    process free first (the order ``invariance.py`` submits them in)."""
    free = [0.0] * workers
    for s in sorted(seconds, reverse=True):
        free[free.index(min(free))] += s
    return max(free)


def presets(rows: list[dict], meta: list[dict]) -> None:
    cpu = [r["cpu_seconds"] for r in rows if "cpu_seconds" in r]
    if cpu:
        print(f"\nCPU time of the {len(cpu)} cells that record it: {sum(cpu):.0f} s; on 2 "
              f"processes of one free core each, dearest first: {makespan(cpu, 2):.0f} s")
    for m in meta:
        name = f"preset {m['preset']}" if m["preset"] else "grid"
        print(f"\n{name}: {m['cells']} cells on {m['workers']} processes in "
              f"{m['wall_seconds']:.0f} s wall time (commit {m['commit']}, load "
              f"{m['load_start']:.2f} at start, {m['load']:.2f} at the end, "
              f"{m['cpu_count']} cores)")


def plot_groups(panels: list[tuple[str, list[dict]]], path: str, mean: bool) -> None:
    """η per generator over epochs, one panel per (title, records)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    colours = dict(zip(GENERATORS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (title, rs) in zip(axes.flat, panels):
        for name in GENERATORS:
            curves = [[e[name] for e in r["eta_per_epoch"]] for r in rs]
            for i, c in enumerate(curves):
                label = name if not mean and i == 0 else None
                ax.plot(c, color=colours[name], lw=0.6 if mean else 1.0, alpha=0.5 if mean
                        else 1.0, label=label)
            if mean:
                avg = [statistics.fmean(v) for v in zip(*curves)]
                ax.plot(avg, color=colours[name], lw=1.8, label=name)
        ax.axhline(math.pi, color="grey", lw=0.5, ls="--")
        ax.axhline(ROTATED_MIN, color="grey", lw=0.5, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel("learned extent |η|")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def plots(rows: list[dict], path: str) -> None:
    lila = [(k, rs) for k, rs in groups(rows).items() if k[5] == "lila"]
    if not lila:
        return
    plot_groups([(f"{k[3]}, {k[1]}, {k[0]} ({len(rs)} seeds)", rs) for k, rs in lila], path,
                mean=True)
    rotated = [(f"rotated, 5000, {k[0]}, seed {r['seed']}", [r]) for k, rs in lila
               if k[3] == "rotated" and k[1] == 5000 for r in sorted(rs, key=lambda r: r["seed"])]
    if rotated:
        stem = path[:-4] if path.endswith(".png") else path
        plot_groups(rotated, f"{stem}_rotated5k.png", mean=False)


def report(path: str, plot: str | None) -> None:
    """Markdown tables (mean ± s.e. over seeds, targets per seed, preset wall times) and the
    η-over-training plots."""
    rows, meta = load(path)
    table(rows)
    targets(rows)
    presets(rows, meta)
    if plot is not None:
        plots(rows, plot)

"""Tables and plots of the calibration study's JSON lines (both libraries).

    python benchmarks/calibration_report.py marglik-out/calibration/marglik.jsonl \
        [more.jsonl ...] [--plots benchmarks/figures] [--cache marglik-out/calibration]

Prints one Markdown table per network: every row of the study with each library that ran it,
mean ± standard error over seeds (s.e. = sample std / √n; blank for one seed), and a row's error
message where it failed. ``--plots`` draws, from the predictions the study saved under
``<cache>/preds``: reliability diagrams (``marglik.plot.reliability_diagram``), NLL against the
rotation angle, and histograms of the confidence on Fashion-MNIST, as
``calibration_<net>_{reliability,rotation,ood}.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = (("acc", ("test", "acc")), ("NLL", ("test", "nll")), ("ECE", ("test", "ece")),
           ("Brier", ("test", "brier")), ("rot. NLL", ("shift", "nll")),
           ("rot. ECE", ("shift", "ece")), ("OOD conf.", ("ood", "conf")),
           ("OOD AUROC", ("ood", "auroc")))
PLOT_ROWS = ("map", "last-kron-layerwise-probit", "last-full-layerwise-probit",
             "all-kron-layerwise-probit", "all-kron-scalar-probit", "all-diag-layerwise-probit")


def load(paths: list[str]) -> list[dict]:
    """Records of every file; a later record for the same (library, net, seed, row, n_test)
    replaces an earlier one (a rerun)."""
    seen: dict[tuple, dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                seen[(r["library"], r["net"], r["seed"], r["row"], r.get("n_test"))] = r
    return list(seen.values())


def value(rec: dict, path: tuple[str, str]) -> float:
    """A metric; for ``shift`` the mean over the rotation angles."""
    group, name = path
    if group == "shift":
        return statistics.fmean(v[name] for v in rec["shift"].values())
    return rec[group][name]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / √n; NaN for one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def fmt(m: float, se: float, digits: int = 4) -> str:
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def row_order(records: list[dict]) -> list[str]:
    try:
        import calibration_study as cs  # beside this file

        known = cs.row_names()
    except ImportError:  # pragma: no cover
        known = []
    rows = {r["row"] for r in records}
    return [n for n in known if n in rows] + sorted(rows - set(known))


def tables(records: list[dict]) -> str:
    """One Markdown table per network, rows in the study's order, libraries side by side."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["net"], r["row"], r["library"])].append(r)
    out = []
    for net in sorted({r["net"] for r in records}):
        recs = [r for r in records if r["net"] == net]
        ok = [r for r in recs if "error" not in r]
        head = ok[0] if ok else recs[0]
        out.append(f"### {net} (n_train {head.get('n_train')}, n_test {head.get('n_test')}, "
                   f"n_ood {head.get('n_ood')}, angles {list(head.get('shift', {}))})\n")
        out.append("| row | library | seeds | " + " | ".join(c for c, _ in COLUMNS)
                   + " | seconds |")
        out.append("|" + "---|" * (len(COLUMNS) + 4))
        for row in row_order(recs):
            for lib in ("marglik", "laplace-torch"):
                group = groups.get((net, row, lib))
                if not group:
                    continue
                good = [g for g in group if "error" not in g]
                if not good:
                    msg = group[0]["error"].split("\n")[0][:90].replace("|", "/")
                    out.append(f"| {row} | {lib} | – | error: {msg} |" + " |" * len(COLUMNS))
                    continue
                cells = [fmt(*mean_se([value(g, p) for g in good])) for _, p in COLUMNS]
                secs = statistics.fmean(g["seconds"] for g in good)
                out.append(f"| {row} | {lib} | {len(good)} | " + " | ".join(cells)
                           + f" | {secs:.0f} |")
        out.append("")
    return "\n".join(out)


def plots(records: list[dict], cache: Path, folder: Path, rows=PLOT_ROWS) -> list[Path]:
    """Reliability diagrams, NLL against angle and OOD confidence histograms per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from marglik.plot import reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for net in sorted({r["net"] for r in records}):
        recs = [r for r in records if r["net"] == net and "error" not in r
                and r["library"] == "marglik"]
        present = [row for row in rows if any(r["row"] == row for r in recs)]
        if not present:
            continue
        seed = min(r["seed"] for r in recs)
        preds = {row: cache / "preds" / f"marglik-{net}-seed{seed}-{row}.pt" for row in present}
        preds = {k: torch.load(v, weights_only=True) for k, v in preds.items() if v.is_file()}
        if preds:  # reliability diagrams
            fig, axes = plt.subplots(1, len(preds), figsize=(3.2 * len(preds), 3.4))
            for ax, (row, arr) in zip(list(getattr(axes, "flat", [axes])), preds.items()):
                reliability_diagram(arr["test_probs"].double(), arr["test_y"], ax=ax)
                ax.set_title(row, fontsize=8)
                ax.get_legend().remove()
            fig.suptitle(f"{net}: reliability on MNIST test (seed {seed})")
            written.append(_save(fig, folder / f"calibration_{net}_reliability.png"))
            fig, ax = plt.subplots(figsize=(5, 3.4))  # OOD confidence histograms
            bins = torch.linspace(0.1, 1.0, 19).tolist()
            for row, arr in preds.items():
                ax.hist(arr["ood_conf"].numpy(), bins=bins, histtype="step", label=row)
            ax.set_xlabel("max probability on Fashion-MNIST")
            ax.set_ylabel("count")
            ax.legend(fontsize=7)
            ax.set_title(f"{net}: confidence on OOD data (seed {seed})")
            written.append(_save(fig, folder / f"calibration_{net}_ood.png"))
        fig, ax = plt.subplots(figsize=(5, 3.4))  # NLL against angle, mean over seeds
        for row in present:
            group = [r for r in recs if r["row"] == row]
            angles = sorted(group[0]["shift"], key=float)
            ax.plot([float(a) for a in angles],
                    [statistics.fmean(g["shift"][a]["nll"] for g in group) for a in angles],
                    marker=".", label=row)
        ax.set_xlabel("rotation (degrees)")
        ax.set_ylabel("test NLL")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"{net}: rotated MNIST")
        written.append(_save(fig, folder / f"calibration_{net}_rotation.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--plots", default=None, help="folder for the figures")
    p.add_argument("--cache", default=str(HERE.parent / "marglik-out" / "calibration"))
    args = p.parse_args(argv)
    records = load(args.files)
    print(tables(records))
    if args.plots:
        for path in plots(records, Path(args.cache), Path(args.plots)):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

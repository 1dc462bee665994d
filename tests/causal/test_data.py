"""Benchmark loaders: the two folder layouts (with their truth conventions), Tübingen via cdt."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from marglik.applications.causal.data import (
    load_anlsmn,
    load_benchmark,
    load_simulated,
    load_tuebingen,
)

SHARED = Path("/work/shared/data/cause-effect")


def test_anlsmn_layout_and_truth_convention(tmp_path):
    (tmp_path / "pairs_gt.txt").write_text("1\n0\n")
    for k in (1, 2):
        rows = "\n".join(f'"{i}",{i * k}.5,{-i}' for i in range(1, 6))
        (tmp_path / f"pair_{k}.txt").write_text('"","x_pa","x_child"\n' + rows + "\n")
    pairs = load_benchmark(tmp_path)
    assert [p.truth for p in pairs] == ["x->y", "y->x"]  # 0: the third column is the cause
    np.testing.assert_array_equal(pairs[1].x, [2.5, 4.5, 6.5, 8.5, 10.5])
    np.testing.assert_array_equal(pairs[1].y, [-1, -2, -3, -4, -5])


def test_simulated_layout(tmp_path):
    (tmp_path / "pairmeta.txt").write_text("0001 1 1 2 2 1\n0002 2 2 1 1 0.5\n")
    for pid in ("0001", "0002"):
        (tmp_path / f"pair{pid}.txt").write_text("  1.0  2.0\n  3.0  4.5\n")
    pairs = load_benchmark(tmp_path)
    assert [p.truth for p in pairs] == ["x->y", "y->x"]
    assert [p.weight for p in pairs] == [1.0, 0.5]
    np.testing.assert_array_equal(pairs[0].y, [2.0, 4.5])


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="pairs_gt.txt"):
        load_benchmark(tmp_path)
    with pytest.raises(FileNotFoundError, match="pairs_gt.txt"):
        load_anlsmn(tmp_path)
    (tmp_path / "pairmeta.txt").write_text("0001 1 1 2 2 1\n")
    with pytest.raises(FileNotFoundError, match="pair0001.txt"):
        load_simulated(tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared cause-effect data not present")
def test_shared_benchmarks_load():
    ls = load_benchmark(SHARED / "ANLSMN_pairs" / "LS")
    sim = load_benchmark(SHARED / "Benchmark_simulated" / "SIM")
    assert len(ls) == 100 and len(sim) == 100
    assert ls[0].x.shape == (1000,) and {p.truth for p in ls} == {"x->y", "y->x"}


@pytest.mark.skipif(importlib.util.find_spec("cdt") is None, reason="cdt not installed")
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared cause-effect data not present")
def test_tuebingen_weights():
    pairs = load_tuebingen(SHARED / "tuebingen_cdt_weights.tsv")
    assert len(pairs) == 97  # 99 univariate pairs minus the discrete 47 and 70
    assert sum(p.weight for p in pairs) == pytest.approx(33.5, abs=0.01)
    assert all(p.truth == "x->y" for p in pairs)  # stored cause first
    assert len(load_tuebingen()) == 99

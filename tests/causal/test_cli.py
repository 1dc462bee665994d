"""``marglik cause-effect`` in a subprocess: decisions, JSON, benchmark folders, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.causal.conftest import lsnm_pair


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "marglik.cli", "cause-effect", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pair_csv(tmp_path_factory):
    x, y = lsnm_pair(n=300, seed=5)
    path = tmp_path_factory.mktemp("csv") / "pair.csv"
    return write_csv(path, ["temp", "altitude", "label"], [(a, b, "u") for a, b in zip(x, y)])


def test_direction_text_and_json(pair_csv):
    out = run_cli(pair_csv, "--x", "temp", "--y", "altitude")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("temp -> altitude")
    out = run_cli(pair_csv, "--x", "altitude", "--y", "temp", "--method", "loci-m", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["direction"] == "y->x" and result["confidence"] > 0 and result["n"] == 300
    out = run_cli(pair_csv, "--x", "temp", "--y", "altitude", "--ridge", "1e-6", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["direction"] == "x->y"


def write_anlsmn(folder, n_pairs=3):
    folder.mkdir()
    truths = []
    for k in range(1, n_pairs + 1):
        x, y = lsnm_pair(n=150, seed=k)
        first_is_cause = k % 2 == 1
        a, b = (x, y) if first_is_cause else (y, x)
        rows = [(f'"{i}"', u, v) for i, (u, v) in enumerate(zip(a, b), start=1)]
        write_csv(folder / f"pair_{k}.txt", ['""', "x_pa", "x_child"], rows)
        truths.append("1" if first_is_cause else "0")
    (folder / "pairs_gt.txt").write_text("\n".join(truths) + "\n")


def test_benchmark_folder(tmp_path):
    write_anlsmn(tmp_path / "LS")
    out = run_cli("--benchmark", tmp_path / "LS", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n_pairs"] == 3 and summary["accuracy"] == 1.0 and summary["audrc"] == 1.0


def bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.normal(size=(30, 2))
    cases = {
        "missing file": ([tmp_path / "nope.csv", "--x", "a", "--y", "b"], "no such file"),
        "missing column": (["ok.csv", "--x", "a", "--y", "zzz"], "no column 'zzz'"),
        "constant column": (["const.csv", "--x", "a", "--y", "b"], "constant"),
        "NaN": (["nan.csv", "--x", "a", "--y", "b"], "NaN"),
        "too few points": (["few.csv", "--x", "a", "--y", "b"], "at least 10"),
        "non-numeric": (["text.csv", "--x", "a", "--y", "b"], "non-numeric"),
        "no columns given": (["ok.csv"], "--x and --y"),
        "ridge with nn": (
            ["ok.csv", "--x", "a", "--y", "b", "--estimator", "nn", "--ridge", "1"],
            "spline only",
        ),
        "negative ridge": (["ok.csv", "--x", "a", "--y", "b", "--ridge", "-1"], "positive"),
        "benchmark missing": (["--benchmark", tmp_path / "none"], "does not exist"),
    }
    write_csv(tmp_path / "ok.csv", ["a", "b"], good)
    write_csv(tmp_path / "const.csv", ["a", "b"], [(v, 1.0) for v in good[:, 0]])
    write_csv(tmp_path / "nan.csv", ["a", "b"], [*good[:29], ("nan", 1.0)])
    write_csv(tmp_path / "few.csv", ["a", "b"], good[:9])
    write_csv(tmp_path / "text.csv", ["a", "b"], [*good[:29], ("abc", 1.0)])
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "missing column",
        "constant column",
        "NaN",
        "too few points",
        "non-numeric",
        "no columns given",
        "benchmark missing",
        "ridge with nn",
        "negative ridge",
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("marglik cause-effect: error:") and message in lines[0]

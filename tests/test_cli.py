"""The ``marglik`` command line, run as a user would: ``python -m marglik.cli`` in a subprocess."""

import csv
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

FEW = ["--epochs", "30", "--evidence-every", "15", "--hidden", "8"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marglik.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def regression_rows(n: int = 40, seed: int = 0) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    y = 10 + 3 * X[:, 0] - 2 * X[:, 1] + 0.3 * torch.randn(n, generator=g)
    return [[round(v, 4) for v in row] + [round(t, 4)] for row, t in zip(X.tolist(), y.tolist())]


def classification_rows(n: int = 45, seed: int = 1) -> list[list]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    names = ["bird", "cat", "dog"]
    label = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return [[round(a, 4), round(b, 4), names[k]] for (a, b), k in zip(X.tolist(), label.tolist())]


@pytest.fixture(scope="module")
def regression_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("reg")
    data = write_csv(folder / "train.csv", ["x1", "x2", "x3", "y"], regression_rows())
    result = run("fit", data, "--target", "y", "--out", folder / "model", *FEW)
    assert result.returncode == 0, result.stderr
    assert "log evidence" in result.stdout
    return folder / "model", data


@pytest.fixture(scope="module")
def classification_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cls")
    data = write_csv(folder / "train.csv", ["a", "b", "species"], classification_rows())
    result = run("fit", data, "--target", "species", "--out", folder / "model", *FEW)
    assert result.returncode == 0, result.stderr
    return folder / "model", data


# ---- fit / predict ----------------------------------------------------------------------------
def test_fit_regression_writes_loadable_files(regression_model):
    model_dir, _ = regression_model
    for name in ("model.pt", "laplace.pt", "standardizer.pt"):
        torch.load(model_dir / name, weights_only=True)  # no pickled code
    config = json.loads((model_dir / "config.json").read_text())
    assert config["task"] == "regression" and config["features"] == ["x1", "x2", "x3"]
    report = json.loads((model_dir / "report.json").read_text())
    assert math.isfinite(report["log_marglik"])
    assert report["hyperparameters"]["sigma_noise_original_units"] > 0
    assert len(report["hyperparameters"]["prior_precision"]) == 4  # layer-wise: 4 tensors
    assert set(report["train_metrics"]) == {"rmse", "nll"}
    assert len(report["training"]["log_marglik"]) == 2


def test_predict_regression(regression_model, tmp_path):
    model_dir, _ = regression_model
    rows = [r[:3] for r in regression_rows(12, seed=5)]
    data = write_csv(tmp_path / "new.csv", ["x3", "x1", "x2"], [[c, a, b] for a, b, c in rows])
    out = tmp_path / "preds.csv"
    result = run("predict", model_dir, data, "--out", out)
    assert result.returncode == 0, result.stderr
    header, values = read_csv(out)
    assert header == ["mean", "std_with_noise", "std_without_noise"]
    assert len(values) == 12
    for mean, std_y, std_f in values:
        assert math.isfinite(float(mean))
        assert float(std_y) >= float(std_f) > 0
    # without --out the CSV goes to standard output
    result = run("predict", model_dir, data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "mean,std_with_noise,std_without_noise"
    assert len(result.stdout.splitlines()) == 13


def test_fit_and_predict_classification(classification_model, tmp_path):
    model_dir, data = classification_model
    config = json.loads((model_dir / "config.json").read_text())
    assert config["task"] == "classification" and config["classes"] == ["bird", "cat", "dog"]
    out = tmp_path / "preds.csv"
    result = run("predict", model_dir, data, "--out", out)  # the target column is ignored
    assert result.returncode == 0, result.stderr
    header, values = read_csv(out)
    assert header == ["p_bird", "p_cat", "p_dog", "label"]
    assert len(values) == 45
    for row in values:
        probs = [float(p) for p in row[:3]]
        assert abs(sum(probs) - 1) < 1e-4
        assert row[3] == ["bird", "cat", "dog"][probs.index(max(probs))]


# ---- bad input: one line on stderr, exit status 2 --------------------------------------------
# Each case writes its files and returns (arguments, fragments the one-line message must contain).
# The commands fail in start-up, so they run concurrently to keep this file fast.
def _regression_csv(folder: Path, rows=None, header=("x1", "x2", "x3", "y")) -> Path:
    return write_csv(folder / "d.csv", list(header), regression_rows(20) if rows is None else rows)


def _features_csv(folder: Path, rows=None, header=("x1", "x2", "x3")) -> Path:
    rows = [r[:3] for r in regression_rows(5)] if rows is None else rows
    return write_csv(folder / "f.csv", list(header), rows)


def case_fit_missing_file(folder, model_dir):
    return ["fit", folder / "nope.csv", "--target", "y"], ["does not exist"]


def case_fit_missing_target_column(folder, model_dir):
    return ["fit", _regression_csv(folder), "--target", "price"], ["'price'", "available columns"]


def case_fit_non_numeric_column(folder, model_dir):
    rows = regression_rows(20)
    rows[7][1] = "seven"
    return ["fit", _regression_csv(folder, rows), "--target", "y"], ["'x2'", "'seven'", "line 9"]


def case_fit_nans(folder, model_dir):
    rows = regression_rows(20)
    rows[3][0] = "nan"
    rows[11][2] = ""
    args = ["fit", _regression_csv(folder, rows), "--target", "y"]
    return args, ["2 empty or NaN", "'x1'", "'x3'", "line(s) 5, 13"]


def case_fit_too_few_rows(folder, model_dir):
    rows = regression_rows(4)
    return ["fit", _regression_csv(folder, rows), "--target", "y"], ["only 4 data rows"]


def case_fit_bad_option(folder, model_dir):
    return ["fit", _regression_csv(folder), "--target", "y", "--hidden", "ten"], ["--hidden"]


def case_predict_not_a_model_folder(folder, model_dir):
    empty = folder / "empty"
    empty.mkdir()
    return ["predict", empty, _features_csv(folder)], ["not a marglik model folder"]


def case_predict_broken_model_file(folder, model_dir):
    broken = folder / "broken"
    broken.mkdir()
    for name in ("config.json", "laplace.pt", "standardizer.pt"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "model.pt").write_text("not a torch file")
    return ["predict", broken, _features_csv(folder)], ["not a loadable marglik model"]


def case_predict_missing_feature_column(folder, model_dir):
    rows = [[r[0], r[2]] for r in regression_rows(5)]
    data = _features_csv(folder, rows, header=("x1", "x3"))
    return ["predict", model_dir, data], ["lacks feature column(s) ['x2']"]


def case_predict_nan_feature(folder, model_dir):
    rows = [r[:3] for r in regression_rows(5)]
    rows[2][1] = "NaN"
    args = ["predict", model_dir, _features_csv(folder, rows)]
    return args, ["1 empty or NaN", "'x2' (1)", "line(s) 4"]


def case_predict_text_feature(folder, model_dir):
    rows = [r[:3] for r in regression_rows(5)]
    rows[2][1] = "high"
    return ["predict", model_dir, _features_csv(folder, rows)], ["'x2'", "'high'", "line 4"]


BAD_CASES = {
    name[len("case_") :]: f for name, f in sorted(globals().items()) if name.startswith("case_")
}


@pytest.fixture(scope="module")
def bad_results(regression_model, tmp_path_factory) -> dict:
    model_dir, _ = regression_model
    jobs = {}
    for name, make in BAD_CASES.items():
        folder = tmp_path_factory.mktemp(name)
        jobs[name] = make(folder, model_dir)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *args) for name, (args, _) in jobs.items()}
        return {name: (futures[name].result(), jobs[name][1]) for name in jobs}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_exit_2(bad_results, case):
    result, fragments = bad_results[case]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- demo -------------------------------------------------------------------------------------
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--quick", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Laplace last-layer KFAC" in result.stdout and "RMSE" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {
        "classification",
        "regression",
        "machine",
        "date",
        "wall_time_s",
        "table",
        "files",
    } <= set(summary)
    assert summary["quick"] is True
    for task, metric in (("classification", "accuracy"), ("regression", "rmse")):
        part = summary[task]
        assert {"rows", "headline", "evidence_traces", "n_train", "n_test"} <= set(part)
        methods = [r["method"] for r in part["rows"]]
        assert methods[0].startswith("MAP") and any("Laplace all KFAC" in m for m in methods)
        for row in part["rows"]:
            assert {metric, "nll", "log_marglik", "seconds"} <= set(row)
    assert summary["classification"]["n_train"] == 1257
    assert summary["classification"]["n_test"] == 540
    for name in summary["files"]:
        assert (out / name).is_file(), name
    assert {"reliability.png", "evidence_trace.png", "regression.png"} <= set(summary["files"])

"""``marglik fit`` / ``marglik predict`` on real CSV tables: categorical columns, missing cells,
every problem at once, checked options, warnings, progress lines (``marglik.cli.main``)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marglik.applications.tabular import TabularModel
from marglik.applications.tabular.preprocessing import Preprocessing, prepare_table
from marglik.cli import main

FEW = ["--epochs", "20", "--evidence-every", "10", "--hidden", "4"]
COLOURS = ["red", "green", "blue"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def mixed_rows(n: int = 30) -> list[list]:
    """size (numeric), colour (text), y; three missing cells: size, colour and a target."""
    g = torch.Generator().manual_seed(0)
    size = torch.randn(n, generator=g, dtype=torch.float32).tolist()
    rows = []
    for i in range(n):
        colour = COLOURS[i % 3]
        y = 2.0 * size[i] + (3.0 if colour == "red" else 0.0)
        rows.append([f"{size[i]:.4f}", colour, f"{y:.4f}"])
    rows[4][0] = ""      # line 6
    rows[7][1] = "NA"    # line 9
    rows[11][2] = "nan"  # line 13: a missing target
    return rows


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def mixed_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("mixed") / "train.csv", ["size", "colour", "y"],
                     mixed_rows())


# ---- preprocessing against hand-computed encodings --------------------------------------------
def test_impute_uses_training_statistics_and_one_hot(mixed_csv):
    prepared = prepare_table(mixed_csv, "y", missing="impute")
    rows = [r for i, r in enumerate(mixed_rows()) if i != 11]  # the missing target is dropped
    sizes = [float(r[0]) for r in rows if r[0]]
    colours = [r[1] for r in rows if r[1] != "NA"]
    top = max(sorted(set(colours)), key=colours.count)
    expected = torch.tensor([
        [float(r[0]) if r[0] else sum(sizes) / len(sizes)]
        + [float((r[1] if r[1] != "NA" else top) == c) for c in sorted(COLOURS)]
        for r in rows
    ], dtype=torch.float32)
    table = prepared.table
    assert table.feature_names == ["size", "colour=blue", "colour=green", "colour=red"]
    torch.testing.assert_close(table.X, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(table.y[:, 0], torch.tensor([float(r[2]) for r in rows],
                                                          dtype=torch.float32))
    assert prepared.n_missing == 3
    assert any("one-hot encoded into 3 columns" in s for s in prepared.summary)
    assert any("1 row(s) with a missing target dropped" in s for s in prepared.summary)
    # the same encoding from the saved JSON
    again = Preprocessing.from_json(json.loads(json.dumps(prepared.preprocessing.to_json())))
    X, kept, notes = again.apply(mixed_csv)
    assert kept.all() and len(X) == 30 and any("filled with the training values" in n
                                               for n in notes)
    torch.testing.assert_close(X[[i for i in range(30) if i != 11]], expected, rtol=0, atol=1e-6)


def test_drop_leaves_out_rows_with_missing_cells(mixed_csv):
    prepared = prepare_table(mixed_csv, "y", missing="drop")
    assert len(prepared.table.X) == 27
    assert any("dropped 3 row(s) (line(s) 6, 9, 13)" in s for s in prepared.summary)


# ---- fit and predict through the command line ---------------------------------------------------
def test_fit_and_predict_mixed_table(capsys, mixed_csv, tmp_path):
    model_dir = tmp_path / "model"
    code, out, err = run_main(capsys, "fit", mixed_csv, "--target", "y", "--missing", "impute",
                              "--out", model_dir, *FEW)
    assert code == 0, err
    assert "categorical features (1), one-hot encoded into 3 columns: colour (3)" in out
    assert "3 missing cell(s)" in out and "imputed" in out
    assert "marglik fit: epoch 20/20" in err  # progress lines: stderr is not a terminal here
    report = json.loads((model_dir / "report.json").read_text())
    assert any("imputed" in line for line in report["preprocessing"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["features"] == ["size", "colour=blue", "colour=green", "colour=red"]

    new = write_csv(tmp_path / "new.csv", ["colour", "size"],
                    [["red", "0.5"], ["purple", "1.0"], ["", "-1"], ["blue", "NA"]])
    code, out, err = run_main(capsys, "predict", model_dir, new)
    assert code == 0, err
    assert "1 row(s) with a value not seen in training" in err
    lines = out.strip().splitlines()
    assert lines[0] == "mean,std_with_noise,std_without_noise" and len(lines) == 5
    # the same numbers as the model on the hand-encoded rows (training fills, unknown = zeros)
    pre = Preprocessing.load(model_dir)
    fill_size, fill_colour = pre.columns[0].fill, pre.columns[1].fill
    onehot = {c: [float(c == k) for k in sorted(COLOURS)] for c in COLOURS}
    X = torch.tensor([[0.5, *onehot["red"]], [1.0, 0.0, 0.0, 0.0],
                      [-1.0, *onehot[fill_colour]], [fill_size, *onehot["blue"]]])
    mean = TabularModel.load(model_dir).predict(X).mean
    got = torch.tensor([float(line.split(",")[0]) for line in lines[1:]])
    torch.testing.assert_close(got, mean.double(), rtol=1e-5, atol=1e-5)


def test_predict_after_drop_leaves_rows_empty(capsys, mixed_csv, tmp_path):
    model_dir = tmp_path / "model"
    code, _, err = run_main(capsys, "fit", mixed_csv, "--target", "y", "--missing", "drop",
                            "--out", model_dir, "--quiet", *FEW)
    assert code == 0, err
    assert "epoch" not in err  # --quiet
    new = write_csv(tmp_path / "new.csv", ["size", "colour"], [["0.5", "red"], ["", "red"]])
    code, out, err = run_main(capsys, "predict", model_dir, new)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[2] == ",," and lines[1].count(",") == 2 and lines[1] != ",,"
    assert "1 row(s) skipped" in err


# ---- every problem of a file at once ------------------------------------------------------------
def test_default_missing_policy_is_error_with_the_fix_named(capsys, mixed_csv):
    code, _, err = run_main(capsys, "fit", mixed_csv, "--target", "y", *FEW)
    assert code == 2
    line, = err.strip().splitlines()
    for fragment in ("3 empty or NaN cell(s)", "'size' (1)", "'colour' (1)", "'y' (1)",
                     "line(s) 6, 9, 13", "--missing impute"):
        assert fragment in line, line


def test_every_problem_is_reported_at_once(capsys, tmp_path):
    rows = [[f"{i}", f"{i % 2}", "a", f"{i * 0.5}"] for i in range(12)]
    rows[3][1] = "seven"       # x2 mixes numbers and text, line 5
    rows[5] = rows[5][:3]      # a short row, line 7
    rows[8][0] = "inf"         # non-finite, line 10
    rows[9][3] = ""            # missing target, line 11
    data = write_csv(tmp_path / "bad.csv", ["x1", "x2", "x3", "y"], rows)
    code, _, err = run_main(capsys, "fit", data, "--target", "y", "--ignore", "idx", *FEW)
    assert code == 2 and "Traceback" not in err
    line, = err.strip().splitlines()
    for fragment in ("has 5 problems", "['idx']", "line(s) 7", "'x2' mixes numbers and text",
                     "'seven' at line 5", "--categorical x2", "'x1' has non-finite value 'inf'",
                     "1 empty or NaN cell(s) in column(s) 'y' (1)"):
        assert fragment in line, line


# ---- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (["--lr", "-1"], "--lr must be a finite number > 0, got '-1'"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got 'nan'"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--lr", "fast"], "--lr must be a number, got 'fast'"),
        (["--epochs", "-3"], "--epochs must be at least 1, got -3"),
        (["--epochs", "1.5"], "--epochs must be an integer, got '1.5'"),
        (["--evidence-every", "0"], "--evidence-every must be at least 1"),
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--hidden", "0"], "--hidden must be positive integers"),
        (["--model", "additive", "--interactions", "-1"], "--interactions must be at least 0"),
    ],
)
def test_bad_options_one_line_exit_2(capsys, mixed_csv, option, fragment):
    code, _, err = run_main(capsys, "fit", mixed_csv, "--target", "y", *option)
    assert code == 2
    line, = err.strip().splitlines()
    assert line.startswith("marglik fit: error: ") and fragment in line, line


def test_warnings_for_options_that_do_nothing(capsys, tmp_path):
    rows = [[f"{i * 0.1:.2f}", f"{(i * 0.37) % 1:.3f}"] for i in range(12)]
    data = write_csv(tmp_path / "d.csv", ["x", "y"], rows)
    code, _, err = run_main(capsys, "fit", data, "--target", "y", "--task", "regression",
                            "--epochs", "5", "--evidence-every", "8", "--missing", "impute",
                            "--hidden", "2", "--out", tmp_path / "m")
    assert code == 0, err
    assert "warning: --evidence-every 8 is larger than the 5 epochs" in err
    assert "warning: --missing impute does nothing: the file has no missing cells" in err
    code, _, err = run_main(capsys, "fit", data, "--target", "y", "--task", "regression",
                            "--epochs", "7", "--evidence-every", "3", "--hidden", "2",
                            "--out", tmp_path / "m2", "--quiet")
    assert "the last 1 epoch(s) come after the last evidence update (epoch 6)" in err


def test_subprocess_fit_prints_progress_lines(mixed_csv, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "marglik.cli", "fit", str(mixed_csv), "--target", "y",
         "--missing", "impute", "--out", str(tmp_path / "m"), *FEW],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    progress = [ln for ln in result.stderr.splitlines() if ln.startswith("marglik fit: epoch")]
    assert len(progress) == 10 and progress[-1].startswith("marglik fit: epoch 20/20")
    assert "best log evidence" in progress[-1]

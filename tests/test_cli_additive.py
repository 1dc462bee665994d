"""``marglik fit --model additive`` / ``marglik predict`` on real CSV files: round trips,
predictions against the in-memory fit and a dense float64 reference, the folder loads with
``weights_only``, shapes.png, checked options, multi-class refused."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jacrev

from marglik.applications.additive.folder import AdditiveTableModel, fit_additive_table
from marglik.applications.tabular.preprocessing import prepare_table
from marglik.cli import main
from marglik.data import Table
from marglik.errors import MarglikError

torch.set_num_threads(1)

EPOCHS, EVERY, HIDDEN = 30, 10, (8,)
FEW = ["--model", "additive", "--epochs", str(EPOCHS), "--evidence-every", str(EVERY),
       "--hidden", ",".join(map(str, HIDDEN)), "--quiet"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Regression y = sin(a) + b²/2 + noise (c irrelevant); binary label from a + b > 0
    (string labels "no"/"yes"); three classes for the refusal."""
    g = torch.Generator().manual_seed(0)
    X = torch.rand(80, 3, generator=g, dtype=torch.float64) * 4 - 2
    y = X[:, 0].sin() + 0.5 * X[:, 1] ** 2 + 0.1 * torch.randn(80, generator=g,
                                                                dtype=torch.float64)
    folder = tmp_path_factory.mktemp("additive")
    feats = [[f"{v:.5f}" for v in r] for r in X.tolist()]
    yes = (X[:, 0] + X[:, 1] + 0.3 * torch.randn(80, generator=g, dtype=torch.float64) > 0)
    three = torch.bucketize(X[:, 0].contiguous(), torch.tensor([-0.7, 0.7], dtype=torch.float64))
    return {
        "regression": write_csv(folder / "reg.csv", ["a", "b", "c", "y"],
                                [[*f, f"{t:.5f}"] for f, t in zip(feats, y.tolist())]),
        "binary": write_csv(folder / "bin.csv", ["a", "b", "c", "label"],
                            [[*f, "yes" if t else "no"] for f, t in zip(feats, yes.tolist())]),
        "multi": write_csv(folder / "multi.csv", ["a", "b", "c", "k"],
                           [[*f, f"k{t}"] for f, t in zip(feats, three.tolist())]),
    }


def in_memory(csv_path: Path, target: str, interactions: int = 0) -> AdditiveTableModel:
    """The same fit as the command line, run in this process."""
    table = prepare_table(csv_path, target).table
    model, _ = fit_additive_table(table, HIDDEN, epochs=EPOCHS, evidence_every=EVERY,
                                  interactions=interactions, seed=0)
    return model


def dense_reference(model: AdditiveTableModel,
                    X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x; θ*) and J Σ Jᵀ in float64 from dense Jacobians and the loaded posterior precision
    written out densely and inverted explicitly (the default Kronecker-factored curvature itself
    is checked against brute force in ``tests/test_additive_kron.py``)."""
    net, la = model.model, model.laplace
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    mean, std = model.x_scaler.mean.double(), model.x_scaler.std.double()

    def jac_at(x_raw):
        x = (x_raw.double() - mean) / std

        def f(p):
            return functional_call(net, p, (x,))[:, 0]

        net.double()
        try:
            out, jac = f(params), jacrev(f)(params)
        finally:
            net.float()
        return out.detach(), torch.cat([jac[n].reshape(len(x), -1) for n in params], dim=1)

    f, J = jac_at(X)
    assert la.hessian_structure == "kron"
    cov = torch.linalg.inv(la.posterior_precision.detach().double())
    return f, torch.einsum("np,pq,nq->n", J, cov, J)


def test_regression_round_trip_matches_in_memory_fit_and_dense_reference(data, tmp_path, capsys):
    out = tmp_path / "m"
    code, printed, err = run_main(capsys, "fit", data["regression"], "--target", "y", *FEW,
                                  "--out", out)
    assert code == 0, err
    assert "feature importance" in printed and "shapes.png" in printed
    report = json.loads((out / "report.json").read_text())
    imp = report["feature_importances"]
    assert set(imp) == {"a", "b", "c"} and math.isclose(sum(imp.values()), 1.0, rel_tol=1e-9)
    assert (out / "shapes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "shapes.png").stat().st_size < 200_000

    for name in ("model.pt", "laplace.pt", "standardizer.pt"):
        torch.load(out / name, weights_only=True)
    loaded = AdditiveTableModel.load(out)
    assert loaded.config["model"] == "additive" and loaded.features == ["a", "b", "c"]

    code, _, err = run_main(capsys, "predict", out, data["regression"], "--out",
                            tmp_path / "p.csv")
    assert code == 0, err
    columns, rows = read_rows(tmp_path / "p.csv")
    assert columns == ["mean", "std_with_noise", "std_without_noise"]
    cli = torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)

    X = prepare_table(data["regression"], "y").table.X
    fresh = in_memory(data["regression"], "y").predict(X)
    again = loaded.predict(X)
    # the same fit, float32: equal up to a few ulps (vectorised kernels may sum in another
    # order depending on memory alignment)
    torch.testing.assert_close(again.mean, fresh.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.std_with_noise, fresh.std_with_noise, rtol=1e-5, atol=1e-6)
    mine = torch.stack([fresh.mean, fresh.std_with_noise, fresh.std_without_noise], 1)
    torch.testing.assert_close(cli, mine.double(), rtol=1e-5, atol=1e-6)  # 6 digits in CSV

    f, var = dense_reference(loaded, X)
    s_y, m_y = loaded.y_scaler.std.double().item(), loaded.y_scaler.mean.double().item()
    sigma2 = loaded.laplace.sigma_noise.double().item() ** 2
    torch.testing.assert_close(fresh.mean.double(), m_y + s_y * f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh.std_without_noise.double(), s_y * var.sqrt(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fresh.std_with_noise.double(), s_y * (var + sigma2).sqrt(),
                               rtol=1e-4, atol=1e-6)


def test_binary_round_trip_probit_reference(data, tmp_path, capsys):
    out = tmp_path / "m"
    code, printed, err = run_main(capsys, "fit", data["binary"], "--target", "label", *FEW,
                                  "--out", out)
    assert code == 0, err
    code, _, err = run_main(capsys, "predict", out, data["binary"], "--out", tmp_path / "p.csv")
    assert code == 0, err
    columns, rows = read_rows(tmp_path / "p.csv")
    assert columns == ["p_no", "p_yes", "label"]
    probs = torch.tensor([[float(r[0]), float(r[1])] for r in rows], dtype=torch.float64)
    X = prepare_table(data["binary"], "label").table.X
    model = AdditiveTableModel.load(out)
    f, var = dense_reference(model, X)
    p_yes = torch.sigmoid(f / (1 + math.pi / 8 * var).sqrt())  # MacKay's probit approximation
    torch.testing.assert_close(probs[:, 1], p_yes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(rows), dtype=torch.float64),
                               rtol=0, atol=2e-6)
    assert [r[2] for r in rows] == ["yes" if p > 0.5 else "no" for p in p_yes.tolist()]
    fresh = in_memory(data["binary"], "label").predict(X)
    torch.testing.assert_close(model.predict(X).probs, fresh.probs, rtol=1e-5, atol=1e-6)
    assert fresh.labels == [r[2] for r in rows]


def test_interactions_add_pairs(data, tmp_path, capsys):
    out = tmp_path / "m"
    few = [a for a in FEW if a != "--quiet"]  # progress lines on (stderr is not a terminal)
    code, printed, err = run_main(capsys, "fit", data["regression"], "--target", "y", *few,
                                  "--interactions", "1", "--out", out)
    assert code == 0, err
    assert "interaction pairs: " in printed
    assert f"{EPOCHS} epochs + {EPOCHS} with the pairs" in printed
    assert f"epoch {2 * EPOCHS}/{2 * EPOCHS}," in err  # stage 2 numbered on from stage 1
    model = AdditiveTableModel.load(out)
    assert len(model.config["pairs"]) == 1 and len(model.model.pairs) == 1
    X = prepare_table(data["regression"], "y").table.X
    fresh = in_memory(data["regression"], "y", interactions=1).predict(X)
    torch.testing.assert_close(model.predict(X).mean, fresh.mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("option", "message"), [
    (["--interactions", "-1"], "--interactions must be at least 0"),
    (["--interactions", "two"], "--interactions must be an integer"),
    (["--interactions", "4"], "--interactions must be at most 3 for 3 features"),
    (["--hidden", "0"], "--hidden must be positive integers"),
])
def test_bad_options_exit_2_with_one_line(data, tmp_path, capsys, option, message):
    code, _, err = run_main(capsys, "fit", data["regression"], "--target", "y", *FEW, *option,
                            "--out", tmp_path / "m")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_multiclass_refused(data, tmp_path, capsys):
    code, _, err = run_main(capsys, "fit", data["multi"], "--target", "k", *FEW,
                            "--out", tmp_path / "m")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "binary classification only" in lines[0]
    assert "3 classes" in lines[0]


def test_without_matplotlib_one_line_and_no_png(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "m"
    code, printed, err = run_main(capsys, "fit", data["regression"], "--target", "y", *FEW,
                                  "--out", out)
    assert code == 0, err
    assert "shapes.png not written: matplotlib is not installed" in printed
    assert not (out / "shapes.png").exists()


def test_interactions_warned_for_mlp(data, tmp_path, capsys):
    code, _, err = run_main(capsys, "fit", data["regression"], "--target", "y", "--epochs", "2",
                            "--evidence-every", "1", "--hidden", "2", "--quiet",
                            "--interactions", "1", "--out", tmp_path / "m")
    assert code == 0
    assert "--interactions does nothing for --model mlp" in err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"interactions": -1}, "interactions must be an integer of at least 0"),
    ({"interactions": 4}, "interactions must be at most 3 for 3 features"),
    ({"hidden": (0,)}, "hidden widths must be positive integers"),
    ({"epochs": 0}, "epochs must be an integer of at least 1"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
])
def test_library_rejects_bad_arguments(data, kwargs, message):
    table = prepare_table(data["regression"], "y").table
    args = {"hidden": HIDDEN, "epochs": 2, "evidence_every": 1, **kwargs}
    with pytest.raises(MarglikError, match=message):
        fit_additive_table(table, args.pop("hidden"), **args)


def test_library_refuses_three_classes(data):
    table = prepare_table(data["multi"], "k").table
    with pytest.raises(MarglikError, match="binary classification only.*3 classes"):
        fit_additive_table(table, HIDDEN, epochs=2, evidence_every=1)


def test_large_table_trains_in_mini_batches_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2100, 2, generator=g)
    table = Table(X, X[:, :1].sin(), ["a", "b"], "y", "regression")
    model, report = fit_additive_table(table, (4,), epochs=1, evidence_every=1)
    assert report["training"]["batch_size"] == 128  # as the MLP beyond 2048 rows
    loaded = AdditiveTableModel.load(model.save(tmp_path / "m", report))
    # float32 round-off only (≤ 2e-7 seen under pytest, 0 in a plain script; cause not found)
    torch.testing.assert_close(loaded.predict(X).mean, model.predict(X).mean, rtol=1e-5,
                               atol=1e-6)

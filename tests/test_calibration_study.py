"""The calibration study's machinery (benchmarks/calibration_study.py, calibration_report.py).

Runs on the synthetic stand-in for MNIST, so it needs none of the study's data packages: the
row registry, the evaluation against metrics computed by hand, the GLM rows against
``la(x, link_approx=...)``, a quick end-to-end run writing JSON lines, and the table writer.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import calibration_report as report  # noqa: E402
import calibration_study as cs  # noqa: E402


@pytest.fixture
def float32():
    """The study runs in float32, as the data and networks are (conftest restores float64)."""
    torch.set_default_dtype(torch.float32)


def small_data(n_train=128, n_test=24, n_ood=16, angles=(90,)) -> cs.StudyData:
    return cs.load_study_data("synthetic", n_train, n_test, n_ood, angles)


def test_registry_lists_every_row_once():
    assert list(cs.ROWS) == cs.row_names()
    assert len(cs.ROWS) == 1 + 5 * 2 * 3 + 3  # and the tangent evidence for all-weights KFAC
    with pytest.raises(ValueError, match="twice"):
        cs.register_row("map", cs.map_row)
    extra: dict = {}
    cs.register_row("mine", cs.map_row, extra)
    assert list(extra) == ["mine"] and "mine" not in cs.ROWS


def test_evaluate_matches_metrics_by_hand():
    data = small_data(n_test=30, n_ood=20, angles=(90, 180))
    g = torch.Generator().manual_seed(0)
    table = {name: torch.softmax(3 * torch.randn(len(x), 10, generator=g, dtype=torch.float64), -1)
             for name, (x, _) in data.eval_sets.items()}
    scores, arrays = cs.evaluate(lambda name, x: table[name], data)
    y = data.eval_sets["test"][1]
    p = table["test"]
    nll = -sum(math.log(float(p[i, y[i]])) for i in range(len(y))) / len(y)
    acc = sum(int(p[i].argmax() == y[i]) for i in range(len(y))) / len(y)
    brier = sum(float(((p[i] - torch.eye(10, dtype=p.dtype)[y[i]]) ** 2).sum())
                for i in range(len(y))) / len(y)
    assert scores["test"]["nll"] == pytest.approx(nll, rel=1e-12)
    assert scores["test"]["acc"] == pytest.approx(acc, rel=1e-12)
    assert scores["test"]["brier"] == pytest.approx(brier, rel=1e-12)
    assert scores["test"]["conf"] == pytest.approx(float(p.max(1).values.mean()), rel=1e-12)
    q = table["rot180"]
    assert scores["shift"]["180"]["nll"] == pytest.approx(
        -sum(math.log(float(q[i, y[i]])) for i in range(len(y))) / len(y), rel=1e-12)
    c_in, c_out = p.max(1).values, table["fmnist"].max(1).values
    pairs = [(float(a > b) + 0.5 * float(a == b)) for a in c_in for b in c_out]  # brute force
    assert scores["ood"]["auroc"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)
    assert scores["ood"]["conf"] == pytest.approx(float(c_out.mean()), rel=1e-12)
    assert sorted(scores["shift"]) == ["180", "90"]
    assert torch.equal(arrays["test_y"], y) and arrays["ood_conf"].shape == (20,)


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_glm_rows_equal_the_library_predictive(link):
    """Shared moments + apply_link give exactly la(x, link_approx=link), float64."""
    import marglik
    from marglik.nets import lenet

    data = small_data()
    x_tr, y_tr = data.x_train.double(), data.y_train
    torch.manual_seed(0)
    model = lenet().double()
    ctx = cs.Context(model, cs._loader(x_tr, y_tr, 64, False), seed=3, n_samples=7, rank=5)
    predict = cs.ROWS[f"all-kron-layerwise-{link}"](ctx)
    x = data.eval_sets["test"][0].double()
    got = predict("test", x)
    la = ctx.cache["tune:all-kron-layerwise"]
    assert la.prior_precision.numel() == 10  # one δ per parameter tensor, tuned
    ref = marglik.Laplace(model, "classification", prior_precision=la.prior_precision.clone())
    ref.fit(cs._loader(x_tr, y_tr, 64, False))
    want = ref(x, link_approx=link, n_samples=7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.equal(predict("test", x), got)  # moments cached, same draws


def test_tangent_rows_tune_delta_by_the_tangent_evidence():
    """all-kron-tangent-*: the posterior of optimize_prior_precision(method="tangent"), scalar δ."""
    import marglik

    data = small_data(n_train=64)
    x_tr, y_tr = data.x_train.double(), data.y_train
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 10)).double()
    # trained, so that the evidence keeps the model (an untrained one is switched off: δ → ∞,
    # stopping wherever the rounds settle)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_tr), y_tr).backward()
        optimizer.step()
    ctx = cs.Context(model, cs._loader(x_tr, y_tr, 32, False), seed=0, n_samples=7, rank=5)
    x = data.eval_sets["test"][0].double()
    got = cs.ROWS["all-kron-tangent-probit"](ctx)("test", x)
    la = ctx.cache["tune:all-kron-tangent"]
    ref = marglik.Laplace(model, "classification").fit(ctx.train_loader)
    ref.optimize_prior_precision(method="tangent", prior_structure="scalar",
                                 train_loader=ctx.train_loader)
    assert la.tangent is not None and la.prior_precision.numel() == 1
    assert 1e-2 < la.prior_precision < 1e4  # the evidence keeps the model
    torch.testing.assert_close(la.prior_precision, ref.prior_precision, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, ref(x), rtol=1e-12, atol=1e-14)


def test_quick_run_writes_one_line_per_row_and_a_table(tmp_path, float32, capsys):
    out = tmp_path / "rows.jsonl"
    rows = ["map", "last-kron-scalar-probit", "all-diag-layerwise-nn"]
    cs.main(["--data", "synthetic", "--quick", "--n-train", "256", "--n-test", "40",
             "--n-ood", "30", "--angles", "90", "--seeds", "0", "1", "--nets", "lenet-map",
             "--cache", str(tmp_path / "cache"), "--out", str(out), "--only", *rows])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seed"], r["row"]) for r in records] == [(s, r) for s in (0, 1) for r in rows]
    for r in records:
        assert "error" not in r, r.get("error")
        assert r["library"] == "marglik" and r["n_train"] == 256 and r["n_test"] == 40
        assert 0 <= r["test"]["acc"] <= 1 and r["test"]["nll"] > 0
        assert list(r["shift"]) == ["90"] and 0 <= r["ood"]["auroc"] <= 1
        assert r["env"]["threads"] == 1 and "commit" in r["env"]
    assert records[1]["prior_precision"][0] > 0  # tuned by the evidence
    assert len(records[2]["prior_precision"]) == 10  # layer-wise: one per tensor
    cached = sorted(p.name for p in (tmp_path / "cache" / "nets").iterdir())
    assert cached == [f"synthetic-n256-e1-lenet-map-seed{s}.pt" for s in (0, 1)]
    # a rerun loads the cached networks: the map row is the same to the bit
    capsys.readouterr()
    cs.main(["--data", "synthetic", "--quick", "--n-train", "256", "--n-test", "40",
             "--n-ood", "30", "--angles", "90", "--seeds", "0", "--nets", "lenet-map",
             "--cache", str(tmp_path / "cache"), "--only", "map"])
    again = json.loads(capsys.readouterr().out.splitlines()[0])
    assert again["test"] == records[0]["test"] and "train_s" in again["net_info"]

    md = report.tables(report.load([str(out)]))
    lines = [line for line in md.splitlines() if line.startswith("| map ")]
    assert len(lines) == 1
    nlls = [r["test"]["nll"] for r in records if r["row"] == "map"]
    m, se = sum(nlls) / 2, abs(nlls[0] - nlls[1]) / 2  # s.e. of two values: |a − b| / 2
    assert f"{m:.4f} ± {se:.4f}" in lines[0]
    assert "| 2 |" in lines[0]


def test_report_shows_errors_and_replaces_reruns(tmp_path):
    base = {"library": "laplace-torch", "net": "n", "seed": 0, "n_test": 5}
    good = {**base, "row": "map", "seconds": 1.0,
            "test": {"acc": 0.5, "nll": 1.0, "ece": 0.1, "brier": 0.2, "conf": 0.6},
            "shift": {"90": {"acc": 0.1, "nll": 3.0, "ece": 0.3, "brier": 0.9, "conf": 0.5},
                      "180": {"acc": 0.1, "nll": 5.0, "ece": 0.5, "brier": 0.9, "conf": 0.5}},
            "ood": {"conf": 0.7, "auroc": 0.8}}
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {**good, "test": {**good["test"], "nll": 9.0}}, good,  # the rerun replaces the first
        {**base, "row": "last-kron-layerwise-probit", "error": "ValueError: Mismatch | prior"}]))
    md = report.tables(report.load([str(path)]))
    assert "| map | laplace-torch | 1 | 0.5000 | 1.0000 |" in md
    assert "| 4.0000 | 0.4000 |" in md  # rotated NLL and ECE: means over the angles
    assert "error: ValueError: Mismatch / prior" in md

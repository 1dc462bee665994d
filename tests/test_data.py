"""Tests for marglik.data: bundled sets, CSV tables, Standardizer and the UCI split layout."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marglik.data import (
    DataError,
    Standardizer,
    default_uci_root,
    load_digits_split,
    load_regression_set,
    load_uci,
    read_table,
    uci_datasets,
)

# --------------------------------------------------------------------------------------------
# bundled scikit-learn data
# --------------------------------------------------------------------------------------------


def test_digits_split_shapes_and_range():
    pytest.importorskip("sklearn")
    X_tr, y_tr, X_te, y_te = load_digits_split()
    assert X_tr.shape == (1257, 1, 8, 8) and X_te.shape == (540, 1, 8, 8)
    assert y_tr.shape == (1257,) and y_te.shape == (540,)
    assert X_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    assert X_tr.min() >= 0 and X_tr.max() == 1.0
    assert set(y_tr.tolist()) == set(range(10))
    again = load_digits_split()
    assert torch.equal(again[0], X_tr) and torch.equal(again[3], y_te)
    other = load_digits_split(seed=1, test_size=100, flatten=True, dtype=torch.float64)
    assert other[0].shape == (1697, 64) and other[0].dtype == torch.float64
    assert not torch.equal(other[3], y_te[:100])
    # train and test together are exactly the 1797 images
    from sklearn.datasets import load_digits

    total = torch.as_tensor(load_digits().data, dtype=torch.float64).sum() / 16
    assert (X_tr.double().sum() + X_te.double().sum()).item() == pytest.approx(total.item())


def test_regression_set_standardised_with_train_stats():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_diabetes

    s = load_regression_set("diabetes", seed=0, test_fraction=0.3)
    # 442 rows: round(0.3 * 442) = 133 test, 309 train; 10 features
    assert s.X_train.shape == (309, 10) and s.X_test.shape == (133, 10)
    assert s.y_train.shape == (309, 1) and s.y_test.shape == (133, 1)
    assert s.X_train.mean(0).abs().max() < 1e-5
    assert (s.X_train.std(0, correction=0) - 1).abs().max() < 1e-5
    assert s.y_train.mean().abs() < 1e-5
    # test data are standardised with *training* statistics: undoing them recovers raw data
    raw = load_diabetes(scaled=False)
    x_back = torch.cat([s.X_train, s.X_test]) * s.x_std + s.x_mean
    y_back = torch.cat([s.y_train, s.y_test]).squeeze(1) * s.y_std + s.y_mean
    assert x_back.double().sum().item() == pytest.approx(raw.data.sum(), rel=1e-5)
    assert y_back.double().sum().item() == pytest.approx(raw.target.sum(), rel=1e-5)
    with pytest.raises(ValueError, match="available"):
        load_regression_set("nope")


def test_missing_sklearn_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"pip install marglik\[data\]"):
        load_digits_split()


def test_imports_stay_lazy():
    code = (
        "import sys, marglik.data, marglik.plot, marglik.metrics;"
        "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# CSV tables
# --------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _rows(n, fmt):
    return "".join(fmt(i) + "\n" for i in range(n))


def test_read_table_classification(tmp_path):
    p = _write(tmp_path, "a,label,b\n" + _rows(12, lambda i: f"{i},{3 if i % 3 else 7},{0.5 * i}"))
    t = read_table(p, "label")
    assert t.task == "classification"
    assert t.feature_names == ["a", "b"] and t.target_name == "label"
    assert t.X.shape == (12, 2) and t.X.dtype == torch.float32
    assert t.X[4].tolist() == [4.0, 2.0]
    assert t.classes == [3, 7] and t.label_map == {3: 0, 7: 1}
    # rows 0, 3, 6, 9 have label 7 -> index 1
    assert t.y.dtype == torch.long
    assert t.y.tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]


def test_read_table_regression_inference_and_override(tmp_path):
    p = _write(tmp_path, "x,y\n" + _rows(12, lambda i: f"{i},{i * 0.25}"))
    t = read_table(p, "y")
    assert t.task == "regression" and t.classes is None
    assert t.y.shape == (12, 1) and t.y.dtype == torch.float32
    assert t.y[:, 0].tolist() == [i * 0.25 for i in range(12)]
    # 25 distinct integers (> 20) -> regression
    p = _write(tmp_path, "x,y\n" + _rows(25, lambda i: f"{i},{i}"), "many.csv")
    assert read_table(p, "y").task == "regression"
    # 12 distinct integers written as floats -> classification, unless overridden
    p = _write(tmp_path, "x,y\n" + _rows(12, lambda i: f"{i},{i}.0"), "ints.csv")
    assert read_table(p, "y").task == "classification"
    assert read_table(p, "y", task="regression").task == "regression"
    with pytest.raises(ValueError, match="task"):
        read_table(p, "y", task="ranking")


def test_read_table_string_labels(tmp_path):
    p = _write(tmp_path, "x,kind\n" + _rows(10, lambda i: f"{i},{'dog' if i < 4 else 'cat'}"))
    t = read_table(p, "kind")
    assert t.task == "classification" and t.classes == ["cat", "dog"]
    assert t.y.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(DataError, match="'kind'.*'dog'"):
        read_table(p, "kind", task="regression")


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert isinstance(err.value, ValueError)
    return msg


def test_read_table_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        read_table(tmp_path / "absent.csv", "y")
    assert "absent.csv" in _one_line(e)


def test_read_table_missing_target(tmp_path):
    p = _write(tmp_path, "a,b\n" + _rows(12, lambda i: f"{i},{i}"))
    with pytest.raises(DataError) as e:
        read_table(p, "y")
    msg = _one_line(e)
    assert "'y'" in msg and "['a', 'b']" in msg


def test_read_table_non_numeric(tmp_path):
    lines = _rows(12, lambda i: f"{i},{'red' if i == 2 else i},{i}")
    p = _write(tmp_path, "a,color,y\n" + lines)
    with pytest.raises(DataError) as e:
        read_table(p, "y")
    msg = _one_line(e)
    # data row i = 2 is file line 4 (header is line 1)
    assert "'color'" in msg and "'red'" in msg and "line 4" in msg


def test_read_table_missing_cells(tmp_path):
    def row(i):
        a = "nan" if i == 5 else str(i)
        b = "" if i in (1, 7) else str(i)
        return f"{a},{b},{i % 2}"

    p = _write(tmp_path, "a,b,y\n" + _rows(12, row))
    with pytest.raises(DataError) as e:
        read_table(p, "y")
    msg = _one_line(e)
    # three bad cells: 'a' once (row 5 -> line 7), 'b' twice (rows 1, 7 -> lines 3, 9)
    assert "3 empty or NaN" in msg
    assert "'a' (1)" in msg and "'b' (2)" in msg
    assert "3, 7, 9" in msg


def test_read_table_too_few_rows(tmp_path):
    p = _write(tmp_path, "a,y\n" + _rows(5, lambda i: f"{i},{i}"))
    with pytest.raises(DataError, match="only 5 data rows") as e:
        read_table(p, "y")
    _one_line(e)


def test_read_table_ragged_row(tmp_path):
    p = _write(tmp_path, "a,b,y\n" + _rows(12, lambda i: f"{i},{i},{i}") + "1,2\n")
    with pytest.raises(DataError, match="line 14 has 2 fields") as e:
        read_table(p, "y")
    _one_line(e)


def test_standardizer_roundtrip_and_save(tmp_path):
    X = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    s = Standardizer().fit(X)
    # column 0: mean 3, population std sqrt(8/3); column 1 constant -> std 1
    assert s.mean.tolist() == pytest.approx([3.0, 5.0, 5.0])
    assert s.std[:2].tolist() == pytest.approx([(8 / 3) ** 0.5, 1.0])
    Z = s.transform(X)
    assert Z[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert Z[:, 0].tolist() == pytest.approx([-(1.5**0.5), 0.0, 1.5**0.5])
    assert torch.allclose(s.inverse_transform(Z), X)
    torch.save(s.state_dict(), tmp_path / "s.pt")
    s2 = Standardizer.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(s2.transform(X), Z)
    with pytest.raises(RuntimeError, match="not fitted"):
        Standardizer().transform(X)
    with pytest.raises(ValueError, match="shape"):
        s.transform(torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------
# UCI layout: a tiny fake set (always) and the shared benchmark data (skipped when absent)
# --------------------------------------------------------------------------------------------


def _fake_uci(root: Path) -> np.ndarray:
    d = root / "toy" / "data"
    d.mkdir(parents=True)
    data = np.arange(36, dtype=float).reshape(12, 3) ** 1.5
    np.savetxt(d / "data.txt", data)
    (d / "index_features.txt").write_text("0\n1\n")
    (d / "index_target.txt").write_text("2\n")
    (d / "n_splits.txt").write_text("2\n")
    (d / "index_train_0.txt").write_text("\n".join(map(str, range(8))) + "\n")
    (d / "index_test_0.txt").write_text("\n".join(map(str, range(8, 12))) + "\n")
    (d / "index_train_1.txt").write_text("\n".join(map(str, range(4, 12))) + "\n")
    (d / "index_test_1.txt").write_text("\n".join(map(str, range(4))) + "\n")
    return data


def test_uci_fake_layout(tmp_path, monkeypatch):
    data = _fake_uci(tmp_path)
    monkeypatch.setenv("MARGLIK_UCI_ROOT", str(tmp_path))
    assert uci_datasets() == ["toy"]
    s = load_uci("toy", 1)
    assert s.X_train.shape == (8, 2) and s.X_test.shape == (4, 2)
    assert s.y_train.shape == (8, 1) and s.y_test.shape == (4, 1)
    train_y = data[4:, 2]
    assert s.y_std.item() == pytest.approx(train_y.std(), rel=1e-5)  # population std
    assert s.y_mean.item() == pytest.approx(train_y.mean(), rel=1e-5)
    expected_test = (data[:4, :2] - data[4:, :2].mean(0)) / data[4:, :2].std(0)
    assert np.allclose(s.X_test.numpy(), expected_test, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        load_uci("toy", 2)
    with pytest.raises(FileNotFoundError, match="available: \\['toy'\\]"):
        load_uci("boston", 0)


def test_uci_missing_root(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_uci("yacht", 0, root=tmp_path / "nowhere")
    monkeypatch.setenv("MARGLIK_UCI_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="MARGLIK_UCI_ROOT"):
        default_uci_root()


# rows x features and number of splits, from /work/shared/data/README.md
UCI_TABLE = {
    "bostonHousing": (506, 13, 20),
    "concrete": (1030, 8, 20),
    "energy": (768, 8, 20),
    "wine-quality-red": (1599, 11, 20),
    "yacht": (308, 6, 20),
}


@pytest.fixture
def uci_root(monkeypatch):
    monkeypatch.delenv("MARGLIK_UCI_ROOT", raising=False)
    try:
        return default_uci_root()
    except FileNotFoundError:
        pytest.skip("shared UCI data not available")


@pytest.mark.parametrize("name", sorted(UCI_TABLE))
def test_uci_shared_shapes(uci_root, name):
    if name not in uci_datasets(uci_root):
        pytest.skip(f"{name} not in {uci_root}")
    rows, feats, splits = UCI_TABLE[name]
    d = uci_root / name / "data"
    assert int((d / "n_splits.txt").read_text().split()[0]) == splits
    for split in (0, splits - 1):
        s = load_uci(name, split, root=uci_root)
        train = np.loadtxt(d / f"index_train_{split}.txt", dtype=int)
        test = np.loadtxt(d / f"index_test_{split}.txt", dtype=int)
        assert not set(train.tolist()) & set(test.tolist())
        assert len(train) + len(test) == rows
        assert s.X_train.shape == (len(train), feats) and s.X_test.shape == (len(test), feats)
        assert s.y_train.shape == (len(train), 1)
        assert s.X_train.mean(0).abs().max() < 1e-4


def test_uci_yacht_values(uci_root):
    d = uci_root / "yacht" / "data"
    if not (d / "data.txt").is_file():
        pytest.skip("yacht not available")
    raw = np.loadtxt(d / "data.txt")
    train = np.loadtxt(d / "index_train_3.txt", dtype=int)
    s = load_uci("yacht", 3, root=uci_root)
    back = s.X_train.double().numpy() * s.x_std.double().numpy() + s.x_mean.double().numpy()
    assert np.allclose(back, raw[train, :6], atol=1e-4)
    assert s.y_std.item() == pytest.approx(raw[train, 6].std(), rel=1e-5)
    assert "yacht" in uci_datasets(uci_root)

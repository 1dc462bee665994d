"""Tests for marglik.plot (Agg backend, no display)."""

import sys

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection, PolyCollection  # noqa: E402

from marglik import plot  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_reliability_diagram_bars_and_line():
    # 3-class example: confidences 0.9 (correct), 0.7 (wrong), 0.6 (correct), 0.4 (wrong).
    # Two bins: (0, 0.5] holds conf 0.4 with accuracy 0; (0.5, 1] holds the rest, accuracy 2/3.
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.4, 0.35, 0.25]])
    y = torch.tensor([0, 0, 2, 1])
    ax = plot.reliability_diagram(probs, y, n_bins=2)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert len(ax.patches) == 4  # 2 accuracy bars + 2 gap bars
    assert len(ax.lines) == 1  # diagonal
    heights = [p.get_height() for p in ax.patches[:2]]
    assert heights == pytest.approx([0.0, 2 / 3], abs=1e-6)
    # gap bar of bin 2 spans accuracy 2/3 .. mean confidence 2.2/3
    gap = ax.patches[3]
    assert gap.get_y() == pytest.approx(2 / 3, abs=1e-6)
    assert gap.get_height() == pytest.approx(0.2 / 3, abs=1e-6)
    assert any("ECE = 0.150" in t.get_text() for t in ax.texts)


def test_reliability_diagram_uses_given_axes():
    _, ax = plt.subplots()
    probs = torch.softmax(torch.randn(30, 4), -1)
    out = plot.reliability_diagram(probs, torch.randint(0, 4, (30,)), n_bins=5, ax=ax)
    assert out is ax
    assert len(ax.patches) == 10


def test_predictive_bands_single_band():
    x = torch.linspace(-1, 1, 20).flip(0)  # unsorted input is sorted internally
    mean = torch.zeros(20)
    std = torch.full((20,), 0.5)
    ax = plot.predictive_bands(x, mean, std)
    assert len(ax.lines) == 1
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(1.0) and ys.min() == pytest.approx(-1.0)  # 0 +- 2 * 0.5
    xs = ax.lines[0].get_xdata()
    assert list(xs) == sorted(xs)


def test_predictive_bands_epistemic_aleatoric_and_data():
    x = torch.linspace(0, 1, 15)[:, None]
    mean = torch.zeros(15, 1)
    std = torch.full((15, 1), 0.3)
    ax = plot.predictive_bands(
        x, mean, std, x_train=torch.rand(8), y_train=torch.rand(8), aleatoric_std=0.4
    )
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(bands) == 2 and len(scatters) == 1 and len(ax.lines) == 1
    tops = sorted(b.get_paths()[0].vertices[:, 1].max() for b in bands)
    # epistemic band: 2 * 0.3 = 0.6; total: 2 * sqrt(0.3^2 + 0.4^2) = 2 * 0.5 = 1.0
    assert tops == pytest.approx([0.6, 1.0], abs=1e-6)


def test_predictive_bands_bad_lengths():
    with pytest.raises(ValueError, match="equal length"):
        plot.predictive_bands(torch.zeros(3), torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="both"):
        plot.predictive_bands(torch.zeros(3), torch.zeros(3), torch.ones(3), x_train=torch.ones(2))


def test_trace_lines_and_scales():
    history = {"log_evidence": [-50.0, -40.0, -35.0], "prior_prec": [1.0, 2.0, 4.0, 8.0]}
    ax = plot.trace(history)
    assert len(ax.lines) == 2
    assert list(ax.lines[1].get_ydata()) == [1.0, 2.0, 4.0, 8.0]
    assert ax.get_yscale() == "linear"
    ax = plot.trace(history, keys=["prior_prec"], logy=True)
    assert len(ax.lines) == 1 and ax.get_yscale() == "log"
    ax = plot.trace(history, logy=True)  # negative evidence -> symlog
    assert ax.get_yscale() == "symlog"
    with pytest.raises(KeyError, match="available"):
        plot.trace(history, keys=["nope"])


def test_missing_matplotlib_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install marglik\[plot\]"):
        plot.trace({"a": [1.0, 2.0]})

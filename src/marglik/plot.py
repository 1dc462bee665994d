"""Plotting helpers (optional dependency: ``pip install marglik[plot]``).

matplotlib is imported lazily inside each function, so ``import marglik.plot`` works without it.
Every function draws on ``ax`` (or on a new figure's axes when ``ax`` is None) and returns the
:class:`matplotlib.axes.Axes`; none of them calls ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from marglik.metrics import calibration_bins, ece

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["predictive_bands", "reliability_diagram", "trace"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "marglik.plot needs matplotlib, which is not installed: pip install marglik[plot]"
        ) from e
    return plt


def _get_ax(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    plt = _pyplot()
    _, new_ax = plt.subplots()
    return new_ax


def _np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (N,) or (N, 1), got shape {arr.shape}")
    return arr


def reliability_diagram(
    probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15, ax: Axes | None = None
) -> Axes:
    """Reliability diagram: per-bin accuracy against confidence, with the calibration gap.

    Draws one bar per bin with the bin's accuracy (height 0 for empty bins), one hatched bar per
    bin spanning the gap between accuracy and mean confidence (height 0 for empty bins), the
    diagonal of perfect calibration, and the ECE as text.

    Args:
        probs: Predicted class probabilities, shape ``(N, C)``.
        y: Integer class targets, shape ``(N,)``.
        n_bins: Number of equal-width confidence bins.
        ax: Axes to draw on; a new figure is created when None.

    Returns:
        The Axes (``2 * n_bins`` bar patches, one line).
    """
    ax = _get_ax(ax)
    bins = calibration_bins(probs, y, n_bins)
    edges = bins.edges.double().cpu().numpy()
    acc = bins.accuracy.double().cpu().numpy()
    conf = bins.confidence.double().cpu().numpy()
    nonempty = bins.count.cpu().numpy() > 0
    width = np.diff(edges)
    left = edges[:-1]
    ax.bar(left, acc, width=width, align="edge", edgecolor="black", color="tab:blue",
           label="accuracy")
    gap_bottom = np.where(nonempty, np.minimum(acc, conf), 0.0)
    gap_height = np.where(nonempty, np.abs(conf - acc), 0.0)
    ax.bar(left, gap_height, bottom=gap_bottom, width=width, align="edge", color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", label="gap")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.text(0.04, 0.92, f"ECE = {float(ece(probs, y, n_bins)):.3f}", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right")
    return ax


def predictive_bands(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    x_train: torch.Tensor | None = None,
    y_train: torch.Tensor | None = None,
    aleatoric_std: torch.Tensor | float | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Predictive mean and +-2 standard-deviation bands for 1-D regression.

    Without ``aleatoric_std``, ``std`` is the predictive standard deviation and one band
    ``mean +- 2 std`` is shaded. With ``aleatoric_std``, ``std`` is read as the epistemic
    (function-space) standard deviation and two bands are shaded: the inner epistemic band
    ``mean +- 2 std`` and the outer total band ``mean +- 2 sqrt(std^2 + aleatoric_std^2)``.
    Points are sorted by ``x`` before plotting.

    Args:
        x: Test inputs, shape ``(N,)`` or ``(N, 1)``.
        mean: Predictive mean, shape ``(N,)`` or ``(N, 1)``.
        std: Predictive (or epistemic, see above) standard deviation, same shape.
        x_train: Optional training inputs to scatter, shape ``(M,)`` or ``(M, 1)``.
        y_train: Training targets, required with ``x_train``.
        aleatoric_std: Optional observation-noise standard deviation, a scalar or shape ``(N,)``.
        ax: Axes to draw on; a new figure is created when None.

    Returns:
        The Axes (one line for the mean; one filled band, or two with ``aleatoric_std``; one
        scatter collection when training data are given).
    """
    xs, m, s = _np(x, "x"), _np(mean, "mean"), _np(std, "std")
    if not (xs.shape == m.shape == s.shape):
        raise ValueError(f"x, mean and std must have equal length, got {xs.shape}, {m.shape}, "
                         f"{s.shape}")
    if (x_train is None) != (y_train is None):
        raise ValueError("pass both x_train and y_train, or neither")
    ax = _get_ax(ax)
    order = np.argsort(xs, kind="stable")
    xs, m, s = xs[order], m[order], s[order]
    if aleatoric_std is not None:
        a = np.asarray(
            aleatoric_std.detach().cpu().numpy()
            if isinstance(aleatoric_std, torch.Tensor) else aleatoric_std,
            dtype=float,
        )
        if a.ndim > 0:
            a = _np(a, "aleatoric_std")
            if a.shape != xs.shape:
                raise ValueError(f"aleatoric_std must be a scalar or have shape {xs.shape}, "
                                 f"got {a.shape}")
            a = a[order]
        total = np.sqrt(s**2 + a**2)
        ax.fill_between(xs, m - 2 * total, m + 2 * total, color="tab:orange", alpha=0.25,
                        linewidth=0, label="±2 std (epistemic + aleatoric)")
        ax.fill_between(xs, m - 2 * s, m + 2 * s, color="tab:blue", alpha=0.35, linewidth=0,
                        label="±2 std (epistemic)")
    else:
        ax.fill_between(xs, m - 2 * s, m + 2 * s, color="tab:blue", alpha=0.3, linewidth=0,
                        label="±2 std")
    ax.plot(xs, m, color="tab:blue", label="predictive mean")
    if x_train is not None:
        xt, yt = _np(x_train, "x_train"), _np(y_train, "y_train")
        if xt.shape != yt.shape:
            raise ValueError(f"x_train and y_train must have equal length, got {xt.shape}, "
                             f"{yt.shape}")
        ax.scatter(xt, yt, s=10, color="black", alpha=0.7, label="training data", zorder=3)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="best")
    return ax


def trace(
    history: Mapping[str, Sequence[float]],
    keys: Sequence[str] | None = None,
    ax: Axes | None = None,
    logy: bool = False,
    xlabel: str = "step",
) -> Axes:
    """Plot traces (e.g. log evidence, prior precision, noise std) over steps or epochs.

    Args:
        history: Mapping from a name to its values, one per step (floats or 0-dim tensors;
            NaN/None leave a gap).
        keys: Names to plot, in order; defaults to all keys of ``history``.
        ax: Axes to draw on; a new figure is created when None.
        logy: Use a logarithmic y axis ("log" when all plotted values are positive, otherwise
            "symlog", since log evidences are usually negative).
        xlabel: Label of the x axis.

    Returns:
        The Axes (one line per key).
    """
    if not history:
        raise ValueError("history is empty")
    keys = list(history.keys()) if keys is None else list(keys)
    if not keys:
        raise ValueError("keys is empty")
    missing = [k for k in keys if k not in history]
    if missing:
        raise KeyError(f"keys {missing} not in history; available: {sorted(history)}")
    ax = _get_ax(ax)
    all_vals = []
    for k in keys:
        vals = np.array(
            [np.nan if v is None else float(v) for v in history[k]], dtype=float
        )
        all_vals.append(vals)
        ax.plot(np.arange(len(vals)), vals, label=k)
    if logy:
        finite = np.concatenate(all_vals)
        finite = finite[np.isfinite(finite)]
        if finite.size and (finite > 0).all():
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog")
    ax.set_xlabel(xlabel)
    if len(keys) == 1:
        ax.set_ylabel(keys[0])
    ax.legend(loc="best")
    return ax

"""Shape-function plots of an additive model: mean, ±2 std credible band and a data rug.

Follows :mod:`marglik.plot`: matplotlib is imported lazily, nothing calls ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from marglik.plot import _pyplot

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_shape_functions"]


def plot_shape_functions(
    grid: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    X: np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
    truth: Sequence[Callable[[np.ndarray], np.ndarray] | None] | None = None,
    output: int = 0,
    ncols: int = 5,
    importances: np.ndarray | None = None,
) -> Figure:
    """One panel per feature: f̃_d (line), ±2 std band, the data as a rug, optional truth.

    Args:
        grid: feature values (M, D); mean, std: (M, D) or (M, D, C) (``output`` picks C).
        X: the data (N, D), drawn as a rug of ticks at the bottom of each panel.
        feature_names: D titles (default ``x0 … x{D-1}``).
        truth: per feature a function of the grid column (centred by the caller) or None.
        ncols: panels per row.
        importances: (D,) shown in the titles.

    Returns:
        the Figure.
    """
    grid, mean, std = (np.asarray(a, dtype=float) for a in (grid, mean, std))
    if mean.ndim == 3:
        mean, std = mean[..., output], std[..., output]
    if grid.ndim != 2 or mean.shape != grid.shape or std.shape != grid.shape:
        raise ValueError(f"grid, mean and std must be (M, D) (or mean, std (M, D, C)), got "
                         f"{grid.shape}, {mean.shape}, {std.shape}")
    d = grid.shape[1]
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(d)]
    if len(names) != d:
        raise ValueError(f"feature_names must have {d} entries, got {len(names)}")
    if X is not None and (np.ndim(X) != 2 or np.shape(X)[1] != d):
        raise ValueError(f"X must have shape (N, {d}), got {np.shape(X)}")
    plt = _pyplot()
    ncols = max(1, min(ncols, d))
    nrows = -(-d // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.2 * nrows), squeeze=False,
                             sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= d:
            ax.set_visible(False)
            continue
        g, m, s = grid[:, i], mean[:, i], std[:, i]
        ax.fill_between(g, m - 2 * s, m + 2 * s, color="tab:blue", alpha=0.3, linewidth=0,
                        label="±2 std")
        ax.plot(g, m, color="tab:blue", label="mean")
        if truth is not None and truth[i] is not None:
            ax.plot(g, truth[i](g), color="black", linestyle="--", linewidth=1, label="truth")
        if X is not None:
            ax.plot(np.asarray(X)[:, i], np.zeros(len(X)), "|", color="black", alpha=0.2,
                    markersize=6, transform=ax.get_xaxis_transform())
        title = names[i] if importances is None else f"{names[i]} ({importances[i]:.2f})"
        ax.set_title(title, fontsize=9)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig

"""UCI regression benchmarks in the standard split layout (PBP / MC-dropout splits).

Layout of ``<root>/<name>/data/``: ``data.txt`` (whitespace-separated rows),
``index_features.txt`` and ``index_target.txt`` (0-based column indices), ``index_train_<i>.txt``
and ``index_test_<i>.txt`` (0-based row indices, one per line) and ``n_splits.txt``. The data are
not shipped with marglik; point ``root`` or the environment variable ``MARGLIK_UCI_ROOT`` at a
folder holding them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from marglik.data.embedded import RegressionSplit, standardized_split

__all__ = ["UCI_ROOT_ENV", "default_uci_root", "load_uci", "uci_datasets"]

#: Environment variable naming the UCI root folder.
UCI_ROOT_ENV = "MARGLIK_UCI_ROOT"
_FALLBACK_ROOT = Path("/work/shared/data/uci")


def _candidates() -> list[Path]:
    return [Path.cwd() / ".." / "shared" / "data" / "uci", _FALLBACK_ROOT]


def default_uci_root() -> Path:
    """The UCI root folder: ``$MARGLIK_UCI_ROOT`` if set, else ``../shared/data/uci``
    (relative to the working directory) if it exists, else ``/work/shared/data/uci`` if it
    exists.

    Raises:
        FileNotFoundError: if none of these exists.
    """
    env = os.environ.get(UCI_ROOT_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"${UCI_ROOT_ENV} is set to {env!r}, which is not a folder")
        return root
    for cand in _candidates():
        if cand.is_dir():
            return cand.resolve()
    tried = ", ".join(str(c) for c in _candidates())
    raise FileNotFoundError(
        f"no UCI data folder found (tried {tried}); set ${UCI_ROOT_ENV} or pass root="
    )


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        return default_uci_root()
    r = Path(root).expanduser()
    if not r.is_dir():
        raise FileNotFoundError(f"UCI root {str(r)!r} is not a folder")
    return r


def _data_dir(root: Path, name: str) -> Path:
    """``<root>/<name>/data`` (or ``<root>/<name>`` when the files lie there directly)."""
    for d in (root / name / "data", root / name):
        if (d / "data.txt").is_file():
            return d
    return root / name / "data"


def uci_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the data sets under ``root`` (default: :func:`default_uci_root`)."""
    r = _resolve_root(root)
    return sorted(
        p.name for p in r.iterdir() if p.is_dir() and (_data_dir(r, p.name) / "data.txt").is_file()
    )


def _read_ints(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"missing UCI split file {str(path)!r}")
    vals = np.loadtxt(path, dtype=np.float64, ndmin=1)
    ints = vals.astype(np.int64)
    if not np.array_equal(ints, vals):
        raise ValueError(f"{str(path)!r} holds non-integer indices")
    return ints


def n_uci_splits(name: str, root: str | os.PathLike | None = None) -> int:
    """Number of standard splits of data set ``name`` (from ``n_splits.txt``)."""
    d = _data_dir(_resolve_root(root), name)
    return int(_read_ints(d / "n_splits.txt")[0])


def load_uci(
    name: str,
    split: int = 0,
    root: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> RegressionSplit:
    """Load split ``split`` of a UCI regression set, standardised with training statistics.

    Args:
        name: Folder name, e.g. ``"yacht"`` or ``"bostonHousing"`` (see :func:`uci_datasets`).
        split: Split index in ``[0, n_splits)``.
        root: Folder holding the data sets; default :func:`default_uci_root`.
        dtype: Floating dtype of the tensors.

    Returns:
        A :class:`~marglik.data.embedded.RegressionSplit`: ``X_*`` of shape ``(N, D)``, ``y_*``
        of shape ``(N, 1)``, plus the training means/stds. ``y_std`` converts results to original
        units: RMSE scales by ``y_std``; a per-point log-likelihood shifts by ``-log(y_std)``.

    Raises:
        FileNotFoundError: if the root folder, the data set or one of its files is missing.
        ValueError: if ``split`` is out of range or the index files are inconsistent.
    """
    r = _resolve_root(root)
    d = _data_dir(r, name)
    if not (d / "data.txt").is_file():
        available = uci_datasets(r)
        raise FileNotFoundError(
            f"no UCI data set {name!r} under {str(r)!r}; available: {available}"
        )
    n_splits = int(_read_ints(d / "n_splits.txt")[0])
    if not isinstance(split, int) or not 0 <= split < n_splits:
        raise ValueError(f"split must be an integer in [0, {n_splits}) for {name!r}, got {split!r}")
    data = np.loadtxt(d / "data.txt", dtype=np.float64, ndmin=2)
    feat = _read_ints(d / "index_features.txt")
    tgt = _read_ints(d / "index_target.txt")
    train = _read_ints(d / f"index_train_{split}.txt")
    test = _read_ints(d / f"index_test_{split}.txt")
    n, n_cols = data.shape
    for label, idx, bound in (("feature", feat, n_cols), ("target", tgt, n_cols),
                              ("train", train, n), ("test", test, n)):
        if idx.size == 0 or idx.min() < 0 or idx.max() >= bound:
            raise ValueError(f"{name!r}: {label} indices out of range [0, {bound})")
    if tgt.size != 1:
        raise ValueError(f"{name!r}: expected one target column, got {tgt.tolist()}")
    X = torch.as_tensor(data[:, feat], dtype=dtype)
    y = torch.as_tensor(data[:, int(tgt[0])], dtype=dtype)
    return standardized_split(
        X, y, torch.as_tensor(train), torch.as_tensor(test), name=f"{name}[{split}]"
    )

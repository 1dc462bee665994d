"""Read numeric tables from CSV files and standardise features.

:func:`read_table` reads a CSV file with a header row into tensors and reports malformed input
with a one-line :class:`DataError`. :class:`Standardizer` holds per-column means and standard
deviations as plain tensors so it can be saved with :func:`torch.save` and loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DataError", "Standardizer", "Table", "read_table", "MIN_ROWS", "MAX_CLASSES"]

#: Tables with fewer data rows than this are rejected.
MIN_ROWS = 10
#: An integer-valued target with at most this many distinct values is read as class labels.
MAX_CLASSES = 20

_MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
_TASKS = ("classification", "regression")
_MAX_LISTED = 3


class DataError(ValueError):
    """A data file is missing or malformed; the message is one line and names the problem."""


@dataclass
class Table:
    """A table read by :func:`read_table`.

    Attributes:
        X: Features, float32 tensor of shape ``(N, D)``, columns in file order (target removed).
        y: Targets: int64 class indices of shape ``(N,)`` for classification, float32 of shape
            ``(N, 1)`` for regression.
        feature_names: Names of the ``D`` feature columns.
        target_name: Name of the target column.
        task: ``"classification"`` or ``"regression"``.
        classes: For classification, the original label of each class index (``classes[k]`` is
            the label mapped to ``k``; ints when the labels are integers, floats or strings
            otherwise); None for regression.
    """

    X: Tensor
    y: Tensor
    feature_names: list[str]
    target_name: str
    task: str
    classes: list[int | float | str] | None = None

    @property
    def label_map(self) -> dict[int | float | str, int] | None:
        """Mapping from original label to class index (None for regression)."""
        if self.classes is None:
            return None
        return {c: k for k, c in enumerate(self.classes)}


def _fmt_list(items: Sequence, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _parse_float(token: str) -> float | None:
    """Float value of ``token``; None when it is not a number."""
    try:
        return float(token)
    except ValueError:
        return None


def read_table(
    path: str | Path, target: str, task: str | None = None, delimiter: str = ","
) -> Table:
    """Read a CSV file with a header row into feature and target tensors.

    All columns other than ``target`` are features and must be numeric. The target must be
    numeric too, except that string labels are accepted for classification.

    Task inference (``task=None``): the target is read as classification when all its values are
    integers (``3`` or ``3.0``) with at most :data:`MAX_CLASSES` (20) distinct values, or when it
    holds non-numeric labels; otherwise as regression. Pass ``task`` explicitly to override,
    e.g. for a count target that should be regressed. Classification labels are mapped to
    ``0..K-1`` in sorted order; ``Table.classes`` holds the mapping.

    Args:
        path: Path to the CSV file.
        target: Name of the target column (as written in the header).
        task: ``"classification"``, ``"regression"`` or None to infer.
        delimiter: Field delimiter.

    Returns:
        A :class:`Table`.

    Raises:
        DataError: (a one-line message) if the file is missing or unreadable, has no header, the
            target column is missing (the available columns are listed), a row has the wrong
            number of fields, a column holds a non-numeric value (the column, the first bad value
            and its line are named), cells are empty or NaN (the count, the columns and the first
            few lines are named), or there are fewer than :data:`MIN_ROWS` data rows.
        ValueError: if ``task`` is not one of the accepted values.

    Lines in messages are file line numbers (the header is line 1).
    """
    if task is not None and task not in _TASKS:
        raise ValueError(f"task must be None, 'classification' or 'regression', got {task!r}")
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"data file {str(p)!r} {what}")
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip() and len(header or []) > 1):
                    continue  # blank line
                rows.append(row)
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"could not read {str(p)!r}: {e}") from e

    if header is None or not any(h.strip() for h in header):
        raise DataError(f"{str(p)!r} is empty or has no header row")
    names = [h.strip() for h in header]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{str(p)!r}: duplicate column name(s) {dupes}")
    if target not in names:
        raise DataError(f"{str(p)!r} has no column {target!r}; available columns: {names}")
    for row, line in zip(rows, lines, strict=True):
        if len(row) != len(names):
            raise DataError(
                f"{str(p)!r} line {line} has {len(row)} fields but the header has {len(names)}"
            )
    if len(rows) < MIN_ROWS:
        raise DataError(f"{str(p)!r} has only {len(rows)} data rows; at least {MIN_ROWS} needed")

    t_idx = names.index(target)
    cells = [[c.strip() for c in row] for row in rows]

    # Missing values (empty cells, NA/NaN tokens) anywhere in the table.
    missing_cols: dict[str, int] = {}
    missing_lines: list[int] = []
    for row, line in zip(cells, lines, strict=True):
        row_missing = False
        for j, c in enumerate(row):
            v = _parse_float(c)
            if c.lower() in _MISSING_TOKENS or (v is not None and math.isnan(v)):
                missing_cols[names[j]] = missing_cols.get(names[j], 0) + 1
                row_missing = True
        if row_missing:
            missing_lines.append(line)
    if missing_cols:
        n_missing = sum(missing_cols.values())
        cols = _fmt_list([f"{k!r} ({missing_cols[k]})" for k in names if k in missing_cols])
        raise DataError(
            f"{str(p)!r} has {n_missing} empty or NaN cell(s) in column(s) {cols}; "
            f"at line(s) {_fmt_list(missing_lines)}"
        )

    # Non-numeric values: features always; the target only for regression.
    values: list[list[float | None]] = [[_parse_float(c) for c in row] for row in cells]
    target_numeric = all(v[t_idx] is not None for v in values)
    for j, name in enumerate(names):
        if j == t_idx and (task == "classification" or (task is None and not target_numeric)):
            continue
        for row_vals, row, line in zip(values, cells, lines, strict=True):
            v = row_vals[j]
            if v is None or math.isinf(v):
                kind = "non-numeric" if v is None else "non-finite"
                raise DataError(
                    f"{str(p)!r}: column {name!r} has {kind} value {row[j]!r} at line {line}"
                    + (" (use task='classification' for string labels)" if j == t_idx else "")
                )

    feat_idx = [j for j in range(len(names)) if j != t_idx]
    X = torch.tensor([[row_vals[j] for j in feat_idx] for row_vals in values],
                     dtype=torch.float32).reshape(len(rows), len(feat_idx))

    if target_numeric:
        raw: list = [row_vals[t_idx] for row_vals in values]
        integer = all(float(v).is_integer() for v in raw)
        if task is None:
            task = "classification" if integer and len(set(raw)) <= MAX_CLASSES else "regression"
        if task == "classification" and integer:
            raw = [int(v) for v in raw]
    else:
        raw = [row[t_idx] for row in cells]
        task = "classification"

    if task == "regression":
        y = torch.tensor(raw, dtype=torch.float32).reshape(-1, 1)
        classes = None
    else:
        classes = sorted(set(raw))
        index = {c: k for k, c in enumerate(classes)}
        y = torch.tensor([index[v] for v in raw], dtype=torch.long)
    return Table(
        X=X,
        y=y,
        feature_names=[names[j] for j in feat_idx],
        target_name=target,
        task=task,
        classes=classes,
    )


class Standardizer:
    """Per-column standardisation ``(x - mean) / std`` with statistics from training data.

    Statistics are over dimension 0 (rows) with the population standard deviation
    (``correction=0``); columns with zero standard deviation get ``std = 1`` so that they are
    only centred.

    Example:
        >>> s = Standardizer().fit(X_train)
        >>> Xs = s.transform(X_test)
        >>> torch.save(s.state_dict(), "scaler.pt")
        >>> s2 = Standardizer.from_state_dict(torch.load("scaler.pt", weights_only=True))
    """

    def __init__(self, mean: Tensor | None = None, std: Tensor | None = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        self.mean = mean
        self.std = std

    @property
    def fitted(self) -> bool:
        """Whether statistics are set."""
        return self.mean is not None

    def fit(self, X: Tensor) -> Standardizer:
        """Compute per-column mean and std from ``X`` (shape ``(N, D)`` or ``(N,)``).

        Returns:
            ``self``.
        """
        X = torch.as_tensor(X)
        if X.ndim not in (1, 2) or X.shape[0] == 0:
            raise ValueError(f"X must have shape (N,) or (N, D) with N > 0, got {tuple(X.shape)}")
        if not X.is_floating_point():
            X = X.to(torch.get_default_dtype())
        if bool(torch.isnan(X).any()):
            raise ValueError("X contains NaN values")
        mean = X.mean(dim=0)
        std = X.std(dim=0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.mean, self.std = mean.detach().clone(), std.detach().clone()
        return self

    def _check(self, X: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError("Standardizer is not fitted; call fit() first")
        X = torch.as_tensor(X)
        if X.shape[1:] != self.mean.shape:
            raise ValueError(
                f"X has shape {tuple(X.shape)}; expected (N, *{tuple(self.mean.shape)})"
            )
        return X

    def transform(self, X: Tensor) -> Tensor:
        """Return ``(X - mean) / std``."""
        X = self._check(X)
        return (X - self.mean.to(X)) / self.std.to(X)

    def fit_transform(self, X: Tensor) -> Tensor:
        """Fit on ``X`` and return it transformed."""
        return self.fit(X).transform(X)

    def inverse_transform(self, X: Tensor) -> Tensor:
        """Return ``X * std + mean`` (undo :meth:`transform`)."""
        X = self._check(X)
        return X * self.std.to(X) + self.mean.to(X)

    def inverse_transform_std(self, std: Tensor) -> Tensor:
        """Scale standard deviations in standardised units back to original units."""
        std = self._check(std)
        return std * self.std.to(std)

    def state_dict(self) -> dict[str, Tensor]:
        """Statistics as plain tensors, ``{"mean": ..., "std": ...}``."""
        if self.mean is None or self.std is None:
            raise RuntimeError("Standardizer is not fitted; call fit() first")
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> Standardizer:
        """Rebuild a fitted Standardizer from :meth:`state_dict` output."""
        missing = {"mean", "std"} - set(state)
        if missing:
            raise ValueError(f"state is missing key(s) {sorted(missing)}")
        mean, std = torch.as_tensor(state["mean"]), torch.as_tensor(state["std"])
        if mean.shape != std.shape:
            raise ValueError(f"mean shape {tuple(mean.shape)} != std shape {tuple(std.shape)}")
        return cls(mean.clone(), std.clone())

    def __repr__(self) -> str:
        if self.mean is None:
            return "Standardizer(unfitted)"
        return f"Standardizer(n_features={tuple(self.mean.shape)})"

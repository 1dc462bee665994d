"""Read numeric tables from CSV files: the library's one CSV reader.

:func:`read_table` reads a CSV file with a header row into tensors and reports malformed input
with a one-line :class:`DataError` (a :class:`~marglik.errors.MarglikError`, which the command
line turns into exit status 2). :class:`~marglik.data.standardize.Standardizer`, the standardiser,
lives in :mod:`marglik.data.standardize` and is re-exported here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from marglik.data.standardize import Standardizer
from marglik.errors import MarglikError

__all__ = [
    "DataError",
    "MAX_CLASSES",
    "MIN_ROWS",
    "MISSING_TOKENS",
    "Standardizer",
    "Table",
    "encode_target",
    "parse_float",
    "read_csv_rows",
    "read_table",
]

#: Tables with fewer data rows than this are rejected.
MIN_ROWS = 10
#: An integer-valued target with at most this many distinct values is read as class labels.
MAX_CLASSES = 20

#: Cells read as missing (compared in lower case, after stripping): empty, NA, NaN, null, ...
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
_MISSING_TOKENS = MISSING_TOKENS
_TASKS = ("classification", "regression")
_MAX_LISTED = 3


class DataError(MarglikError):
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


def parse_float(token: str) -> float | None:
    """Float value of ``token``; None when it is not a number."""
    try:
        return float(token)
    except ValueError:
        return None


def read_csv_rows(
    path: str | Path, delimiter: str = ","
) -> tuple[list[str], list[list[str]], list[int]]:
    """Header and data rows of a CSV file, as strings (the reading step of :func:`read_table`).

    Blank lines are skipped; cells are returned as written (not stripped, not parsed). Callers
    check the row lengths and parse the cells they use.

    Returns:
        ``(names, rows, lines)``: the stripped column names of the header row, the data rows and
        the file line number of each (the header is line 1).

    Raises:
        DataError: (a one-line message) if the file is missing or unreadable, is empty or has no
            header row, or the header repeats a column name.
    """
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
    return names, rows, lines


def encode_target(
    values: Sequence[float | None], cells: Sequence[str], task: str | None
) -> tuple[Tensor, str, list[int | float | str] | None]:
    """``(y, task, classes)`` of a target column without missing cells (:func:`read_table`'s rule).

    ``values`` are the parsed cells (None where not a number), ``cells`` the stripped text. With
    ``task=None`` the target is classification when every value is an integer and there are at
    most :data:`MAX_CLASSES` of them, or when any cell is not a number; else regression. Class
    labels are sorted and mapped to ``0..K-1`` (ints for integer labels); y is int64 (N,) for
    classification, float32 (N, 1) for regression. The caller rejects non-numeric regression
    targets.
    """
    if all(v is not None for v in values):
        raw: list = list(values)
        integer = all(float(v).is_integer() for v in raw)
        if task is None:
            task = "classification" if integer and len(set(raw)) <= MAX_CLASSES else "regression"
        if task == "classification" and integer:
            raw = [int(v) for v in raw]
    else:
        raw = list(cells)
        task = "classification"
    if task == "regression":
        return torch.tensor(raw, dtype=torch.float32).reshape(-1, 1), task, None
    classes = sorted(set(raw))
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[v] for v in raw], dtype=torch.long), task, classes


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
    names, rows, lines = read_csv_rows(p, delimiter)
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
            v = parse_float(c)
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
    values: list[list[float | None]] = [[parse_float(c) for c in row] for row in cells]
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

    y, task, classes = encode_target([v[t_idx] for v in values],
                                     [row[t_idx] for row in cells], task)
    return Table(
        X=X,
        y=y,
        feature_names=[names[j] for j in feat_idx],
        target_name=target,
        task=task,
        classes=classes,
    )

"""Reading the feature columns of a CSV file for prediction.

The file is read by :func:`marglik.data.tabular.read_csv_rows`, the reading step of
:func:`marglik.data.read_table`. Unlike :func:`~marglik.data.read_table`, :func:`read_features`
needs no target column, accepts any number of rows and parses only the named feature columns:
the others (e.g. the target) may hold anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from marglik.data.tabular import read_csv_rows
from marglik.errors import MarglikError

__all__ = ["read_features"]


def read_features(path: str | Path, features: Sequence[str]) -> Tensor:
    """The named columns of a CSV file with a header row as a float32 tensor (N, D).

    Raises:
        MarglikError: (a one-line message; :class:`marglik.data.DataError` for the reading
            step) if the file is missing, unreadable or has no header, lacks a feature column,
            has no data rows or a row of the wrong length, or a feature cell is non-numeric,
            empty, NaN or infinite (the column and line are named).
    """
    header, rows, lines = read_csv_rows(path)
    name = str(Path(path))
    features = list(features)
    missing = [c for c in features if c not in header]
    if missing:
        raise MarglikError(
            f"{name!r} lacks feature column(s) {missing} that the model was trained on"
        )
    if not rows:
        raise MarglikError(f"{name!r} has no data rows")
    index = [header.index(c) for c in features]
    values = torch.empty(len(rows), len(features))
    nan_cells: list[str] = []
    for i, (line, row) in enumerate(zip(lines, rows)):
        if len(row) != len(header):
            raise MarglikError(
                f"{name!r} line {line} has {len(row)} fields but the header has {len(header)}"
            )
        for j, k in enumerate(index):
            cell = row[k].strip()
            try:
                v = float(cell) if cell else math.nan
            except ValueError:
                raise MarglikError(
                    f"{name!r}: column {features[j]!r} has non-numeric value {cell!r} "
                    f"at line {line}"
                ) from None
            if math.isnan(v) or math.isinf(v):
                nan_cells.append(f"{features[j]!r} line {line}")
            values[i, j] = v
    if nan_cells:
        shown = ", ".join(nan_cells[:3]) + (", ..." if len(nan_cells) > 3 else "")
        raise MarglikError(
            f"{name!r} has {len(nan_cells)} empty, NaN or infinite feature cell(s): {shown}"
        )
    return values

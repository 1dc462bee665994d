"""Raw CSV tables to model inputs: column kinds, one-hot encoding, missing cells.

:func:`prepare_table` reads a CSV file for ``marglik fit``: each feature column is numeric (every
non-missing cell is a number) or categorical (no cell is a number, or named in
``categorical``); a column mixing numbers and text is an error unless named in ``categorical``.
Categorical columns are one-hot encoded (one column per value seen in training, named
``column=value``). Missing cells (:data:`marglik.data.tabular.MISSING_TOKENS`: empty, NA, NaN,
…) follow the policy ``missing``:

- ``"error"`` (the default of ``marglik fit``): they are reported, with their count per column
  and their lines, and nothing is fitted;
- ``"drop"``: rows with a missing cell are left out;
- ``"impute"``: a missing feature cell takes the training mean (numeric) or the most frequent
  value (categorical); rows with a missing target are left out.

Every problem of a file (missing or unknown columns, rows of the wrong length, mixed or
non-finite columns, missing cells, too few rows) is collected and raised at once in one
:class:`~marglik.data.DataError` line. The fitted :class:`Preprocessing` is saved as
``preprocessing.json`` next to the model, and :meth:`Preprocessing.apply` gives ``marglik
predict`` the same encoding: the same columns and categories (a value not seen in training is
encoded as no category, with a note), the training fill values for missing cells under
``"impute"``; under ``"drop"`` rows with missing cells get no prediction.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from marglik.applications.tabular.cells import (
    MAX_CATEGORIES,
    check_numeric,
    column_cells,
    column_kind,
    listing,
    missing_cells,
    missing_problem,
    raise_problems,
    whole_rows,
)
from marglik.data.tabular import (
    MIN_ROWS,
    DataError,
    Table,
    encode_target,
    parse_float,
    read_csv_rows,
)

__all__ = [
    "MAX_CATEGORIES",
    "MISSING_POLICIES",
    "Column",
    "Prepared",
    "Preprocessing",
    "prepare_table",
]

#: what to do with missing cells
MISSING_POLICIES = ("error", "drop", "impute")
#: format tag of ``preprocessing.json``
FORMAT = "marglik.preprocessing/1"


@dataclass
class Column:
    """One raw feature column: its kind, the value that fills a missing cell, its categories."""

    name: str
    kind: str  # "numeric" | "categorical"
    fill: float | str
    categories: list[str] = field(default_factory=list)

    @property
    def encoded_names(self) -> list[str]:
        """Names of the model inputs this column becomes."""
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories]

    def encode(self, cells: Sequence[str]) -> tuple[Tensor, int]:
        """Model inputs (N, width) of non-missing stripped cells, and how many categorical
        cells held a value not seen in training (encoded as all zeros)."""
        if self.kind == "numeric":
            return torch.tensor([float(c) for c in cells], dtype=torch.float32)[:, None], 0
        index = {c: k for k, c in enumerate(self.categories)}
        idx = torch.tensor([index.get(c, -1) for c in cells], dtype=torch.long)
        known = idx >= 0
        onehot = torch.zeros(len(cells), len(self.categories), dtype=torch.float32)
        onehot[known.nonzero().squeeze(1), idx[known]] = 1.0
        return onehot, int((~known).sum())


@dataclass
class Preprocessing:
    """What :func:`prepare_table` learned from the training file; JSON-able."""

    target: str
    missing: str
    columns: list[Column]
    ignored: list[str] = field(default_factory=list)

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded model inputs, in order."""
        return [n for c in self.columns for n in c.encoded_names]

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError("not a marglik preprocessing.json")
        cols = [Column(**c) for c in data["columns"]]
        return cls(data["target"], data["missing"], cols, list(data.get("ignored", [])))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "preprocessing.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Preprocessing | None:
        """The folder's ``preprocessing.json``; None when it has none (an older model)."""
        path = Path(folder) / "preprocessing.json"
        if not path.is_file():
            return None
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise DataError(f"{str(path)!r} is broken: {err}") from None

    def apply(self, path: str | Path) -> tuple[Tensor, Tensor, list[str]]:
        """Encode the feature columns of a CSV file as in training.

        Returns:
            ``(X, kept, notes)``: inputs (M, D) of the rows that get a prediction, a boolean
            mask (N,) of those rows among the file's, and notes for the user (unknown
            categories, filled or skipped cells).

        Raises:
            DataError: every problem of the file in one line (missing columns, rows of the
                wrong length, text or non-finite values in numeric columns, missing cells
                under the policy ``"error"``).
        """
        names, rows, lines = read_csv_rows(path)
        problems: list[str] = []
        absent = [c.name for c in self.columns if c.name not in names]
        if absent:
            problems.append(f"lacks feature column(s) {absent} that the model was trained on")
        rows, lines = whole_rows(names, rows, lines, problems)
        if not rows and not problems:
            problems.append("has no data rows")
        cols = [c for c in self.columns if c.name in names]
        cells = column_cells(names, rows, [c.name for c in cols])
        miss = {c.name: missing_cells(cells[c.name]) for c in cols}
        for c in cols:
            if c.kind == "numeric":
                check_numeric(c.name, cells[c.name], miss[c.name], lines, problems)
        n_missing = {c.name: sum(miss[c.name]) for c in cols if any(miss[c.name])}
        if n_missing and self.missing == "error":
            problems.append(missing_problem(n_missing, miss, lines, "the model was fitted "
                                             "with --missing error"))
        raise_problems(path, problems)
        kept = [not any(miss[c.name][i] for c in cols) for i in range(len(rows))]
        if self.missing != "drop":
            kept = [True] * len(rows)
        notes = []
        blocks = []
        for c in cols:
            column = [str(c.fill) if m else v for v, m, k in
                      zip(cells[c.name], miss[c.name], kept) if k]
            block, unknown = c.encode(column)
            blocks.append(block)
            if unknown:
                notes.append(f"column {c.name!r}: {unknown} row(s) with a value not seen in "
                             "training, encoded as no category")
        if n_missing:
            done = ("filled with the training values" if self.missing == "impute"
                    else f"{kept.count(False)} row(s) skipped (no prediction)")
            notes.append(f"{sum(n_missing.values())} missing cell(s) in "
                         f"{listing([repr(k) for k in n_missing])}: {done}")
        X = torch.cat(blocks, dim=1) if blocks else torch.zeros(sum(kept), 0)
        return X, torch.tensor(kept, dtype=torch.bool), notes


@dataclass
class Prepared:
    """:func:`prepare_table`'s result: the encoded table, its preprocessing, a summary."""

    table: Table
    preprocessing: Preprocessing
    summary: list[str]
    n_missing: int = 0


def prepare_table(
    path: str | Path,
    target: str,
    *,
    task: str | None = None,
    missing: str = "error",
    categorical: Sequence[str] = (),
    ignore: Sequence[str] = (),
) -> Prepared:
    """Read a CSV file with a header row, encode its features and handle missing cells.

    Args:
        path: the CSV file.
        target: the target column; every other column not in ``ignore`` is a feature.
        task: ``"classification"``, ``"regression"`` or None to infer
            (:func:`marglik.data.tabular.encode_target`).
        missing: ``"error"``, ``"drop"`` or ``"impute"`` (module docstring).
        categorical: columns to one-hot encode even if their cells are numbers.
        ignore: columns to leave out.

    Returns:
        The encoded :class:`~marglik.data.Table` (one-hot columns named ``column=value``), the
        :class:`Preprocessing` to apply to new files, and summary lines (columns, encodings,
        what was done with missing cells).

    Raises:
        DataError: every problem of the file at once, in one line.
        ValueError: ``missing`` or ``task`` not one of the accepted values.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if task not in (None, "classification", "regression"):
        raise ValueError(f"task must be None, 'classification' or 'regression', got {task!r}")
    names, rows, lines = read_csv_rows(path)
    problems: list[str] = []
    if target not in names:
        problems.append(f"has no column {target!r}; available columns: {names}")
    unknown = [c for c in (*categorical, *ignore) if c not in names]
    if unknown:
        problems.append(f"has no column(s) {unknown} named in --categorical / --ignore")
    if target in categorical or target in ignore:
        problems.append(f"the target {target!r} cannot be --categorical or --ignore'd")
    rows, lines = whole_rows(names, rows, lines, problems)
    features = [n for n in names if n != target and n not in ignore]
    if not features:
        problems.append(f"has no feature columns besides the target {target!r}")
    used = features + ([target] if target in names else [])
    cells = column_cells(names, rows, used)
    miss = {n: missing_cells(cells[n]) for n in used}
    kinds = {n: column_kind(n, cells[n], miss[n], lines, categorical, problems)
             for n in features}

    t_values = [parse_float(c) for c in cells.get(target, [])]
    if task == "regression" and target in names:
        text = [(c, ln) for c, v, m, ln in zip(cells[target], t_values, miss[target], lines)
                if not m and v is None]
        if text:
            problems.append(f"column {target!r} has non-numeric value {text[0][0]!r} at line "
                            f"{text[0][1]} (use --task classification for string labels)")
    counts = {n: sum(miss[n]) for n in used if any(miss[n])}
    if counts and missing == "error":
        problems.append(missing_problem(counts, miss, lines,
                                         "pass --missing impute or --missing drop"))
    if missing == "drop":
        kept = [not any(miss[n][i] for n in used) for i in range(len(rows))]
    else:
        kept = [not miss[target][i] if target in miss else True for i in range(len(rows))]
    n_kept = sum(kept)
    if n_kept < MIN_ROWS and len(rows) >= MIN_ROWS:
        problems.append(f"keeps only {n_kept} of {len(rows)} data rows after dropping missing "
                        f"cells; at least {MIN_ROWS} needed")
    elif len(rows) < MIN_ROWS:
        problems.append(f"has only {len(rows)} data rows; at least {MIN_ROWS} needed")
    raise_problems(path, problems)

    columns, blocks = [], []
    for n in features:
        observed = [c for c, m, k in zip(cells[n], miss[n], kept) if k and not m]
        if kinds[n] == "numeric":
            column = Column(n, "numeric", sum(map(float, observed)) / len(observed))
        else:
            freq = Counter(observed)
            top = max(sorted(freq), key=lambda c: freq[c])  # ties: the first in sorted order
            column = Column(n, "categorical", top, sorted(freq))
        values = [str(column.fill) if m else c for c, m, k in zip(cells[n], miss[n], kept) if k]
        columns.append(column)
        blocks.append(column.encode(values)[0])
    y, task, classes = encode_target(
        [v for v, k in zip(t_values, kept) if k],
        [c for c, k in zip(cells[target], kept) if k],
        task,
    )
    pre = Preprocessing(target, missing, columns, list(ignore))
    table = Table(torch.cat(blocks, dim=1), y, pre.feature_names, target, task, classes)
    summary = _summary(path, pre, table, counts, kept, lines)
    return Prepared(table, pre, summary, sum(counts.values()))


def _summary(path: str | Path, pre: Preprocessing, table: Table, counts: dict[str, int],
             kept: list[bool], lines: list[int]) -> list[str]:
    """What was read and done, for the user."""
    numeric = [c.name for c in pre.columns if c.kind == "numeric"]
    cats = [c for c in pre.columns if c.kind == "categorical"]
    what = f"{table.task}" + (f", {len(table.classes)} classes" if table.classes else "")
    out = [f"read {path}: {len(kept)} rows; target {pre.target!r} ({what})"]
    if numeric:
        out.append(f"numeric features ({len(numeric)}): {listing(numeric, 8)}")
    if cats:
        width = sum(len(c.categories) for c in cats)
        listed = listing([f"{c.name} ({len(c.categories)})" for c in cats], 8)
        out.append(f"categorical features ({len(cats)}), one-hot encoded into {width} "
                   f"columns: {listed}")
    if pre.ignored:
        out.append(f"ignored columns: {listing(pre.ignored, 8)}")
    if not counts:
        out.append("missing cells: none")
        return out
    cells = f"{sum(counts.values())} missing cell(s) in {listing([repr(k) for k in counts], 8)}"
    dropped = [ln for ln, k in zip(lines, kept) if not k]
    if pre.missing == "drop":
        out.append(f"{cells}: dropped {len(dropped)} row(s) (line(s) {listing(dropped)})")
    else:
        filled = {k: v for k, v in counts.items() if k != pre.target}
        text = (f"{sum(filled.values())} feature cell(s) imputed (numeric: training mean; "
                f"categorical: most frequent value)")
        if dropped:
            text += f"; {len(dropped)} row(s) with a missing target dropped"
        out.append(f"{cells}: {text}")
    return out

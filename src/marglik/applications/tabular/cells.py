"""Checks of the raw cells of a CSV table, every problem collected (for :mod:`.preprocessing`).

Each check appends one-line problems to a list instead of raising, so that
:func:`raise_problems` can report every problem of a file at once in one
:class:`~marglik.data.DataError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from marglik.data.tabular import MISSING_TOKENS, DataError, parse_float

__all__ = ["MAX_CATEGORIES", "check_numeric", "column_cells", "column_kind", "listing",
           "missing_cells", "missing_problem", "raise_problems", "whole_rows"]

#: a categorical column with more distinct values than this is reported (an identifier?)
MAX_CATEGORIES = 100
_SHOWN = 3


def listing(items: Sequence, limit: int = _SHOWN) -> str:
    """The first ``limit`` items, comma-separated, and how many there are in all."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def whole_rows(names: list[str], rows: list[list[str]], lines: list[int],
               problems: list[str]) -> tuple[list[list[str]], list[int]]:
    """The rows with as many fields as the header; a problem naming the others."""
    bad = [line for row, line in zip(rows, lines) if len(row) != len(names)]
    if bad:
        problems.append(f"{len(bad)} row(s) do not have the header's {len(names)} fields: "
                        f"line(s) {listing(bad)}")
    good = [(row, line) for row, line in zip(rows, lines) if len(row) == len(names)]
    return [r for r, _ in good], [ln for _, ln in good]


def column_cells(names: list[str], rows: list[list[str]],
                 wanted: list[str]) -> dict[str, list[str]]:
    """Stripped cells of the wanted columns."""
    return {n: [row[names.index(n)].strip() for row in rows] for n in wanted}


def missing_cells(cells: list[str]) -> list[bool]:
    """Per cell: empty, a missing-value token (NA, NaN, ...) or a NaN number."""
    out = []
    for c in cells:
        v = parse_float(c)
        out.append(c.lower() in MISSING_TOKENS or (v is not None and math.isnan(v)))
    return out


def check_numeric(name: str, cells: list[str], miss: list[bool], lines: list[int],
                  problems: list[str]) -> None:
    """Problems of a numeric column: text cells, infinite values."""
    text = [(c, ln) for c, m, ln in zip(cells, miss, lines) if not m and parse_float(c) is None]
    if text:
        problems.append(f"column {name!r} has non-numeric value {text[0][0]!r} at line "
                        f"{text[0][1]}" + (f" ({len(text)} cells in all)" if len(text) > 1
                                          else ""))
    inf = [(c, ln) for c, m, ln in zip(cells, miss, lines)
           if not m and (v := parse_float(c)) is not None and math.isinf(v)]
    if inf:
        problems.append(f"column {name!r} has non-finite value {inf[0][0]!r} at line "
                        f"{inf[0][1]}" + (f" ({len(inf)} cells in all)" if len(inf) > 1 else ""))


def missing_problem(counts: dict[str, int], miss: dict[str, list[bool]], lines: list[int],
                    hint: str) -> str:
    """One problem naming the missing cells per column and their lines, with ``hint``."""
    rows = [ln for i, ln in enumerate(lines) if any(miss[k][i] for k in counts)]
    cols = listing([f"{k!r} ({v})" for k, v in counts.items()])
    return (f"{sum(counts.values())} empty or NaN cell(s) in column(s) {cols}; at line(s) "
            f"{listing(rows)} ({hint})")


def raise_problems(path: str | Path, problems: list[str]) -> None:
    """Raise one :class:`DataError` line naming every problem of ``path`` (none: return)."""
    if len(problems) == 1:
        raise DataError(f"{str(path)!r} {problems[0]}" if problems[0].startswith(
            ("has ", "lacks ", "keeps ")) else f"{str(path)!r}: {problems[0]}")
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise DataError(f"{str(path)!r} has {len(problems)} problems: {listed}")


def column_kind(name: str, cells: list[str], miss: list[bool], lines: list[int],
                categorical: Sequence[str], problems: list[str]) -> str | None:
    """``"numeric"`` / ``"categorical"``, or None (a problem is recorded)."""
    observed = [(c, ln) for c, m, ln in zip(cells, miss, lines) if not m]
    if not observed:
        problems.append(f"column {name!r} has no values (every cell is missing)")
        return None
    text = [(c, ln) for c, ln in observed if parse_float(c) is None]
    if name in categorical or len(text) == len(observed):
        distinct = len({c for c, _ in observed})
        if distinct > MAX_CATEGORIES:
            problems.append(f"categorical column {name!r} has {distinct} distinct values (more "
                            f"than {MAX_CATEGORIES}; an identifier? pass --ignore {name})")
            return None
        return "categorical"
    if text:
        problems.append(f"column {name!r} mixes numbers and text: non-numeric value "
                        f"{text[0][0]!r} at line {text[0][1]} ({len(text)} of {len(observed)} "
                        f"cells); fix the cells, or pass --categorical {name}")
        return None
    check_numeric(name, cells, miss, lines, problems)
    return "numeric"

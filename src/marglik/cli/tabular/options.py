"""The options of ``marglik fit`` / ``marglik predict``: parsed and checked here, one line each.

argparse reads the numeric options as text, so that every bad value (``--lr -1``, ``--lr nan``,
``--epochs 1.5``, ``--epochs -3``) is reported by :class:`~marglik.cli.CLIError` as one line with
exit status 2, never argparse's usage block or a traceback. :func:`combination_warnings` names
option combinations that do nothing.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

from marglik.cli import CLIError

__all__ = ["FitOptions", "check_fit_options", "check_threads", "combination_warnings"]


@dataclass(frozen=True)
class FitOptions:
    """Checked options of ``marglik fit``."""

    hidden: list[int]
    epochs: int | None
    evidence_every: int | None
    lr: float
    seed: int
    threads: int
    interactions: int = 0


def integer(flag: str, text: str | None, minimum: int) -> int | None:
    """``text`` as an int ≥ ``minimum`` (None stays None); :class:`CLIError` otherwise."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise CLIError(f"{flag} must be an integer, got {text!r}") from None
    if value < minimum:
        raise CLIError(f"{flag} must be at least {minimum}, got {value}")
    return value


def positive_float(flag: str, text: str) -> float:
    """``text`` as a finite float > 0; :class:`CLIError` for text, NaN, ±inf, ≤ 0."""
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{flag} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise CLIError(f"{flag} must be a finite number > 0, got {text!r}")
    return value


def parse_hidden(text: str) -> list[int]:
    """``"50"`` or ``"50,50"`` → widths of the hidden layers."""
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise CLIError(f"--hidden must be positive integers separated by commas, got {text!r}")
    return widths


def check_threads(text: str) -> int:
    """``--threads`` as an int ≥ 1."""
    return integer("--threads", text, 1)


#: ``--hidden`` when not given, per ``--model``
DEFAULT_HIDDEN = {"mlp": "50", "additive": "64"}  # additive: fit_additive's default


def check_fit_options(args: argparse.Namespace) -> FitOptions:
    """Every option of ``marglik fit`` checked (the first bad one raises)."""
    seed = integer("--seed", args.seed, 0)
    if seed >= 2**63:
        raise CLIError(f"--seed must be below 2**63, got {seed}")
    return FitOptions(
        hidden=parse_hidden(
            args.hidden if args.hidden is not None
            else DEFAULT_HIDDEN.get(getattr(args, "model", "mlp"), "50")
        ),
        epochs=integer("--epochs", args.epochs, 1),
        evidence_every=integer("--evidence-every", args.evidence_every, 1),
        lr=positive_float("--lr", args.lr),
        seed=seed,
        threads=check_threads(args.threads),
        interactions=integer("--interactions", getattr(args, "interactions", "0"), 0),
    )


def combination_warnings(
    opts: FitOptions, epochs: int, every: int, n_missing: int, missing: str
) -> list[str]:
    """Warnings for options that do nothing, given the budget in effect (``epochs``, ``every``)
    and the number of missing cells in the file."""
    out = []
    if every > epochs:
        out.append(
            f"--evidence-every {every} is larger than the {epochs} epochs: the evidence is "
            "never evaluated, so the prior precision (and noise) keep their initial value 1"
        )
    elif epochs % every:
        last = epochs - epochs % every
        out.append(
            f"the last {epochs % every} epoch(s) come after the last evidence update (epoch "
            f"{last}) and are discarded (the state kept is the best at an update); make "
            "--epochs a multiple of --evidence-every"
        )
    if n_missing == 0 and missing != "error":
        out.append(f"--missing {missing} does nothing: the file has no missing cells")
    cores = os.cpu_count() or 1
    if opts.threads > cores:
        out.append(f"--threads {opts.threads} is more than the {cores} CPU cores")
    return out

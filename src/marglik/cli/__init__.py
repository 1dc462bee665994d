"""The ``marglik`` command line: one sub-command per module in this package.

Each sub-command module (or package) exposes ``register(subparsers)``, which adds its parser and
sets ``func(args) -> int``. Bad input raises :class:`marglik.errors.MarglikError` — from the
library, or :class:`CLIError` for a bad option; :func:`main` turns it into a one-line message on
stderr and exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from marglik.errors import MarglikError

#: sub-command modules, in the order ``marglik --help`` lists them
COMMANDS = ["demo", "tabular", "causal"]


class CLIError(MarglikError):
    """Bad command-line input (an option out of range): printed as one line, exit status 2."""


def output_folder(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents) up front; :class:`CLIError` if not."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create output folder {str(out)!r}: {err.strerror}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marglik", description="Laplace approximations and evidence-based model selection."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"marglik.cli.{name}")
        except ModuleNotFoundError as err:  # a sub-command not built yet / optional extra missing
            if err.name and err.name.startswith("marglik.cli"):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MarglikError as err:
        print(f"marglik {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

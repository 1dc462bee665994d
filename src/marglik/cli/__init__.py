"""The ``marglik`` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Bad input raises :class:`CLIError`; :func:`main` turns it into a one-line
message on stderr and exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command modules, in the order ``marglik --help`` lists them
COMMANDS = ["demo", "tabular", "causal"]


class CLIError(Exception):
    """Bad user input: printed as one line, exit status 2."""


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
    except CLIError as err:
        print(f"marglik {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Where a benchmark's numbers came from: the commit of the checkout that ran it."""

from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """The short hash of HEAD of the checkout holding ``benchmarks/`` ("unknown" outside git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

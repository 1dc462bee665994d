"""Progress of ``marglik fit``: a tqdm bar on a terminal, plain lines otherwise.

When stderr is not a terminal (a log file, a pipe, a batch job) a bar would print nothing
useful, so :class:`ProgressLines` writes one line to stderr every 10 % of the epochs or every
10 seconds, whichever comes first, and after the last epoch.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["ProgressLines", "progress_bar_wanted"]


def progress_bar_wanted() -> bool:
    """A tqdm bar only on an interactive terminal (it goes to stderr)."""
    return sys.stderr.isatty()


class ProgressLines:
    """``callback(epoch, history)`` for :func:`marglik.applications.tabular.fit_table`."""

    def __init__(self, epochs: int, stream: TextIO | None = None, seconds: float = 10.0) -> None:
        self.epochs = epochs
        self.stream = stream
        self.seconds = seconds
        self.every = max(1, math.ceil(epochs / 10))
        self.start = self.last_time = time.perf_counter()
        self.last_epoch = 0

    def __call__(self, epoch: int, history: dict) -> None:
        done = epoch + 1
        now = time.perf_counter()
        if not (done == self.epochs or done - self.last_epoch >= self.every
                or now - self.last_time >= self.seconds):
            return
        self.last_epoch, self.last_time = done, now
        evidence = [v for v in history["log_marglik"] if not math.isnan(v)]
        best = f", best log evidence {max(evidence):.4g}" if evidence else ""
        print(
            f"marglik fit: epoch {done}/{self.epochs}, loss {history['loss'][-1]:.4g}{best}, "
            f"{now - self.start:.1f} s",
            file=self.stream or sys.stderr,
            flush=True,
        )

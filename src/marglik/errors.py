"""The library's error type for bad user input.

:class:`MarglikError` is a ``ValueError`` whose message names the problem in one line. Library
code raises it (or a subclass) for input a user can fix; the command line prints the message and
exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

__all__ = ["MarglikError"]


class MarglikError(ValueError):
    """Bad input (data, files, options): the message says what is wrong and how to fix it."""

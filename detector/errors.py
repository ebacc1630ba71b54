"""The one base of every error a user can cause (bad input, config, file or flag).

Each such error class derives from :class:`DetectorError` and keeps its older base
(``ValueError``, ``OSError``, ``RuntimeError``), so ``except ValueError`` still catches a
``ConfigError``. Every CLI catches :class:`DetectorError`, prints its message (which names the
file and the fix) without a traceback, and exits with status 2 (:func:`report`).
"""
from __future__ import annotations

import sys
from typing import TextIO

#: Exit status of a CLI run stopped by a user-caused error.
EXIT_USER_ERROR = 2


class DetectorError(Exception):
    """Base of every user-caused error; ``str(e)`` is the message shown to the user."""


def report(e: BaseException, prefix: str = "error", stream: TextIO | None = None) -> int:
    """Print ``prefix: message`` of a user-caused error to stderr; return the exit status 2."""
    print(f"{prefix}: {e}", file=stream or sys.stderr)
    return EXIT_USER_ERROR

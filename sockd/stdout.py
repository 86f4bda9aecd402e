"""A command's output on stdout, for `sockd` and `sockd bench` alike."""

from __future__ import annotations

import os
import sys


def emit(text: str) -> None:
    """Print `text`; a reader that stops early (`sockd --schema | head`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

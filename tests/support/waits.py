"""What a test waits with: one bound for any single wait, and a poll until a condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable

TIMEOUT = 10.0  # seconds any single wait in a test may take before it fails


PUBLISHED_WITHIN = 10.0  # seconds to wait for workers' counts to reach the endpoint


def eventually(check: Callable[[], bool], what: str, timeout: float = PUBLISHED_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def becomes(get: Callable[[], object], expected: object, what: str, timeout: float = PUBLISHED_WITHIN) -> None:
    """Wait until get() == expected; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while (seen := get()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {seen!r}, not {expected!r}, after {timeout} s")
        time.sleep(0.05)

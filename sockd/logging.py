"""structlog, configured once per process: JSON lines for machines, a console renderer for people;
and Throttled, for what a flood would otherwise repeat."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from typing import Any, TextIO

import structlog

from sockd.config import LoggingConfig


def configure(settings: LoggingConfig, stream: TextIO = sys.stderr, **context: Any) -> None:
    """Log to `stream` at `settings.level`; `context` (e.g. the listener a worker serves) is added
    to every line, from every thread."""
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())

    def add_context(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        for key, value in context.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_context,
            # log.exception's traceback as text in a JSON line (the console renderer draws its own).
            *([] if console else [structlog.processors.format_exc_info]),
            structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[settings.level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        # Not cached: a reload may change the level, and a module's logger must follow it.
        cache_logger_on_first_use=False,
    )


log = structlog.get_logger()


def exit_status(code: int | None) -> dict[str, int | str | None]:
    """How a child process ended, for its log line: `code` for an exit, `signal` by name (SIGKILL)
    for a process killed by one, which Popen-style return codes give as the signal's negative."""
    if code is not None and code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:  # a real-time signal has no name of its own
            return {"signal": f"SIG{-code}"}
    return {"code": code}


class Throttled:
    """A warning said at most once per `every` seconds, with how often it happened meanwhile: a
    flood must not turn into a flood of log lines."""

    def __init__(self, event: str, every: float = 10.0) -> None:
        self.event = event
        self.every = every
        self.said_at = -math.inf
        self.unsaid = 0
        self._lock = threading.Lock()  # the threads of a blocking model, or of the metrics endpoint

    def __call__(self, **details: object) -> None:
        with self._lock:
            self.unsaid += 1
            now = time.monotonic()
            if now - self.said_at < self.every:
                return
            count, self.said_at, self.unsaid = self.unsaid, now, 0
        log.warning(self.event, count=count, **details)

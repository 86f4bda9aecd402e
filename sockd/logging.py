"""structlog, configured once per process: JSON lines for machines, a console renderer for people;
and Throttled, for what a flood would otherwise repeat.

When stderr is the journal (systemd sets $JOURNAL_STREAM to its device and inode), each line
starts with its syslog priority as sd-daemon(3) says, `<4>` for a warning: journald strips it
and files the line under that priority, so `journalctl -p warning -u sockd` shows warnings and
errors only. The prefix, not the native journal protocol: it needs no socket of sockd's own in
every process (workers inherit stderr, and with it the journal), and the line after it is the
configured format still, so JSON fields stay fields for `jq`.
"""

from __future__ import annotations

import io
import logging
import math
import os
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
    journal = is_journal(stream)

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
            *([add_priority] if journal else []),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[settings.level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        # Not cached: a reload may change the level, and a module's logger must follow it.
        cache_logger_on_first_use=False,
    )


# Syslog priorities by structlog's method name (`exception` logs at error).
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}


def is_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal's: $JOURNAL_STREAM names its device and inode
    (systemd.exec(5)); a stream sockd's stderr was redirected to since is not."""
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # no descriptor (a StringIO), or closed
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{status.st_dev}:{status.st_ino}"


def priority(level: str) -> str:
    """The `<N>` prefix journald reads a line's priority from (sd-daemon(3))."""
    return f"<{PRIORITIES.get(level, 6)}>"


def add_priority(_: Any, method: str, line: Any) -> str:
    """The last processor when stderr is the journal: the rendered line (a str, though structlog's
    types say an event dict: the renderer came before), prefixed."""
    return priority(method) + str(line)


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

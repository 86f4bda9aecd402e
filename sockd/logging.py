"""structlog, configured once per process: JSON lines for machines, a console renderer for people."""

from __future__ import annotations

import logging
import sys
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

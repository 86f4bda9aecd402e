"""structlog, configured once per process: JSON lines for machines, a console renderer for people;
and Throttled, for what a flood would otherwise repeat.

When stderr is the journal (systemd sets $JOURNAL_STREAM to its device and inode), each line
starts with its syslog priority as sd-daemon(3) says, `<4>` for a warning: journald strips it
and files the line under that priority, so `journalctl -p warning -u sockd` shows warnings and
errors only. The prefix, not the native journal protocol: it needs no socket of sockd's own in
every process (workers inherit stderr, and with it the journal), and the line after it is the
configured format still, so JSON fields stay fields for `jq`.

Logging never takes a process down: a line stderr cannot take (its reader gone, a full disk, a
non-blocking pipe that is full) is dropped and counted (`dropped`, see StderrLogger). An event
is one line whatever its values hold: JSON escapes control characters, the console renderer
shows a str value with a newline by its repr, and on the journal the whole line, a traceback the
console renderer drew included, is escaped (see one_line).
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from sockd.config import LoggingConfig


def configure(settings: LoggingConfig, stream: TextIO = sys.stderr, **context: Any) -> None:
    """Log to `stream` at `settings.level`; `context` (e.g. the listener a worker serves) is added
    to every line, from every thread."""
    terminal = stream.isatty()
    console = settings.format == "console" or (settings.format == "auto" and terminal)
    journal = is_journal(stream)
    # Colour is for a terminal's reader: in a file or the journal its escape codes are noise.
    # NO_COLOR (no-color.org), when set and not empty, turns it off there too.
    colors = terminal and not os.environ.get("NO_COLOR")
    writer = StderrLogger(stream)  # one for every line: its lock keeps the threads' lines whole

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
            structlog.dev.ConsoleRenderer(colors=colors) if console else structlog.processors.JSONRenderer(),
            *([add_priority] if journal else []),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[settings.level.upper()]),
        logger_factory=lambda *_: writer,
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
    types say an event dict: the renderer came before), prefixed, and one line even where the
    console renderer drew a traceback below it: journald files each line on its own."""
    return priority(method) + one_line(str(line))


# What would break a line, or a terminal's display: C0 and C1 control characters (newline,
# carriage return, escape), DEL, and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with every control character written as its Python escape (`\\n`, `\\x1b`): what a
    client or a config put in a path or a message cannot start a line of its own in the journal
    (with a priority prefix of its choosing) or a KEY= line of its own in an sd_notify message."""
    return _CONTROL.sub(lambda control: control[0].encode("unicode_escape").decode(), text)


# Log lines this process could not write (see StderrLogger): read by the counters' publisher in a
# worker, by the metrics endpoint in the supervisor. A plain int under a lock: few, off the hot path.
dropped = 0
_dropped_lock = threading.Lock()


class StderrLogger:
    """structlog's logger: each line one write(2) to the stream's descriptor, or, when the write
    fails, dropped and counted.

    A write to Python's stream would leave an unwritten line in its buffer, for every later write
    and the interpreter's final flush to fail on again (an exit status of 120); and structlog's
    own logger lets the error rise into whatever logged, so EPIPE from a logger that died killed a
    worker from inside a connection's callback, and the supervisor from inside a reload. Every
    OSError drops the line (EPIPE, EIO, ENOSPC, EAGAIN on a non-blocking stream); so does a
    ValueError: a stream that was closed, or has no descriptor to write to."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()  # a line longer than a pipe's atomic write stays whole

    def msg(self, message: str) -> None:
        global dropped  # noqa: PLW0603 (one count per process, as the metrics export it)
        data = (message + "\n").encode(errors="backslashreplace")
        try:
            with self._lock:
                fd = self.stream.fileno()
                while data:
                    data = data[os.write(fd, data) :]
        except (OSError, ValueError):
            with _dropped_lock:
                dropped += 1

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


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


@dataclass
class _Window:
    """One throttled line's window: from when it was said, `every` seconds during which the events
    are held back, counted, and said together when the window ends."""

    opened: float
    held: int = 0
    details: dict[str, object] = field(default_factory=dict)  # the latest held event's


class Throttled:
    """A warning said at most once per `every` seconds: a flood must not turn into a flood of log
    lines, yet every event is accounted for by the end of its window.

    The first event is said at once (`count: 1`) and opens a window; the events within it are
    held back and said as one line when it ends (their `count`, the latest one's details), from a
    timer, whether or not another event comes; that line opens the next window. With `per`, each
    value of that detail (a `reason`) has windows of its own, so a rare reason is not swallowed
    by the window of a frequent one."""

    def __init__(
        self, event: str, every: float = 10.0, per: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.event = event
        self.every = every
        self.per = per
        self.clock = clock
        self.windows: dict[object, _Window] = {}
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the threads of a blocking model, or of the metrics endpoint
        _throttles.add(self)

    def __call__(self, **details: object) -> None:
        key = details.get(self.per) if self.per else None
        with self._lock:
            now = self.clock()
            window = self.windows.get(key)
            if window is not None and now - window.opened < self.every:
                window.held += 1
                window.details = details
                self._flush_in(window.opened + self.every - now)
                return
            # No window, or one whose end the timer has not flushed yet (it could not start).
            count = 1 + (window.held if window is not None else 0)
            self.windows[key] = _Window(now)
        log.warning(self.event, count=count, **details)

    def flush(self, ending: bool = False) -> None:
        """Say what each ended window held back (the timer's work, and a test's); `ending`: the
        process is about to exit, so every window ends now."""
        said = []
        with self._lock:
            self._timer = None
            now = self.clock()
            for key, window in list(self.windows.items()):
                if now - window.opened < self.every and not (ending and window.held):
                    continue
                if window.held:
                    said.append((window.held, window.details))
                    self.windows[key] = _Window(now)
                else:  # a quiet window: the next event is said at once
                    del self.windows[key]
            ends = [window.opened + self.every - now for window in self.windows.values() if window.held]
            if ends:
                self._flush_in(min(ends))
        for count, details in said:
            log.warning(self.event, count=count, **details)

    def _flush_in(self, seconds: float) -> None:
        """Have `flush` called in `seconds`, unless a flush is due already (under the lock)."""
        if self._timer is not None:
            return
        timer = threading.Timer(max(seconds, 0.0), self.flush)
        timer.daemon = True  # a process that exits says no more
        try:
            timer.start()
        except RuntimeError:  # no thread to be had now: the next event or flush tries again
            return
        self._timer = timer


_throttles: weakref.WeakSet[Throttled] = weakref.WeakSet()


def flush_throttled() -> None:
    """Say what every throttled warning of this process holds back: it is about to exit, before
    their windows end."""
    for throttled in list(_throttles):
        throttled.flush(ending=True)

"""Binding at start while a port is held by connections alone, as nginx retries its binds.

A client connection's TIME-WAIT holds its port for a minute after it closed, even against
SO_REUSEADDR: `make test` leaves some on the example config's ports, which lie in the kernel's
range for client ports, and `make run` right after would fail. Only at start: a reload must not
hold up the supervisor's loop for a minute."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from sockd.sockets import BindError, connections_holding

log = structlog.get_logger()

T = TypeVar("T")

# A TIME-WAIT lasts 60 s on Linux (TCP_TIMEWAIT_LEN), ended by a timer that may fire a little late.
BIND_WAIT = 65.0
BIND_RETRY = 0.2


def bind_retrying(
    bind: Callable[[], T], port: int, deadline: float, where: dict[str, str], stop_requested: Callable[[], bool]
) -> T:
    """Bind a listener or the metrics endpoint (`where` says which, and its address), waiting
    until `deadline` while its TCP `port` is held by connections alone, or until a stop is
    requested."""
    waiting = False
    while True:
        try:
            return bind()
        except BindError as exc:
            held = connections_holding(port) if exc.errno == errno.EADDRINUSE else None
            if held is None or stop_requested() or time.monotonic() > deadline:
                raise
            if not waiting:
                log.warning(
                    "address in use by connections, not a server: waiting for them to end",
                    **where,
                    held_by=held,
                    at_most_seconds=round(deadline - time.monotonic(), 1),
                )
                waiting = True
        time.sleep(BIND_RETRY)

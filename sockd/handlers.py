"""Sans-IO handlers: bytes in, reply bytes out. No handler touches a socket.

A stream connection gets a `Session` from `Handler.session()`: the model feeds it each chunk it
reads and writes back what `feed` returns; once `closing` is true the model writes that last reply
and closes. At the client's EOF the model writes what `eof()` returns and closes. A datagram is
answered with whatever `Handler.datagram` returns (None: no reply).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Protocol

from sockd.config import Listener, TimestampFormat


class Session(Protocol):
    @property
    def closing(self) -> bool: ...

    def feed(self, data: bytes) -> bytes: ...

    def eof(self) -> bytes: ...


class Handler(Protocol):
    def session(self) -> Session: ...

    def datagram(self, data: bytes) -> bytes | None: ...


class Echo:
    """Every byte comes back; a stream stays open until the client closes its side."""

    closing = False

    # Echo keeps no per-connection state, so one session serves every connection: no allocation
    # per accept on the hot path.
    def session(self) -> Echo:
        return self

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> bytes:
        return b""

    def datagram(self, data: bytes) -> bytes:
        return data


class Timestamp:
    """The seed's server: the current time after the first chunk, then close; one per datagram."""

    closing = True

    def __init__(self, clock: Callable[[], str]) -> None:
        self.stamp = clock

    def session(self) -> Timestamp:
        return self

    def feed(self, data: bytes) -> bytes:
        return self.stamp().encode()

    def eof(self) -> bytes:
        return b""

    def datagram(self, data: bytes) -> bytes:
        return self.stamp().encode()


CLOCKS: dict[TimestampFormat, Callable[[], str]] = {
    "seed": lambda: str(datetime.datetime.now()),
    "iso8601": lambda: datetime.datetime.now(datetime.UTC).isoformat(),
    "unix": lambda: f"{time.time():.6f}",
}


def build(listener: Listener) -> Handler:
    if listener.handler == "timestamp":
        return Timestamp(CLOCKS[listener.timestamp_format])
    return Echo()

"""What a connection asks of its transport, and a transport of what it drives: asyncio's
interfaces, as far as sockd uses them (see sockd.transports for the transports themselves).

Apart from sockd.transports because it is compiled (sockd.build) and these must not be: mypyc
types an attribute declared with a protocol of a compiled module as that protocol, and a native
subclass may not narrow an attribute's type (lifecycle.Stream narrows Connection.transport to a
StreamTransport). Left to the interpreter, a protocol is an object to compiled code: what a call
through it costs either way, since no transport inherits from these.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol


class Transport(Protocol):
    """What a connection asks of its I/O: a subset of asyncio.Transport. (A relay's driver is
    its connection's transport: it writes nothing for it, but closes both sides.)"""

    def close(self) -> None:
        """Close once everything written has been sent."""

    def abort(self) -> None:
        """Close now, dropping what is not sent yet."""

    def pause_reading(self) -> None:
        """Read no more, until resume_reading."""

    def resume_reading(self) -> None:
        """Read again."""

    def is_closing(self) -> bool: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """ "socket": the connection's socket (None once it has gone); "peername": its peer's address."""

    def get_write_buffer_size(self) -> int:
        """Bytes written and not sent yet."""


class StreamTransport(Transport, Protocol):
    """What a stream connection asks of its I/O besides: writing, and being handed on."""

    def write(self, data: bytes) -> None:
        """Send `data`, keeping what the peer cannot take yet."""

    def set_protocol(self, protocol: Any) -> None:
        """Drive `protocol` from now on (a stage hands the connection back this way)."""

    def get_protocol(self) -> Any: ...


class Receiver(Protocol):
    """What a transport drives: asyncio's protocol interface."""

    def connection_made(self, transport: Any) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def connection_lost(self, exc: BaseException | None) -> None: ...


class Registry(Protocol):
    """What a SelectorTransport needs of its loop (see models.selector.EventLoop)."""

    def register(self, sock: socket.socket, was: int, events: int, callback: Any) -> int:
        """Wait for `events` on `sock` (none: forget it) where it waited for `was`; returns `events`."""

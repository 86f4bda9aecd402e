"""A connection's transport, one per way of doing I/O, and the socket I/O every connection does
the same way whatever its transport.

A connection (sockd.lifecycle) has a transport and is driven by it as an asyncio protocol is by
asyncio's transports: `connection_made(transport)`, then `data_received`, `eof_received`,
`pause_writing`/`resume_writing` around a full write buffer, and `connection_lost`. The asyncio
model gives it the loop's own transport (uvloop's, in C: no call of ours per write); the others
give it one from here, over a blocking socket (`BlockingTransport`) or a non-blocking socket on
a selector loop (`SelectorTransport`). Each offers the loop's socket as
`get_extra_info("socket")`, so ending a connection's input for a drain (`end_input`) and naming
its peer for its log line (`peer`) are written once, here, for every transport.

What a connection and its transport ask of each other is sockd.interfaces'. Nothing here knows
of handlers, limits' rules or models: the admission helpers are given the listener's Admission,
and a transport the object it drives.
"""

from __future__ import annotations

import _socket
import asyncio
import selectors
import socket
import struct
import time
from typing import Any, Final

from sockd.config import BUFSIZE
from sockd.counters import RESET, Recorder
from sockd.interfaces import Receiver, Registry, Transport
from sockd.limits import Admission, Credentials, Ticket, Unlimited

# Stop reading from a peer once this many bytes wait to go to it (or, through a relay, to its
# counterpart), until they go: a client that sends but never reads gets back-pressure, not a server
# that grows without bound.
HIGH_WATER: Final = 1 << 20

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

# Final, so that compiled it is read from a C static: `time.monotonic` is a lookup by name in the
# module's dict at every call (some 300 instructions a request in BlockingTransport.write).
_monotonic: Final = time.monotonic

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# What a refused client may have sent already, read away before its connection is closed (see
# refuse): at most this many reads of READ_AWAY bytes, never waiting. 256 KiB holds what Linux
# lets a client queue unaccepted by default; a client that sent more is reset.
READS_AWAY = 4
READ_AWAY = 65536


def shutdown_read(fd: int) -> None:
    """End a connection's input (SHUT_RD): its reader sees EOF once what was sent is read. On the
    bare descriptor, because uvloop's transport sockets refuse shutdown(), and without dup(),
    which fails when descriptors have run out (when a drain matters most)."""
    try:
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):  # already closed (its fileno() is -1 then)
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # reset: nothing is left to drain
        pass
    finally:
        sock.detach()  # the descriptor stays its owner's


def end_input(transport: Transport) -> None:
    """shutdown_read through a transport's socket, if it has one left."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        shutdown_read(sock.fileno())


def peer(transport: Transport) -> dict[str, object]:
    """Who a connection's client is, for its log line: `source` and `port`, or a Unix peer's
    credentials (its socket has no name), read from the transport's socket (a socket, or
    uvloop's stand-in for one). Empty if the client has gone already."""
    sock = transport.get_extra_info("socket")
    try:
        if sock is None:
            return {}
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = peer_credentials(sock)
            return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
        host, port = sock.getpeername()[:2]
    except OSError:
        return {}
    return {"source": host, "port": port}


def peer_address(transport: Transport) -> Any:
    """A connection's peer's address, as getpeername() says it: (host, port[, ...]), or a Unix
    socket's name ("" for a client's, which has none); None if the peer has gone already."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None


def peer_credentials(conn: _socket.socket) -> Credentials:
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def screen(sock: _socket.socket, address: Any, admission: Admission | Unlimited, recorder: Recorder) -> Ticket | None:
    """What the listener's limits say of a new connection from `address` (its Unix peer's
    credentials read from `sock` if they are asked for)."""
    credentials = peer_credentials(sock) if admission.wants_credentials else None
    return admission.admit(address, credentials, recorder)


def admit(conn: _socket.socket, address: Any, admission: Admission | Unlimited, recorder: Recorder) -> Ticket | None:
    """The ticket of a just-accepted connection, or None if a limit refused it: it is closed then."""
    ticket = screen(conn, address, admission, recorder)
    if ticket is None:
        refuse(conn.fileno())
        conn.close()
    return ticket


def admitted(transport: asyncio.Transport, admission: Admission | Unlimited, recorder: Recorder) -> Ticket | None:
    """admit, for a connection a loop has made: None if refused, and it is closed at once, its
    protocol swapped for one that hears nothing of it (it never opened). A client that reset its
    connection before the loop made its transport has left no address to judge it by: it is
    counted as the reset it is, not as refused (HAProxy resets its health checks so)."""
    sock = transport.get_extra_info("socket")  # a stand-in with getsockopt, on uvloop
    address = transport.get_extra_info("peername")
    if address is None:
        recorder.errors[RESET] += 1
        ticket = None
    else:
        ticket = screen(sock, address, admission, recorder)
    if ticket is None:
        transport.set_protocol(asyncio.Protocol())
        refuse(sock.fileno())
        transport.abort()
    return ticket


def refuse(fd: int) -> None:
    """Make a refused connection's close an end of file to its client, not a reset: a socket
    closed with unread data resets its connection (RFC 1122, 4.2.2.13; AF_UNIX does the same),
    and a client usually sends its request before it is accepted. So, before the caller closes
    it: shut it both ways (over TCP the FIN goes out now, before any reset what the client sends
    later may bring; over AF_UNIX the client can send nothing more), then read away what had come,
    bounded (READS_AWAY), without waiting. On the bare descriptor, as shutdown_read does."""
    try:
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):  # already closed
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
        for _ in range(READS_AWAY):
            if len(sock.recv(READ_AWAY, socket.MSG_DONTWAIT)) < READ_AWAY:
                break
    except OSError:  # nothing (more) to read, or the client has gone already
        pass
    finally:
        sock.detach()  # the descriptor stays its owner's, to close


class Accepter:
    """A blocking model's `socket.accept()` on `listener`, as CPython's socket.py does it, but with
    the listener's family and type read once, as ints: its `family` and `type` properties make an
    IntEnum of each on every call, which was a fifth of a connection's cost under the iterative
    model (12.3k of 64k instructions under callgrind). So is whether an accepted socket must be
    made blocking (socket.py's issue #7995): the models set the listener's timeout before they
    serve, and never change it."""

    __slots__ = ("accept", "blocking", "family", "proto", "type")

    def __init__(self, listener: socket.socket) -> None:
        self.accept: Any = listener._accept  # type: ignore[attr-defined]
        self.family, self.type, self.proto = int(listener.family), int(listener.type), listener.proto
        self.blocking = socket.getdefaulttimeout() is None and bool(listener.gettimeout())

    def __call__(self) -> tuple[socket.socket, Any]:
        fd, address = self.accept()
        sock = socket.socket(self.family, self.type, self.proto, fileno=fd)
        if self.blocking:
            sock.setblocking(True)
        return sock, address


class BlockingTransport:
    """A blocking socket: a write returns once the client has taken it all (a timeout or a reset
    raises out of it), and closing ends the reading for `protocol` (`feed`, `read_to_end`) that
    serves the connection in its thread (see models.blocking)."""

    __slots__ = ("closed", "protocol", "reading", "recorder", "send", "sock")

    def __init__(self, sock: socket.socket, recorder: Recorder, protocol: Receiver) -> None:
        self.sock = sock
        # Bound once: `self.sock.send` at each write made a bound method of socket.py's class, a
        # generic attribute lookup (some 600 instructions a request compiled, under callgrind).
        self.send: Any = sock.send
        self.recorder = recorder
        self.protocol = protocol
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        """Send all of `data`. A thread blocked here waits for the client to read, which is not
        being busy (see Stats.publish): a client that reads nothing must not stop the heartbeat.
        The socket's timeout bounds each send() rather than the whole (as sendall() would): a
        client is timed out once it has taken no byte for idle_timeout, as in the event-loop
        models, where each byte sent moves the deadline."""
        recorder = self.recorder
        busy = recorder.busy_since
        recorder.busy_since = 0.0
        send = self.send
        sent = send(data)
        if sent < len(data):
            with memoryview(data) as view:
                while sent < len(data):
                    sent += send(view[sent:])
        if busy:  # back at its work: busy from now (the clock tells time even with metrics off)
            recorder.busy_since = _monotonic()

    def feed(self, data: bytes) -> None:
        """Give `protocol` what one read returned: data, or (empty) the end of its input."""
        recorder = self.recorder
        # The heartbeat's clock (see Stats.publish), which must tell time even when metrics are off.
        recorder.busy_since = _monotonic()
        if data:
            self.protocol.data_received(data)
        else:
            self.protocol.eof_received()
        recorder.busy_since = 0.0

    def read_to_end(self) -> None:
        """Read and feed requests until the connection closes, once `protocol` is the connection
        itself for good (no stage is left to hand it on). Threads serving many clients take
        turns on the GIL between these calls, so the loop keeps its lookups in locals (BUFSIZE's
        too: compiled, a name imported from a module that is not is a dict lookup at each use)."""
        entry, recorder, size = self.protocol, self.recorder, BUFSIZE
        recv, received, clock = self.sock.recv, entry.data_received, _monotonic
        while self.reading:
            data = recv(size)
            recorder.busy_since = clock()
            if data:
                received(data)
            else:
                entry.eof_received()
            recorder.busy_since = 0.0

    def close(self) -> None:
        self.reading, self.closed = False, True

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return 0  # a write returns once all is sent

    def set_protocol(self, protocol: Receiver) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Receiver:
        return self.protocol


class SelectorTransport:
    """A non-blocking socket on a selector loop: what it reads goes to `protocol` as it comes;
    what the kernel will not take yet waits in `out`, and while HIGH_WATER bytes wait there the
    protocol is told to stop writing (`pause_writing`), as asyncio's transports tell theirs.

    Its state is its own: `reading` (asked to, and not at EOF), `closing` (close once `out` is
    written), `closed`; a handler's wish to close is its session's."""

    __slots__ = ("closed", "closing", "events", "full", "loop", "out", "protocol", "reading", "sock")

    def __init__(self, loop: Registry, sock: socket.socket, protocol: Receiver) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        self.out = bytearray()
        self.reading = True
        self.closing = False
        self.closed = False
        self.full = False  # `out` holds HIGH_WATER: the protocol was told to pause writing
        self.events = 0

    def start(self) -> None:
        """Tell the protocol of the connection, then wait for it to be readable."""
        self.protocol.connection_made(self)
        self._update()

    def ready(self, events: int) -> None:
        if events & WRITE:
            self._flush()
        if events & READ and self.reading:
            try:
                data = self.sock.recv(BUFSIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._closed(exc)
                return
            if data:
                self.protocol.data_received(data)
            else:
                self.reading = False
                self.protocol.eof_received()
                self._update()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._closed(exc)
                return
            if sent == len(data):
                return  # all out: nothing to wait for
            data = data[sent:]
        self.out += data
        if not self.full and len(self.out) >= HIGH_WATER:
            self.full = True
            self.protocol.pause_writing()
        self._update()

    def close(self) -> None:
        self.closing, self.reading = True, False
        if self.out:
            self._update()  # closes once `out` is written
        else:
            self.abort()

    def abort(self) -> None:
        if not self.closed:
            self._closed(None)

    def pause_reading(self) -> None:
        self.reading = False
        self._update()

    def resume_reading(self) -> None:
        self.reading = True
        self._update()

    def is_closing(self) -> bool:
        return self.closing or self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return None if self.closed else self.sock
        return default

    def get_write_buffer_size(self) -> int:
        return len(self.out)

    def set_protocol(self, protocol: Receiver) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Receiver:
        return self.protocol

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._closed(exc)
            return
        del self.out[:sent]
        if self.closing and not self.out:
            self.abort()
            return
        if self.full and len(self.out) < HIGH_WATER:
            self.full = False
            self.protocol.resume_writing()
        self._update()

    def _update(self) -> None:
        if self.closed:
            return
        events = (READ if self.reading else 0) | (WRITE if self.out else 0)
        self.events = self.loop.register(self.sock, self.events, events, self.ready)

    def _closed(self, exc: OSError | None) -> None:
        self.closed, self.reading = True, False
        self.events = self.loop.register(self.sock, self.events, 0, self.ready)
        self.sock.close()
        self.protocol.connection_lost(exc)

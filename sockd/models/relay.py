"""The selector models' relay: each client joined to its own upstream socket, bytes copied both
ways as they come, with socat's half-close (see handlers.Relay and aio.RelayProtocol, its twin
for the asyncio model, which has transports to do the buffering).

Each side is an `End`: a non-blocking socket and what waits to be written to it. Reading from one
side stops while the other side's buffer holds HIGH_WATER bytes, so memory per client is bounded
whichever side is slow.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from sockd.config import BUFSIZE
from sockd.counters import RESET, UPSTREAM, Recorder
from sockd.handlers import Relay
from sockd.limits import Throttled
from sockd.models import HIGH_WATER, Address

if TYPE_CHECKING:
    from sockd.models.selector import EventLoop

log = structlog.get_logger()

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

_upstream_warning = Throttled("upstream failed")
sessions_warning = Throttled("too many relay sessions; dropping datagrams from new clients")
RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
# UDP relay sessions per worker: past this, datagrams from new clients are dropped (each session
# holds a descriptor, and a flood from many addresses must not take them all).
MAX_SESSIONS = 4096


def upstream_failed(relay: Relay, recorder: Recorder, error: str) -> None:
    recorder.errors[UPSTREAM] += 1
    _upstream_warning(upstream=relay.upstream, error=error)


def upstream_socket(relay: Relay) -> socket.socket:
    """A non-blocking socket for the upstream, its connect() started. A name is resolved here, in
    the loop (an IP literal costs nothing); each address it has is tried until one does not fail
    at once, but a connect still in progress when it fails cannot move on to the next."""
    if isinstance(relay.where, str):
        addresses = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, relay.where)]
    else:
        kind = socket.SOCK_DGRAM if relay.scheme == "udp" else socket.SOCK_STREAM
        addresses = [(family, kind, proto, where) for family, kind, proto, _, where in _resolve(relay.where, kind)]
    failure: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
    for family, kind, proto, where in addresses:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            sock.connect(where)
        except BlockingIOError:  # in progress: writable once done
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        return sock
    raise failure


def _resolve(where: tuple[str, int], kind: int) -> list[tuple[Any, ...]]:
    try:
        return socket.getaddrinfo(*where, type=kind)
    except UnicodeError as exc:  # a name IDNA cannot encode (config refuses most of them)
        raise OSError(errno.EINVAL, f"bad host name: {exc}") from None


class End:
    __slots__ = ("events", "out", "peer", "reading", "shut_when_flushed", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.reading = True
        self.shut_when_flushed = False  # the other side ended: end this one's output once `out` is out
        self.events = 0
        self.peer: End


class Splice:
    """One relayed client: its connection and the upstream's. It stands in the loop's
    `connections` beside the handler connections, so stops and timeouts treat it alike."""

    __slots__ = (
        "active",
        "client",
        "closed",
        "connected",
        "deadline",
        "ended",
        "loop",
        "moved",
        "relay",
        "source",
        "upstream",
    )

    answered = True  # a stop may end its input at once: the end is passed on as a half-close
    delayed = 0

    def __init__(self, loop: EventLoop, client: socket.socket, upstream: socket.socket, source: str) -> None:
        self.loop = loop
        self.source = source  # see limits.source_of
        assert isinstance(loop.handler, Relay)
        self.relay = loop.handler
        self.client, self.upstream = End(client), End(upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.connected = False
        self.ended = 0  # sides that have ended their output
        self.moved = 0  # bytes read or written either way (see _close_if_quiet)
        self.closed = False
        self.active = False  # see Timeouts
        self.deadline = 0.0

    @property
    def sock(self) -> socket.socket:
        """The client's socket (a stop ends its input)."""
        return self.client.sock

    def start(self, connect_timeout: float) -> None:
        self.client.reading = False  # until the upstream answers
        self._register(self.upstream, WRITE)
        self.loop.later(self._connect_timed_out, connect_timeout)

    def _connect_timed_out(self) -> None:
        if not self.connected and not self.closed:
            self._upstream_failed(os.strerror(errno.ETIMEDOUT))

    def _upstream_failed(self, error: str) -> None:
        upstream_failed(self.relay, self.loop.recorder, error)
        self.close()  # the client sees EOF at once

    def on_ready(self, end: End, events: int) -> None:
        if self.closed:
            return
        if not self.connected:
            error = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._upstream_failed(os.strerror(error))
                return
            try:
                end.sock.getpeername()
            except OSError:  # still connecting (the busy-poll selector says "ready" regardless)
                return
            self.connected = True
            self.client.reading = True
            self._update(self.client)
        if events & WRITE:
            self._flush(end)
        if events & READ and not self.closed:
            self._read(end)
        if not self.closed:
            self._update(end)

    def _read(self, end: End) -> None:
        try:
            data = end.sock.recv(BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(end, exc)
            return
        peer = end.peer
        if not data:
            end.reading = False
            peer.shut_when_flushed = True
            self._flush(peer)
            self._side_ended()
            return
        self.active = True
        self.moved += len(data)
        recorder = self.loop.recorder
        if end is self.client:
            recorder.received += len(data)
        else:
            recorder.sent += len(data)
        peer.out += data
        self._flush(peer)

    def _flush(self, end: End) -> None:
        if end.out:
            try:
                sent = end.sock.send(end.out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(end, exc)
                return
            del end.out[:sent]
            self.moved += sent
            self.active = self.active or sent > 0
        if not end.out and end.shut_when_flushed:
            end.shut_when_flushed = False
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._lost(end, exc)
                return
        if self.ended == 2 and not (self.client.out or self.upstream.out):
            self.close()  # both sides ended, and all they said has been passed on
            return
        self._update(end)
        self._update(end.peer)

    def _side_ended(self) -> None:
        self.ended += 1
        if self.ended == 1:
            self._close_if_quiet(-1)
        elif not (self.client.out or self.upstream.out):
            self.close()

    def _close_if_quiet(self, moved: int) -> None:
        """Half-closed: as socat's -t, give up on the other side once it has been quiet for
        half_close_timeout (a long transfer the other way is not cut short)."""
        if self.moved == moved:
            self.close()
        else:
            self.loop.later(functools.partial(self._close_if_quiet, self.moved), self.relay.half_close_timeout)

    def _lost(self, end: End, exc: OSError) -> None:
        if end is self.upstream:
            upstream_failed(self.relay, self.loop.recorder, str(exc))
        else:
            self.loop.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
        self.close()

    def _update(self, end: End) -> None:
        if self.closed:
            return
        events = 0
        if end.reading and len(end.peer.out) < HIGH_WATER and self.connected:
            events |= READ
        if end.out or (end is self.upstream and not self.connected):
            events |= WRITE
        self._register(end, events)

    def _register(self, end: End, events: int) -> None:
        if events == end.events:
            return
        selector = self.loop.selector
        if not end.events:
            selector.register(end.sock, events, lambda ready: self.on_ready(end, ready))
        elif not events:
            selector.unregister(end.sock)
        else:
            selector.modify(end.sock, events, lambda ready: self.on_ready(end, ready))
        end.events = events

    def close(self) -> None:
        """End both sides. Bytes still waiting for a side are dropped, and that side is reset rather
        than closed, so it cannot take a cut-short stream for a whole one."""
        if self.closed:
            return
        self.closed = True
        for end in (self.client, self.upstream):
            if end.events:
                self.loop.selector.unregister(end.sock)
            end.events = 0
            if end.out or end.shut_when_flushed:
                with contextlib.suppress(OSError):
                    end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            end.sock.close()
        self.loop.forget(self)


class DatagramSessions:
    """A UDP relay in the selector models: a session per client address, each with its own
    upstream socket (so replies find their way back), forgotten after session_timeout."""

    def __init__(self, loop: EventLoop, relay: Relay) -> None:
        self.loop = loop
        self.relay = relay
        self.sessions: dict[Address, tuple[socket.socket, list[float]]] = {}

    def start(self) -> None:
        self.loop.later(self._forget_idle, self.relay.session_timeout / 4)

    def forward(self, data: bytes, client: Address) -> None:
        session = self.sessions.get(client)
        if session is None:
            if len(self.sessions) >= MAX_SESSIONS:
                sessions_warning(sessions=MAX_SESSIONS)
                return
            try:
                sock = upstream_socket(self.relay)
            except OSError as exc:
                upstream_failed(self.relay, self.loop.recorder, str(exc))
                return
            session = self.sessions[client] = (sock, [time.monotonic()])
            self.loop.selector.register(sock, READ, self._replied(sock, client, session[1]))
        sock, seen = session
        seen[0] = time.monotonic()
        self.loop.recorder.received += len(data)
        try:
            sock.send(data)
        except OSError as exc:  # e.g. the upstream port said unreachable to an earlier one
            upstream_failed(self.relay, self.loop.recorder, str(exc))

    def _replied(self, sock: socket.socket, client: Address, seen: list[float]) -> Callable[[int], None]:
        def relay_back(events: int) -> None:
            try:
                data = sock.recv(BUFSIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                upstream_failed(self.relay, self.loop.recorder, str(exc))
                return
            seen[0] = time.monotonic()
            self.loop.recorder.sent += len(data)
            self.loop.send_datagram_to(data, client)

        return relay_back

    def close(self) -> None:
        for sock, _ in self.sessions.values():
            sock.close()
        self.sessions.clear()

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for client, (sock, seen) in list(self.sessions.items()):
            if now - seen[0] >= self.relay.session_timeout or self.loop.stop.is_set:
                self.loop.selector.unregister(sock)
                sock.close()
                del self.sessions[client]
        if not self.loop.stop.is_set:
            self.loop.later(self._forget_idle, self.relay.session_timeout / 4)

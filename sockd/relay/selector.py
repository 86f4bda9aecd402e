"""The relay on the selector models' loop: non-blocking sockets, buffered by hand.

Each side of a relayed client is an `End`: a socket and what waits to be written to it. Reading
from one side stops while the other side's buffer holds HIGH_WATER bytes, so memory per client is
bounded whichever side is slow.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import structlog

from sockd.config import BUFSIZE
from sockd.lifecycle import CONNECTING, INPUT_ENDED, WRITE_FULL, Address, Datagrams, Service
from sockd.limits import MOVED, Ticket
from sockd.relay import UPSTREAM_ERRORS, Answer, DatagramRelay, Reactor, Resolver, relayed, upstream_socket
from sockd.transports import HIGH_WATER, READ, WRITE

log = structlog.get_logger()

RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class End:
    """One side of a relayed client: its socket, what waits to be written to it, and the reasons
    it is not read (the lifecycle's PAUSES, as a connection's `paused`)."""

    __slots__ = ("events", "out", "paused", "peer", "shut_when_flushed", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.paused = CONNECTING  # neither side is read before the upstream answers
        self.shut_when_flushed = False  # the other side ended: end this one's output once `out` is out
        self.events = 0
        self.peer: End


class Splice:
    """One relayed client: its connection and the upstream's, on the loop; the transport of its
    lifecycle connection (see relay.Relayed). Each End has its own reasons to stop reading, bits
    of its `paused`: its peer's `out` holding HIGH_WATER (WRITE_FULL), its own EOF (INPUT_ENDED),
    the upstream still connecting (CONNECTING)."""

    __slots__ = ("client", "closed", "connected", "ends", "events", "loop", "names", "state", "upstream")

    def __init__(self, loop: Reactor, service: Service, names: Resolver, client: socket.socket, ticket: Ticket) -> None:
        self.state, self.events = relayed(service, ticket, loop.recorder, names.relay, self)
        self.loop = loop
        self.names = names
        self.client = End(client)
        self.upstream: End
        self.ends: tuple[End, ...] = (self.client,)
        self.connected = False
        self.closed = False

    def start(self) -> None:
        """Look the upstream up and open a connection to it (within connect_timeout, the lookup
        included); the client is read once it answers."""
        self.events.opened()
        self.state.connection.service.later(self.state.relay.connect_timeout, self._connect_timed_out)
        self.names.ask(self._found)

    def _found(self, answer: Answer) -> None:
        try:
            if isinstance(answer, BaseException):
                raise answer
            upstream = upstream_socket(answer)
        except UPSTREAM_ERRORS as exc:
            self.events.upstream_failed(exc)
            self.abort()  # the client sees EOF at once
            return
        self.upstream = End(upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.ends = (self.client, self.upstream)
        self._register(self.upstream, WRITE)

    def _connect_timed_out(self) -> None:
        if not self.connected and not self.closed:
            self.events.upstream_failed(os.strerror(errno.ETIMEDOUT))
            self.abort()  # the client sees EOF at once

    def on_ready(self, end: End, events: int) -> None:
        if self.closed:
            return
        if not self.connected:
            error = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.events.upstream_failed(os.strerror(error))
                self.abort()
                return
            try:
                end.sock.getpeername()
            except OSError:  # still connecting (the busy-poll selector says "ready" regardless)
                return
            self.connected = True
            self.client.paused &= ~CONNECTING
            self.upstream.paused &= ~CONNECTING
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
            end.paused |= INPUT_ENDED
            peer.shut_when_flushed = True
            self._flush(peer)
            if not self.closed:
                self.events.side_ended(end is self.client)
            return
        self.events.carried(len(data), end is self.client)
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
            self.state.moved += sent
            if sent:
                self.state.connection.deadline = MOVED
        if not end.out and end.shut_when_flushed:
            end.shut_when_flushed = False
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._lost(end, exc)
                return
        if self.state.ended == 2 and not (self.client.out or self.upstream.out):
            self.abort()  # both sides ended, and all they said has been passed on
            return
        self._update(end)
        self._update(end.peer)

    # -- as the lifecycle connection's transport

    def close(self) -> None:
        """Both sides, once each has written what it holds (the last flush closes them: see _flush)."""
        if not (self.client.out or self.upstream.out):
            self.abort()

    def _lost(self, end: End, exc: OSError) -> None:
        if end is self.upstream:
            self.events.upstream_failed(exc)
            self.abort()
        else:
            self._closed(exc)

    def _update(self, end: End) -> None:
        if self.closed:
            return
        if len(end.peer.out) < HIGH_WATER:
            end.paused &= ~WRITE_FULL
        else:
            end.paused |= WRITE_FULL
        events = 0 if end.paused else READ
        if end.out or (end is self.upstream and not self.connected):
            events |= WRITE
        self._register(end, events)

    def _register(self, end: End, events: int) -> None:
        end.events = self.loop.register(end.sock, end.events, events, lambda ready: self.on_ready(end, ready))

    def abort(self) -> None:
        if not self.closed:
            self._closed(None)

    def pause_reading(self) -> None:
        """Never asked: each End has its own reasons (see _update)."""

    def resume_reading(self) -> None:
        """Never asked (see pause_reading)."""

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return None if self.closed else self.client.sock
        return default

    def get_write_buffer_size(self) -> int:
        return sum(len(end.out) for end in self.ends)

    def _closed(self, exc: OSError | None) -> None:
        """End both sides. Bytes still waiting for a side are dropped, and that side is reset rather
        than closed, so it cannot take a cut-short stream for a whole one."""
        self.closed = True
        self.names.forget(self._found)
        for end in self.ends:
            end.events = self.loop.register(end.sock, end.events, 0, lambda ready: None)
            if end.out or end.shut_when_flushed:
                with contextlib.suppress(OSError):
                    end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            end.sock.close()
        self.events.connection_lost(exc)


class DatagramSessions:
    """A UDP relay on the loop (see relay.DatagramRelay): it watches each session's socket on the
    loop, and sends the replies through the listening socket as its Datagrams sends them."""

    def __init__(self, loop: Reactor, service: Service, names: Resolver, replies: Datagrams) -> None:
        self.loop = loop
        self.replies = replies
        self.relaying = DatagramRelay(names, service, loop.recorder, self)
        # What the loop calls for each datagram: the relay's own method, no call of ours between.
        self.datagram_received = self.relaying.datagram_received
        self.close = self.relaying.close

    def watch(self, sock: socket.socket, readable: Callable[[], None]) -> None:
        self.loop.register(sock, 0, READ, lambda events: readable())

    def unwatch(self, sock: socket.socket) -> None:
        self.loop.register(sock, READ, 0, lambda events: None)

    def reply(self, data: bytes, client: Address) -> None:
        try:
            self.replies.send(data, client)
        except OSError as exc:
            self.replies.send_failed(exc)

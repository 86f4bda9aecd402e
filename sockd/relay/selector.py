"""The relay on the selector models' loop: non-blocking sockets, buffered by hand.

Each side of a relayed client is an `End`: a socket and what waits to be written to it. Reading
from one side stops while the other side's buffer holds HIGH_WATER bytes, so memory per client is
bounded whichever side is slow.

A listener's stage (a PROXY header, a TLS handshake: see lifecycle.Staging) reads the client
before the upstream is looked up: what the client's socket brings goes to the stage's receiver
(its End's `reader`) until it is done. A side can speak TLS: a TLSLayer sits between its socket
and the relay (see End). On a `tls` listener the client's handshake is the listener's stage;
to a tls:// upstream, the upstream's handshake follows its connect(), and the client is read once
it is done. A TLS side's end of output is a close_notify, after which it is still read: a
half-close passes through TLS as it passes through TCP.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from sockd.config import BUFSIZE
from sockd.interfaces import Receiver, StreamTransport
from sockd.lifecycle import CLOSING, CONNECTING, INPUT_ENDED, WRITE_FULL, Address, Datagrams, Service
from sockd.limits import MOVED, Ticket
from sockd.relay import (
    UPSTREAM_ERRORS,
    Answer,
    DatagramRelay,
    Reactor,
    Resolver,
    handshake_failed,
    relayed,
    upstream_socket,
)
from sockd.tls.layer import Failure, TLSLayer
from sockd.transports import HIGH_WATER, READ, WRITE

RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class End:
    """One side of a relayed client: its socket, what waits to be written to it, the reasons it
    is not read (the lifecycle's PAUSES, as a connection's `paused`), and what reads what its
    socket brings, if not the relay itself (`reader`: the client's stage while it lasts, then a
    TLS side's layer).

    A TLS side has its TLSLayer (`tls`) between its socket and the relay, and is both the layer's
    transport (the records it writes wait in `out`, for the relay to send) and its protocol (the
    plaintext it reads goes to the relay, for the other side). Its buffers are bounded as a plain
    side's are: `out` by HIGH_WATER, and the layer's by one read, as it decrypts whatever comes
    (the relay stops reading the socket instead)."""

    __slots__ = ("events", "out", "paused", "peer", "reader", "relay", "shut_when_flushed", "sock", "tls")

    def __init__(self, sock: socket.socket, relay: Splice) -> None:
        self.sock = sock
        self.relay = relay
        self.out = bytearray()
        self.paused = CONNECTING  # neither side is read before the upstream answers
        self.shut_when_flushed = False  # the other side ended: end this one's output once `out` is out
        self.events = 0
        self.peer: End
        self.reader: Receiver | None = None
        self.tls: TLSLayer | None = None

    # -- as its TLS layer's transport

    def write(self, data: bytes) -> None:
        self.out += data  # sent by the relay, which flushes after each call into the layer

    def close(self) -> None:
        """A client the stage refused (a failed handshake, after its alert)."""
        self.relay.close()

    def abort(self) -> None:
        """The layer read a bad record, or an alert: the connection is over."""
        self.relay.lost(self, self.tls.failure if self.tls is not None else None)

    def is_closing(self) -> bool:
        return self.relay.closed

    def pause_reading(self) -> None:
        """The relay reads the socket as each side's `paused` says (see Splice._update)."""

    def resume_reading(self) -> None:
        """See pause_reading."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return len(self.out)

    def set_protocol(self, protocol: Receiver) -> None:
        """A chain's next stage reads the client's socket from now on (see lifecycle.Chain)."""
        self.reader = protocol

    def get_protocol(self) -> Receiver:
        return self

    # -- as its TLS layer's protocol

    def connection_made(self, transport: Any) -> None:
        """Never told: the relay starts the layer itself."""

    def data_received(self, data: bytes) -> None:
        self.relay.received(self, data)

    def eof_received(self) -> bool:
        self.relay.received(self, b"")
        return True  # the other way may go on

    def pause_writing(self) -> None:
        """Never told: its `write` takes everything (see Splice._update for the back-pressure)."""

    def resume_writing(self) -> None:
        """See pause_writing."""

    def connection_lost(self, exc: BaseException | None) -> None:
        """Told by a stage cut short, which the relay itself ended (see Splice._closed)."""


class Splice:
    """One relayed client: its connection and the upstream's, on the loop; the transport of its
    lifecycle connection (see relay.Relayed). Each End has its own reasons to stop reading, bits
    of its `paused`: its peer's `out` holding HIGH_WATER (WRITE_FULL), its own EOF (INPUT_ENDED),
    the upstream not ready yet (CONNECTING), the relay closing (CLOSING)."""

    __slots__ = (
        "client",
        "closed",
        "closing",
        "connected",
        "early",
        "ends",
        "events",
        "loop",
        "names",
        "ready",
        "state",
        "upstream",
    )

    def __init__(self, loop: Reactor, service: Service, names: Resolver, client: socket.socket, ticket: Ticket) -> None:
        self.state, self.events = relayed(service, ticket, loop.recorder, names.relay, self)
        self.loop = loop
        self.names = names
        self.client = End(client, self)
        self.upstream: End
        self.ends: tuple[End, ...] = (self.client,)
        self.connected = False  # the upstream's connect() is done
        self.ready = False  # and its handshake, to a tls:// upstream: it carries bytes
        self.early = b""  # what came after the client's stage took its part, for the upstream once ready
        self.closing = False  # see close
        self.closed = False

    def start(self) -> None:
        """The listener's stage first (the client's header, its handshake), then the upstream."""
        self.events.opened()
        stage = self.state.connection.service.stage
        if stage is None:
            self._connect()
            return
        client = self.client
        client.reader = stage(self.state.connection, client, client, self._staged)
        client.paused = 0  # read for the stage
        self._update(client)

    def _staged(self, rest: bytes, layer: StreamTransport | None) -> None:
        """The stage let the client in: the layer it leaves (TLS's) stays, if any, and what came
        after what it took waits for the upstream (see _upstream_ready). The upstream's turn."""
        if layer is not None:
            assert isinstance(layer, TLSLayer)  # the one layer a stage leaves
        client = self.client
        client.reader = client.tls = layer
        self.early = rest
        self.state.staged()
        self._connect()

    def _connect(self) -> None:
        """Look the upstream up and open a connection to it (within connect_timeout, the lookup
        and a tls:// upstream's handshake included); the client is read once it is ready (what
        came with its own handshake waits in its layer meanwhile)."""
        client = self.client
        client.paused |= CONNECTING
        if client.tls is not None:
            client.tls.pause_reading()
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
        self.upstream = End(upstream, self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.ends = (self.client, self.upstream)
        self._register(self.upstream, WRITE)

    def _connect_timed_out(self) -> None:
        if not self.ready and not self.closed:
            self.events.upstream_failed(os.strerror(errno.ETIMEDOUT))
            self.abort()  # the client sees EOF at once

    def on_ready(self, end: End, events: int) -> None:
        if self.closed:
            return
        if end is not self.client and not self.connected:
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
            self._upstream_connected(end)
        if events & WRITE:
            self._flush(end)
        if events & READ and not self.closed:
            self._read(end)
        if not self.closed:
            self._update(end)

    def _upstream_connected(self, upstream: End) -> None:
        relay = self.state.relay
        if relay.proxy_protocol is not None:
            # First in `out`: sent in one write with what follows at once, a ClientHello, or what
            # came after the client's PROXY header or with its handshake (_upstream_ready passes it on).
            upstream.out += self.state.proxy_header(self.client.sock, self.client.tls)
        tls = relay.tls
        if tls is None:
            self._upstream_ready()
            return
        layer = upstream.reader = upstream.tls = TLSLayer(
            tls.context, upstream, self._upstream_established, server_hostname=tls.server_name
        )
        upstream.paused &= ~CONNECTING  # read for the handshake
        layer.start(upstream)  # its ClientHello waits in `out`

    def _upstream_established(self, layer: TLSLayer, failure: Failure) -> None:
        if failure is None:
            self._upstream_ready()
            return
        self.events.upstream_failed(handshake_failed(failure))
        self.abort()  # the client sees EOF at once, as for a refused upstream

    def _upstream_ready(self) -> None:
        self.ready = True
        client = self.client
        client.paused &= ~CONNECTING
        self.upstream.paused &= ~CONNECTING
        if client.tls is not None:
            client.tls.resume_reading()  # what came with the client's handshake
        if self.early:
            early, self.early = self.early, b""
            self.received(client, early)
        self._update(client)

    def _read(self, end: End) -> None:
        try:
            data = end.sock.recv(BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lost(end, exc)
            return
        reader = end.reader
        if reader is None:
            self.received(end, data)
            return
        if data:
            reader.data_received(data)  # a layer's plaintext comes back through `received`
        else:
            reader.eof_received()
        if end.out:  # what a layer answered: its handshake, a session ticket, an alert
            self._flush(end)

    def received(self, end: End, data: bytes) -> None:
        """What `end` said, for its peer; b"": its end of output, passed on as a half-close."""
        if self.closed:  # the layer still giving what one read brought
            return
        peer = end.peer
        if not data:
            end.paused |= INPUT_ENDED
            self._end_output(peer)
            if not self.closed:
                self.events.side_ended(end is self.client)
            return
        self.events.carried(len(data), end is self.client)
        if peer.tls is None:
            peer.out += data
        else:
            peer.tls.write(data)
        self._flush(peer)

    def _end_output(self, end: End) -> None:
        """The other side ended: so does `end`, once what it holds is written (a TLS side's
        close_notify follows what it holds at once)."""
        if end.tls is None:
            end.shut_when_flushed = True
        else:
            end.tls.write_eof()
        self._flush(end)

    def _flush(self, end: End) -> None:
        if self.closed:
            return
        if end.out:
            try:
                sent = end.sock.send(end.out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.lost(end, exc)
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
                self.lost(end, exc)
                return
        if self.closing and not any(each.out for each in self.ends):
            self.abort()  # all that was said has been passed on
            return
        for each in self.ends:  # this one's `out`, and its peer's reasons to read
            self._update(each)

    # -- as the lifecycle connection's transport

    def close(self) -> None:
        """Both sides, once each has written what it holds (the last flush closes them: see
        _flush); once the upstream is ready, a TLS side's output ends with a close_notify."""
        if self.closing or self.closed:
            return
        self.closing = True
        for end in self.ends:
            end.paused |= CLOSING
            if self.ready and end.tls is not None:
                end.tls.write_eof()
        self._flush(self.client)

    def lost(self, end: End, exc: BaseException | None) -> None:
        """`end` failed: its socket, or its TLS."""
        if end is self.client:
            self._closed(exc)
        else:
            self.events.upstream_failed(exc or "TLS")
            self.abort()

    def _update(self, end: End) -> None:
        if self.closed:
            return
        if len(self.ends) == 2 and len(end.peer.out) >= HIGH_WATER:
            end.paused |= WRITE_FULL
        else:
            end.paused &= ~WRITE_FULL
        events = 0 if end.paused else READ
        if end.out or (end is not self.client and not self.connected):
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

    def _closed(self, exc: BaseException | None) -> None:
        """End both sides. Bytes still waiting for a side are dropped, and that side is reset rather
        than closed, so it cannot take a cut-short stream for a whole one."""
        reader = self.client.reader
        if reader is not None and not self.state.connection.answered:  # cut short: the stage judges it
            reader.connection_lost(exc)
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

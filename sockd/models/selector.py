"""The seed's event loop: one thread, non-blocking sockets, a readiness loop over `selectors`.

The loop itself takes any `selectors.BaseSelector`, so the busy-poll model is this same loop
driven by a selector that never waits (see busy_poll.py). Delays are timers on the loop, so a
client that waits never holds up the others.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import time
from collections.abc import Callable

import structlog

from sockd.config import BUFSIZE, Listener, SelectorBackend
from sockd.counters import BEAT_INTERVAL, RESET, SEND, TIMEOUT, TOO_LARGE, Stats
from sockd.handlers import Handler, Relay, Session, TooLarge
from sockd.limits import Admission, Timeouts, admitted, datagram_allowed, released
from sockd.models import HIGH_WATER, RESOURCE_PAUSE, Address, Stop, accept_failed, datagram_reply, shutdown_read
from sockd.models.relay import DatagramSessions, Splice, upstream_failed, upstream_socket

log = structlog.get_logger()

BACKENDS: dict[SelectorBackend, Callable[[], selectors.BaseSelector]] = {
    "auto": selectors.DefaultSelector,
    "select": selectors.SelectSelector,
    "poll": selectors.PollSelector,
    "epoll": selectors.EpollSelector,
}

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Connection:
    __slots__ = (
        "active",
        "answered",
        "closed",
        "closing",
        "deadline",
        "delayed",
        "events",
        "on_ready",
        "out",
        "reading",
        "session",
        "sock",
        "source",
    )

    def __init__(self, sock: socket.socket, source: str, session: Session, on_ready: Callable[[int], None]) -> None:
        self.sock = sock
        self.source = source
        self.session = session
        self.active = False  # see Timeouts
        self.deadline = 0.0
        self.out = bytearray()
        self.reading = True
        self.closing = False  # close once `out` is written and no delayed reply is due
        self.delayed = 0
        self.events = 0
        self.closed = False
        self.answered = False  # see shutdown_read: only answered connections end at once on a stop
        self.on_ready = on_ready


class EventLoop:
    """Serves one socket from one thread, driven by whatever selector `make_selector` returns."""

    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        make_selector: Callable[[], selectors.BaseSelector],
    ) -> None:
        self.listener = listener
        self.handler = handler
        self.stats = stats
        self.delay = listener.delay
        self.admission = Admission.of(listener)
        self.timeouts = Timeouts(listener)
        self.make_selector = make_selector
        # (when, tie-break, callback). The loop's other timers (sweeps, pauses, a relay's timeouts)
        # need not run once it stops: it ends when no connection is open and no delayed reply is due.
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.pending_datagrams = 0
        self.sequence = itertools.count()
        self.connections: set[Connection | Splice] = set()
        self.relay = handler if isinstance(handler, Relay) else None

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        self.selector = self.make_selector()
        self.sock = sock
        self.stop = stop
        stream = sock.type == socket.SOCK_STREAM
        self.selector.register(stop, READ, self._on_stop)
        self.selector.register(sock, READ, self._on_accept if stream else self._on_datagram)
        if self.timeouts.interval is not None:
            self.later(self._sweep, after=self.timeouts.interval)
        self.sessions = DatagramSessions(self, self.relay) if self.relay is not None and not stream else None
        if self.sessions is not None:
            self.sessions.start()
        with self.stats.recorder() as self.recorder:
            try:
                while not (stop.is_set and not self.connections and not self.pending_datagrams):
                    for key, events in self.selector.select(self._timeout()):
                        key.data(events)
                    self._run_timers()
                    self.stats.beat()
            finally:
                if self.sessions is not None:
                    self.sessions.close()
                self.selector.close()

    # -- the loop's own plumbing

    def _timeout(self) -> float:
        if not self.timers:
            return BEAT_INTERVAL  # an idle loop still turns, to beat
        return min(BEAT_INTERVAL, max(0.0, self.timers[0][0] - time.monotonic()))

    def later(self, callback: Callable[[], None], after: float | None = None) -> None:
        """Run `callback` after `after` seconds (the listener's delay by default)."""
        when = time.monotonic() + (self.delay if after is None else after)
        heapq.heappush(self.timers, (when, next(self.sequence), callback))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2]()

    def _sweep(self) -> None:
        """End the connections past first_byte_timeout or idle_timeout (see Timeouts)."""
        for conn in self.timeouts.expired(self.connections):
            self.recorder.errors[TIMEOUT] += 1
            if isinstance(conn, Splice):
                conn.close()
            else:
                self._close(conn)
        if not (self.stop.is_set and not self.connections):  # else the loop could never end
            assert self.timeouts.interval is not None
            self.later(self._sweep, after=self.timeouts.interval)

    def _on_stop(self, events: int) -> None:
        if not self.stop.is_set:
            return  # the busy selector reports the stop as ready on every turn
        self.selector.unregister(self.stop)
        if self.sock in self.selector.get_map():  # not while accepting is paused (out of resources)
            self.selector.unregister(self.sock)
        for conn in self.connections:
            if conn.answered:
                shutdown_read(conn.sock.fileno())

    # -- datagrams

    def _on_datagram(self, events: int) -> None:
        try:
            data, sender = self.sock.recvfrom(BUFSIZE)
        except (BlockingIOError, ConnectionRefusedError):
            return  # nothing there yet, or an ICMP error for an earlier reply
        if not datagram_allowed(self.admission, self.listener, sender, self.recorder):
            return
        if self.sessions is not None:
            self.sessions.forward(data, sender)
            return
        started = self.recorder.clock()
        reply = datagram_reply(self.handler, data, self.recorder)
        if reply is None:
            return
        if self.delay:
            self.pending_datagrams += 1
            self.later(lambda: self._send_datagram(reply, sender, len(data), started, delayed=True))
        else:
            self._send_datagram(reply, sender, len(data), started)

    def _send_datagram(
        self, reply: bytes, sender: Address, received: int, started: float, delayed: bool = False
    ) -> None:
        self.pending_datagrams -= delayed
        if self.send_datagram_to(reply, sender):
            self.recorder.request(received, len(reply), started)

    def send_datagram_to(self, data: bytes, client: Address) -> bool:
        try:
            self.sock.sendto(data, client)
        except OSError as exc:  # a full send buffer drops the reply, as the network may
            self.recorder.errors[SEND] += 1
            log.debug("datagram reply failed", error=str(exc))
            return False
        return True

    # -- streams

    def _on_accept(self, events: int) -> None:
        if self.stop.is_set:  # in the same turn as the stop, after it
            return
        try:
            client, address = self.sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:
            accept_failed(exc, self.recorder)
            self.selector.unregister(self.sock)
            self.later(self._resume_accepting, after=RESOURCE_PAUSE)
            return
        source = admitted(self.admission, self.listener, client, address, self.recorder)
        if source is None:
            return
        client.setblocking(False)
        self.recorder.connections += 1
        if self.relay is not None:
            self._splice(client, source, self.relay)
            return
        conn = Connection(client, source, self.handler.session(), lambda events: self._on_ready(conn, events))
        self.timeouts.started(conn)
        self.connections.add(conn)
        greeting = conn.session.greeting()
        if greeting is None:
            self._update(conn)
        else:  # it says all it has at connect, then closes
            conn.reading = False
            self._reply(conn, greeting, True, received=0, started=self.recorder.clock())

    def _splice(self, client: socket.socket, source: str, relay: Relay) -> None:
        try:
            upstream = upstream_socket(relay)
        except OSError as exc:
            upstream_failed(relay, self.recorder, str(exc))
            client.close()
            self.recorder.closed += 1
            released(self.admission, source)
            return
        splice = Splice(self, client, upstream, source)
        self.timeouts.started(splice)
        self.connections.add(splice)
        splice.start(relay.connect_timeout)

    def forget(self, splice: Splice) -> None:
        """A relayed client is gone: both of its sockets are closed."""
        self.recorder.closed += 1
        self.connections.discard(splice)
        released(self.admission, splice.source)

    def _resume_accepting(self) -> None:
        if not self.stop.is_set:
            self.selector.register(self.sock, READ, self._on_accept)

    def _on_ready(self, conn: Connection, events: int) -> None:
        if events & WRITE and not conn.closed:
            self._flush(conn)
        if events & READ and not conn.closed:
            self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(conn, exc)
            return
        started = self.recorder.clock()
        if data:
            conn.active = True
            try:
                reply = conn.session.feed(data)
            except TooLarge:
                self.recorder.errors[TOO_LARGE] += 1
                self._close(conn)
                return
            closing = conn.session.closing
        else:
            reply, closing = conn.session.eof(), True
        conn.reading = not closing
        received = len(data) if data else None  # what is said at EOF answers no request
        if self.delay and data:
            conn.delayed += 1
            self.later(lambda: self._reply(conn, reply, closing, received=received, started=started, delayed=True))
        else:
            self._reply(conn, reply, closing, received=received, started=started)

    def _reply(
        self,
        conn: Connection,
        reply: bytes,
        closing: bool,
        *,
        received: int | None,
        started: float,
        delayed: bool = False,
    ) -> None:
        """Send `reply` (what the kernel will not take yet waits in `conn.out`); `received` is the
        size of the request it answers (0 for a greeting), None for what is said at the client's EOF."""
        conn.delayed -= delayed
        if conn.closed:
            return
        conn.closing = conn.closing or closing
        size = len(reply)
        if reply and not conn.out:
            try:
                reply = reply[conn.sock.send(reply) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                self._lost(conn, exc)
                return
        conn.out += reply
        if received is not None:
            self.recorder.request(received, size, started)
            if not conn.answered:
                conn.answered = True
                if self.stop.is_set:  # the drain passed it by while it had no answer yet
                    shutdown_read(conn.sock.fileno())
        self._update(conn)

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(conn, exc)
            return
        del conn.out[:sent]
        conn.active = True
        self._update(conn)

    def _update(self, conn: Connection) -> None:
        """Register for what the connection waits for now, or close it when it waits for nothing."""
        if conn.closing and not conn.out and not conn.delayed:
            self._close(conn)
            return
        events = (READ if conn.reading and len(conn.out) < HIGH_WATER else 0) | (WRITE if conn.out else 0)
        if events == conn.events:
            return
        if not conn.events:
            self.selector.register(conn.sock, events, conn.on_ready)
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn.on_ready)
        conn.events = events

    def _lost(self, conn: Connection, exc: OSError) -> None:
        """The client reset the connection or went away mid-request."""
        self.recorder.errors[RESET] += 1
        log.debug("connection lost", error=str(exc))
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        self.recorder.closed += 1
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.events = 0
        conn.closed = True
        conn.sock.close()
        self.connections.discard(conn)
        released(self.admission, conn.source)


class Model(EventLoop):
    def __init__(self, listener: Listener, handler: Handler, stats: Stats) -> None:
        super().__init__(listener, handler, stats, BACKENDS[listener.selector_backend])

"""The seed's event loop: one thread, non-blocking sockets, a readiness loop over `selectors`.

The loop itself takes any `selectors.BaseSelector`, so the busy-poll model is this same loop
driven by a selector that never waits (see busy_poll.py). Delays are timers on the loop, so a
client that waits never holds up the others.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import selectors
import socket
import time
from collections.abc import Callable

from sockd.config import BUFSIZE, Listener, SelectorBackend
from sockd.counters import BEAT_INTERVAL, Stats
from sockd.handlers import Handler, Relay
from sockd.lifecycle import Datagrams, Service, Staging, stream
from sockd.models.shared import accept_failed, stop_listening
from sockd.relay import Resolver
from sockd.relay.selector import DatagramSessions, Splice
from sockd.sockets import RESOURCE_PAUSE
from sockd.stopping import Stop
from sockd.transports import READ, SelectorTransport, admit

BACKENDS: dict[SelectorBackend, Callable[[], selectors.BaseSelector]] = {
    "auto": selectors.DefaultSelector,
    "select": selectors.SelectSelector,
    "poll": selectors.PollSelector,
    "epoll": selectors.EpollSelector,
}


class EventLoop:
    """Serves one socket from one thread, driven by whatever selector `make_selector` returns.

    It is the reactor the relay runs on (sockd.relay.Reactor): `register`, `recorder` and
    `call_soon_threadsafe` (for the relay's name lookups); its timer reaches the relay as the
    service's `later`."""

    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        make_selector: Callable[[], selectors.BaseSelector],
        *,
        stage: Staging | None = None,
    ) -> None:
        self.stats = stats
        self.service = Service(listener, handler, later=self.later, udp_ports=udp_ports, stage=stage)
        self.make_selector = make_selector
        # (when, tie-break, callback, args). The loop's other timers (sweeps, pauses, a relay's
        # timeouts) need not run once it stops: it ends when no connection is open and no
        # delayed reply is due.
        self.timers: list[tuple[float, int, Callable[..., object], tuple[object, ...]]] = []
        self.sequence = itertools.count()
        # A relay's upstream, looked up through it (None: not a relay).
        self.names = Resolver(handler, self.call_soon_threadsafe) if isinstance(handler, Relay) else None
        # Callbacks other threads ask the loop to run, and the socket pair whose byte wakes it.
        self.soon: collections.deque[tuple[Callable[..., object], tuple[object, ...]]] = collections.deque()

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        self.selector = self.make_selector()
        self.sock = sock
        self.stop = stop
        stream = sock.type == socket.SOCK_STREAM
        self.selector.register(stop, READ, self._on_stop)
        self.selector.register(stop.ending, READ, self._on_end)
        self.selector.register(sock, READ, self._on_accept if stream else self._on_datagram)
        self.woken, self.waker = socket.socketpair()
        self.woken.setblocking(False)
        self.waker.setblocking(False)
        self.selector.register(self.woken, READ, self._on_wake)
        if self.service.timeouts.interval is not None:
            self.later(self.service.timeouts.interval, self._sweep)
        with self.stats.recorder() as self.recorder:
            self.datagrams = Datagrams(self.service, self.recorder, sock.sendto)
            self.sessions = None
            if self.names is not None and not stream:
                self.sessions = DatagramSessions(self, self.service, self.names, self.datagrams)
            try:
                while not (stop.is_set and not self.service.open and not self.datagrams.pending):
                    for key, events in self.selector.select(self._timeout()):
                        key.data(events)
                    self._run_timers()
                    self.stats.beat()
            finally:
                if self.sessions is not None:
                    self.sessions.close()
                self.selector.close()
                self.woken.close()
                self.waker.close()

    # -- the loop's own plumbing

    def _timeout(self) -> float:
        if not self.timers:
            return BEAT_INTERVAL  # an idle loop still turns, to beat
        return min(BEAT_INTERVAL, max(0.0, self.timers[0][0] - time.monotonic()))

    def later(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` in `delay` seconds (as asyncio's call_later)."""
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.sequence), callback, args))

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` in the loop, asked from another thread (as asyncio's); OSError
        once the loop has ended."""
        self.soon.append((callback, args))
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is due already
            self.waker.send(b"\0")

    def _on_wake(self, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self.woken.recv(4096)
        while self.soon:
            callback, args = self.soon.popleft()
            callback(*args)

    def register(self, sock: socket.socket, was: int, events: int, callback: Callable[[int], None]) -> int:
        """Wait for `events` on `sock` (none: forget it) where it waited for `was`; returns `events`."""
        if events == was:
            return events
        if not was:
            self.selector.register(sock, events, callback)
        elif not events:
            self.selector.unregister(sock)
        else:
            self.selector.modify(sock, events, callback)
        return events

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback, args = heapq.heappop(self.timers)
            callback(*args)

    def _sweep(self) -> None:
        self.service.sweep()
        if not (self.stop.is_set and not self.service.open):  # else the loop could never end
            assert self.service.timeouts.interval is not None
            self.later(self.service.timeouts.interval, self._sweep)

    def _on_stop(self, events: int) -> None:
        if not self.stop.is_set:
            return  # the busy selector reports the stop as ready on every turn
        self.selector.unregister(self.stop)
        if self.sock in self.selector.get_map():  # not while accepting is paused (out of resources)
            self.selector.unregister(self.sock)
        stop_listening(self.sock)

    def _on_end(self, events: int) -> None:
        if not self.stop.ending.is_set:
            return
        self.selector.unregister(self.stop.ending)
        self.service.drain()

    # -- datagrams

    def _on_datagram(self, events: int) -> None:
        try:
            data, sender = self.sock.recvfrom(BUFSIZE)
        except (BlockingIOError, ConnectionRefusedError):
            return  # nothing there yet, or an ICMP error for an earlier reply
        if self.sessions is not None:
            self.sessions.datagram_received(data, sender)
        else:
            self.datagrams.datagram_received(data, sender)

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
            self.later(RESOURCE_PAUSE, self._resume_accepting)
            return
        ticket = admit(client, address, self.service.admission, self.recorder)
        if ticket is None:
            return
        client.setblocking(False)
        if self.names is not None:
            Splice(self, self.service, self.names, client, ticket).start()
        else:
            SelectorTransport(self, client, stream(self.service, ticket, self.recorder)).start()

    def _resume_accepting(self) -> None:
        if not self.stop.is_set:
            self.selector.register(self.sock, READ, self._on_accept)


class Model(EventLoop):
    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        stage: Staging | None = None,
    ) -> None:
        super().__init__(listener, handler, stats, udp_ports, BACKENDS[listener.selector_backend], stage=stage)

"""`handler: relay`: each client joined to its own upstream, bytes copied both ways as they come.

The policy lives here, once: socat's half-close (when one side ends its output, the other side's
output is ended after what is buffered, and copying goes on the other way until that side ends
too or is quiet for half_close_timeout), what counts as moved, how a failing upstream is counted,
and the UDP session table. Two drivers carry it out, each on its model's way of waiting:
`relay.selector` (non-blocking sockets on the selector models' loop) and `relay.aio` (asyncio
transports). Neither imports a model: each is given what it needs, a `Service` for timers and
accounting, and the selector driver a `Reactor`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

from sockd.counters import UPSTREAM, Recorder
from sockd.handlers import Relay
from sockd.lifecycle import Address, Connection, Service
from sockd.limits import MOVED, Ticket
from sockd.logging import Throttled

# What opening an upstream can fail with: refused, unreachable, timed out; ValueError for a host
# name IDNA cannot encode (config refuses most of them).
UPSTREAM_ERRORS = (OSError, ValueError)
# UDP relay sessions per worker: past this, datagrams from new clients are dropped (each session
# holds a descriptor, and a flood from many addresses must not take them all).
MAX_SESSIONS = 4096

_upstream_warning = Throttled("upstream failed")
_sessions_warning = Throttled("too many relay sessions; dropping datagrams from new clients")


class Reactor(Protocol):
    """What the selector driver needs of its loop."""

    recorder: Recorder

    def register(self, sock: socket.socket, was: int, events: int, callback: Callable[[int], None]) -> int:
        """Wait for `events` on `sock` (none: forget it) where it waited for `was`; returns `events`."""


def upstream_failed(relay: Relay, recorder: Recorder, exc: BaseException | str) -> None:
    recorder.errors[UPSTREAM] += 1
    _upstream_warning(upstream=relay.upstream, error=exc if isinstance(exc, str) else reason(exc))


def reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a TimeoutError says nothing


class Relayed(Connection):
    """One relayed client, as both drivers see it: what it moved, how many of its two sides
    have ended their output, and the rule that closes it. A driver defines `close_both`."""

    __slots__ = ("ended", "moved", "relay")

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, relay: Relay) -> None:
        super().__init__(service, ticket, recorder)
        self.relay = relay
        self.answered = True  # a stop may end its input at once: the end is passed on as a half-close
        self.ended = 0  # sides that have ended their output
        self.moved = 0  # bytes copied either way (see _close_if_quiet)

    def close_both(self) -> None:
        """End both sides once each has written what it holds."""
        raise NotImplementedError

    def carried(self, size: int, from_client: bool) -> None:
        self.deadline = MOVED
        self.moved += size
        if from_client:
            self.recorder.received += size
        else:
            self.recorder.sent += size

    def side_ended(self) -> None:
        """One side ended its output (its end was passed on to the other side)."""
        self.ended += 1
        if self.ended == 2:
            self.close_both()
        else:
            self._close_if_quiet(-1)

    def _close_if_quiet(self, moved: int) -> None:
        """Half-closed: as socat's -t, give up on the other side once it has been quiet for
        half_close_timeout (a long transfer the other way is not cut short)."""
        if self.moved == moved:
            self.close_both()
        else:
            self.service.later(self.relay.half_close_timeout, self._close_if_quiet, self.moved)

    def upstream_failed(self, exc: BaseException | str) -> None:
        upstream_failed(self.relay, self.recorder, exc)


class Session(Protocol):
    last_seen: float

    def close(self) -> None: ...


S = TypeVar("S", bound=Session)


class Sessions(dict[Address, S]):
    """A UDP relay's sessions, one per client address (each with its own upstream socket, so
    replies find their way back), at most MAX_SESSIONS, each forgotten after session_timeout
    without a datagram either way."""

    def __init__(self, relay: Relay, service: Service, clock: Callable[[], float]) -> None:
        super().__init__()
        self.relay = relay
        self.service = service
        self.clock = clock
        self.service.later(relay.session_timeout / 4, self._forget_idle)

    def admits(self, client: Address, recorder: Recorder) -> bool:
        """Whether a datagram from `client` is relayed: not from a reflecting port (see
        lifecycle.Datagrams: a relay passes back what its upstream answers, so it could loop as
        an echo does), and let in by the listener's access rules."""
        service = self.service
        if client[1] in service.reflecting:
            service.reflected(client, recorder)
            return False
        return service.admission.allows_datagram(client, recorder)

    def open(self, client: Address, make: Callable[[], S]) -> S | None:
        """The session of `client`, made now if it has none; None (warned) when the table is full."""
        session = self.get(client)
        if session is None:
            if len(self) >= MAX_SESSIONS:
                _sessions_warning(sessions=MAX_SESSIONS)
                return None
            session = self[client] = make()
        session.last_seen = self.clock()
        return session

    def _forget_idle(self) -> None:
        now = self.clock()
        for client, session in list(self.items()):
            if now - session.last_seen >= self.relay.session_timeout:
                session.close()
                del self[client]
        self.service.later(self.relay.session_timeout / 4, self._forget_idle)

    def close(self) -> None:
        for session in self.values():
            session.close()
        self.clear()

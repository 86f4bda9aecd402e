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

import itertools
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

from sockd.counters import REJECT_REASONS, UPSTREAM, Recorder
from sockd.handlers import Relay
from sockd.lifecycle import Address, Connection, Logged, Service
from sockd.limits import MOVED, RELAY_SESSIONS, Ticket, source_of
from sockd.logging import Throttled

# What opening an upstream can fail with: refused, unreachable, timed out; ValueError for a host
# name IDNA cannot encode (config refuses most of them).
UPSTREAM_ERRORS = (OSError, ValueError)
# UDP relay sessions per worker (each holds a descriptor), and per client address within them:
# a host sending from many ports recycles its own sessions long before it could fill the table.
MAX_SESSIONS = 4096
MAX_SESSIONS_PER_SOURCE = 256

_upstream_warning = Throttled("upstream failed")
_evicted_warning = Throttled("relay sessions full: closed the least recent to make room")


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
    have ended their output, and the rule that closes it. A driver defines `close_both`, and
    `peer` for its log line (see LoggedRelay).

    It is one request, counted when it ends and timed from its start to its end: a relay cannot
    tell where one of the client's requests ends, only the bytes it moves (counted as they come)."""

    __slots__ = ("ended", "moved", "relay", "started")

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, relay: Relay) -> None:
        super().__init__(service, ticket, recorder)
        self.relay = relay
        self.answered = True  # a stop may end its input at once: the end is passed on as a half-close
        self.ended = 0  # sides that have ended their output
        self.moved = 0  # bytes copied either way (see _close_if_quiet)
        self.started = 0.0

    def opened(self) -> None:
        self.started = self.recorder.clock()
        super().opened()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.recorder.request(0, 0, self.started)  # its bytes are counted as they move
        super().connection_lost(exc)

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

    def side_ended(self, client: bool) -> None:
        """One side (the client's, or the upstream's) ended its output (its end was passed on to
        the other side)."""
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


class LoggedRelay(Logged, Relayed):
    """A relayed connection logged as it ends (see lifecycle.Logged): a driver's class, made so
    by `logged(listener, that class, LoggedRelay)`. As the metrics count them, its bytes in are what the
    client sent, its bytes out what came back for it, and it is one request."""

    # Every way a relay ends names its cause first, or is a client's reset; a close without
    # either could only come from the upstream's side.
    unprompted = "upstream closed"

    def opened(self) -> None:
        super().opened()
        self.requests = 1

    def carried(self, size: int, from_client: bool) -> None:
        if from_client:
            self.bytes_in += size
        else:
            self.bytes_out += size
        super().carried(size, from_client)

    def side_ended(self, client: bool) -> None:
        self.ended_by("client closed" if client else "upstream closed")
        super().side_ended(client)

    def upstream_failed(self, exc: BaseException | str) -> None:
        self.ended_by("upstream failed")
        super().upstream_failed(exc)


class Session(Protocol):
    last_seen: float
    asked: float  # the recorder's clock when the client's latest datagram came

    def close(self) -> None: ...


S = TypeVar("S", bound=Session)


class Sessions(OrderedDict[Address, S]):
    """A UDP relay's sessions, one per client address (each with its own upstream socket, so
    replies find their way back), least recently seen first: a datagram either way moves its
    session to the end (an OrderedDict's move and its popping of the first are O(1), where a dict
    leaves a hole at the front for each). A session is forgotten after session_timeout without a
    datagram. A new client past MAX_SESSIONS_PER_SOURCE sessions from its address closes that
    address's least recent; past MAX_SESSIONS, the table's least recent: a new client is always
    served, so a flood cannot lock others out, and a session it closes is counted and warned of.

    Each reply passed back to a client is a request, timed from the client's latest datagram (as
    a datagram answered is for the other handlers): a session ends only session_timeout after its
    last word, so its life would time nothing."""

    def __init__(self, relay: Relay, service: Service, recorder: Recorder, clock: Callable[[], float]) -> None:
        super().__init__()
        self.relay = relay
        self.service = service
        self.recorder = recorder
        self.clock = clock
        self.by_source: dict[str, set[Address]] = {}
        self.service.later(relay.session_timeout / 4, self._forget_idle)

    def admits(self, client: Address) -> bool:
        """Whether a datagram from `client` is relayed: not from a reflecting port (see
        lifecycle.Datagrams: a relay passes back what its upstream answers, so it could loop as
        an echo does), and let in by the listener's access rules."""
        service = self.service
        if client[1] in service.reflecting:
            service.reflected(client, self.recorder)
            return False
        return service.admission.allows_datagram(client, self.recorder)

    def open(self, client: Address, make: Callable[[], S]) -> S:
        """The session of `client`, made now if it has none (what `make` raises is passed on,
        and nothing is closed for it)."""
        session = self.get(client)
        if session is None:
            session = make()
            self._make_room(client)
            self.by_source.setdefault(source_of(client), set()).add(client)
            self[client] = session
        else:
            self.move_to_end(client)
        session.last_seen = self.clock()
        session.asked = self.recorder.clock()
        return session

    def replied(self, client: Address, size: int) -> None:
        """A reply of `size` bytes came back for `client`: a request answered, and its session
        the most recent."""
        session = self.get(client)
        if session is None:
            self.recorder.sent += size
            return
        self.move_to_end(client)
        session.last_seen = self.clock()
        self.recorder.request(0, size, session.asked)

    def forget(self, client: Address, session: S) -> None:
        """Drop `session` of `client`, if it is still there (its upstream could not be opened)."""
        if self.get(client) is session:
            del self[client]
            self._disown(client)

    def _make_room(self, client: Address) -> None:
        own = self.by_source.get(source_of(client), ())
        if len(own) >= MAX_SESSIONS_PER_SOURCE:
            # A scan of the source's own sessions, paid only by an address at its cap.
            self._evict(min(own, key=lambda other: self[other].last_seen), client)
        elif len(self) >= MAX_SESSIONS:
            self._evict(next(iter(self)), client)

    def _evict(self, victim: Address, client: Address) -> None:
        self._close(victim)
        self.recorder.rejected[RELAY_SESSIONS] += 1
        _evicted_warning(reason=REJECT_REASONS[RELAY_SESSIONS], source=source_of(client), sessions=len(self))

    def _close(self, client: Address) -> None:
        self.pop(client).close()
        self._disown(client)

    def _disown(self, client: Address) -> None:
        source = source_of(client)
        own = self.by_source[source]
        own.discard(client)
        if not own:
            del self.by_source[source]

    def _forget_idle(self) -> None:
        idle_since = self.clock() - self.relay.session_timeout
        idle = list(itertools.takewhile(lambda client: self[client].last_seen <= idle_since, self))
        for client in idle:
            self._close(client)
        self.service.later(self.relay.session_timeout / 4, self._forget_idle)

    def close(self) -> None:
        for session in self.values():
            session.close()
        self.clear()
        self.by_source.clear()

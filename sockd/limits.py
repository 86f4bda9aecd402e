"""What a listener lets in and how long it lets a connection sit: access rules, peer credentials,
connection counts and rates, datagram rates, timeouts. Sans-IO, like the handlers: it is told
addresses, credentials and times, never given a socket; the connection lifecycle asks and the
models act.

Behind a balancer (`proxy_protocol`), the client is not the peer: the peer is let in at accept
if `proxy_trusted` names it (and by the limits that count connections, not sources), and the
client its PROXY header names is judged by the source rules (allow/deny, per-source counts and
rates) once the header is read (Admission.admit_client).

Everything here is per worker process, as gunicorn's worker_connections is: a listener with
`workers: 3` and `max_connections: 100` serves up to 300 connections.
"""

from __future__ import annotations

import ipaddress
import math
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Protocol, TypeVar

from sockd.config import InetListener, Listener, Network, UnixListener
from sockd.counters import REJECT_REASONS, Recorder
from sockd.logging import Throttled

(
    MAX_CONNECTIONS,
    PER_SOURCE,
    RATE,
    ACL,
    RELAY_CONNECTIONS,
    RELAY_SESSIONS,
    REFLECTION,
    PROXY_PROTOCOL,
    DATAGRAM_RATE,
) = range(len(REJECT_REASONS))
# Sources remembered for rates and access decisions: past this many, forgotten (the quiet first),
# so a flood from many addresses costs bounded memory.
MEMORY = 4096
# Descriptors a relay worker keeps out of its connections' reach: its own (socket, pipes,
# counters, log: about twenty) and the one accept() needs to refuse a client.
WORKER_RESERVED_DESCRIPTORS = 64


class AccessList:
    """allow/deny by source address: the longest matching block decides, deny on a tie; a source no
    block matches (or no IP address at all) is let in unless there is an `allow` list."""

    def __init__(self, allow: Iterable[Network], deny: Iterable[Network]) -> None:
        rules = [(net, True) for net in allow] + [(net, False) for net in deny]
        # Longest prefix first; on a tie, deny (False) sorts first.
        self.rules = sorted(rules, key=lambda rule: (-rule[0].prefixlen, rule[1]))
        self.default = not any(allowed for _, allowed in rules)
        self.decided: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        decision = self.decided.get(host)
        if decision is None:
            decision = self._decide(host)
            if len(self.decided) >= MEMORY:
                self.decided.clear()
            self.decided[host] = decision
        return decision

    def _decide(self, host: str) -> bool:
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:  # no IP address: a client a PROXY header names by a Unix path, or none known
            return self.default
        # A dual-stack IPv6 socket sees IPv4 clients as ::ffff:a.b.c.d; the rules name them as IPv4.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network, allowed in self.rules:
            if address in network:
                return allowed
        return self.default


Credentials = tuple[int, int, int]  # a Unix peer's pid, uid and gid (SO_PEERCRED)


class Ticket:
    """A connection's place under its listener's limits, given back exactly once: by the
    connection's lifecycle when it closes, or by whoever gives up on it before it opens. Its
    `source` is what it is counted by per source: None until a PROXY header names its client."""

    __slots__ = ("admission", "source")

    def __init__(self, admission: Admission | None, source: str | None) -> None:
        self.admission = admission
        self.source = source

    def release(self) -> None:
        admission, self.admission = self.admission, None
        if admission is not None:
            admission.release(self.source)


# The one ticket of every connection of a listener without limits: nothing to give back, and
# nothing allocated per connection.
FREE = Ticket(None, "")


class Unlimited:
    """The admission of a listener with no limits: everything is let in, at no cost per connection."""

    wants_credentials = False

    def admit(self, address: object, credentials: Credentials | None, recorder: Recorder) -> Ticket | None:
        return FREE

    def allows_datagram(self, address: object, recorder: Recorder) -> bool:
        return True

    def admit_client(self, ticket: Ticket, address: object, recorder: Recorder, **shown: object) -> bool:
        return True


class Admission:
    """Decides whether a new connection or datagram is served, and counts and logs it when not.

    Shared by a worker's threads (the blocking models accept and close in different threads), so
    its state is under a lock. It asks nothing of a socket: a Unix listener's model reads the
    peer's credentials for it (`wants_credentials`)."""

    def __init__(self, listener: Listener, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = listener.max_connections or math.inf
        self.relayed = relayed_connections(2) if relays_streams(listener) else math.inf
        self.per_source = listener.max_connections_per_source or math.inf
        self.access = AccessList(listener.allow, listener.deny) if isinstance(listener, InetListener) else None
        # Behind a balancer: only its addresses may connect, and sources are its clients'.
        self.proxied = listener.proxy_protocol is not None
        self.trusted = AccessList(listener.proxy_trusted, ()) if listener.proxy_trusted else None
        self.uids = set(listener.allow_uids)
        self.gids = set(listener.allow_gids)
        # A refused Unix peer is logged by its credentials: it has no address to name it by.
        self.wants_credentials = isinstance(listener, UnixListener)
        self.open = 0
        self.by_source: dict[str, int] = {}
        # New connections and datagrams per source (connection_rate, datagram_rate), if limited.
        self.connections = buckets(listener.connection_rate, listener.connection_burst, clock)
        self.datagrams = buckets(listener.datagram_rate, listener.datagram_burst, clock)
        self.lock = threading.Lock()
        self.warn = Throttled("rejected", per="reason")

    def admit(self, address: object, credentials: Credentials | None, recorder: Recorder) -> Ticket | None:
        """A ticket for a just-accepted connection from `address` (`credentials`: its Unix peer's),
        or None if a limit refuses it (counted and logged; the model closes it at once)."""
        source = source_of(address)
        reason = self._refusal(source, credentials)
        if reason is None:
            return Ticket(self, None if self.proxied else source)
        recorder.rejected[reason] += 1
        shown = "pid={} uid={} gid={}".format(*credentials) if credentials is not None else source
        self.warn(reason=REJECT_REASONS[reason], source=shown)
        return None

    def admit_client(self, ticket: Ticket, address: object, recorder: Recorder, **shown: object) -> bool:
        """Whether the client at `address`, which a PROXY header named (or the peer itself, for a
        header that names none), is served on the connection `ticket` let in: by the source
        rules the peer was not judged by at accept. If so, `ticket` counts by its source from
        now on; if not, it is counted and logged (with `shown`: the balancer it came through)."""
        source = source_of(address)
        if self.access is not None and not self.access.allows(source):
            reason: int | None = ACL
        else:
            with self.lock:
                reason = self._take_source(source)
        if reason is None:
            ticket.source = source
            return True
        recorder.rejected[reason] += 1
        self.warn(reason=REJECT_REASONS[reason], source=source, **shown)
        return False

    def allows_datagram(self, address: object, recorder: Recorder) -> bool:
        """Whether a datagram from `address` is answered: by the access rules, then its source's
        datagram_rate (counted and logged when not: it is dropped unanswered)."""
        source = source_of(address)
        if self.access is not None and not self.access.allows(source):
            reason = ACL
        elif self.datagrams is not None:
            with self.lock:
                if self.datagrams.take(source):
                    return True
            reason = DATAGRAM_RATE
        else:
            return True
        recorder.rejected[reason] += 1
        self.warn(reason=REJECT_REASONS[reason], source=source)
        return False

    def release(self, source: str | None) -> None:
        with self.lock:
            self.open -= 1
            if source is not None:
                left = self.by_source.pop(source) - 1
                if left:
                    self.by_source[source] = left

    def _refusal(self, source: str, credentials: Credentials | None) -> int | None:
        """Why a just-accepted connection from `source` is refused, if it is (None: it is let in)."""
        if self.trusted is not None:  # a balancer's: its clients are judged by their headers
            if not self.trusted.allows(source):
                return PROXY_PROTOCOL
        elif self.access is not None and not self.access.allows(source):
            return ACL
        if (self.uids or self.gids) and not self._credentials_allowed(credentials):
            return ACL
        with self.lock:
            if self.open >= self.max_connections:
                return MAX_CONNECTIONS
            if self.open >= self.relayed:
                return RELAY_CONNECTIONS
            if not self.proxied:
                reason = self._take_source(source)
                if reason is not None:
                    return reason
            self.open += 1
        return None

    def _take_source(self, source: str) -> int | None:
        """Count a connection from `source`, or why its source may have no more (under the lock)."""
        count = self.by_source.get(source, 0)
        if count >= self.per_source:
            return PER_SOURCE
        if self.connections is not None and not self.connections.take(source):
            return RATE
        self.by_source[source] = count + 1
        return None

    def _credentials_allowed(self, credentials: Credentials | None) -> bool:
        if credentials is None:
            return False
        _, uid, gid = credentials
        return uid in self.uids or gid in self.gids


class TokenBuckets:
    """A token bucket per source: `burst` tokens each, refilled at `rate` per second; at most
    MEMORY sources remembered. Not thread-safe: its Admission takes its lock around it.

    The clock is given rather than read from the time module: compiled (mypyc), this module holds
    time.monotonic where no test's stand-in reaches it."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # source: (tokens, when counted)

    def take(self, source: str) -> bool:
        """A token from the bucket of `source`, if it has one."""
        now = self.clock()
        tokens, then = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if len(self.buckets) >= MEMORY:
            self._forget_full(now)
        self.buckets[source] = (tokens - 1 if tokens >= 1 else tokens, now)  # reinserted: most recent last
        return tokens >= 1

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (they hold nothing a new one would not), and if that is
        not enough, the least recently used half."""
        for source, (tokens, then) in list(self.buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self.buckets[source]
        if len(self.buckets) >= MEMORY:
            for source in list(self.buckets)[: MEMORY // 2]:
                del self.buckets[source]


def buckets(rate: float | None, burst: int | None, clock: Callable[[], float]) -> TokenBuckets | None:
    """The token buckets of a rate and its burst (default: the rate, at least 1); None: no rate."""
    return None if rate is None else TokenBuckets(rate, burst or max(1, math.ceil(rate)), clock)


def admission_for(listener: Listener) -> Admission | Unlimited:
    """The admission rules of `listener`; a listener with none pays nothing per connection."""
    limited: tuple[object, ...] = (
        listener.max_connections,
        listener.max_connections_per_source,
        listener.connection_rate,
        listener.datagram_rate,
        listener.allow_uids,
        listener.allow_gids,
    )
    if isinstance(listener, InetListener):
        limited += (listener.allow, listener.deny, listener.proxy_trusted)
    return Admission(listener) if any(limited) or relays_streams(listener) else Unlimited()


def relays_streams(listener: Listener) -> bool:
    return listener.handler == "relay" and listener.streams


def relayed_connections(descriptors_each: int) -> float:
    """The most clients a relay worker holds, `descriptors_each` descriptors each (a stream
    relay's connection two, a UDP relay's session one), out of its soft RLIMIT_NOFILE less a
    reserve. Past it a stream client is refused at once (a UDP client closes the least recent
    session: see relay.Sessions). Running out instead would only pause accept(), and a relay
    that loops back to itself (through another listener, or a name that resolves to its own
    address: what --check cannot see) would leave its next hop queued, to grow the loop again as
    soon as a descriptor is free, long after its client left; a UDP relay's new clients would go
    unserved until a session timed out."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return math.inf
    return max(1, (soft - WORKER_RESERVED_DESCRIPTORS) // descriptors_each)


def source_of(address: object) -> str:
    """The key limits count by: a client's IP ("" for what has none, a Unix socket's peers)."""
    return str(address[0]) if isinstance(address, tuple) else ""


# A connection's deadline once it has moved a byte since the last sweep: the models store it on
# every read and write (one store, as a flag would cost, and a slot less per connection). Final:
# compiled, a constant in the code rather than a lookup in the module's dict at every read.
MOVED: Final = 0.0


class Timed(Protocol):
    """A connection as the timeout sweep sees it (the event-loop models' connection objects)."""

    deadline: float  # when it times out; MOVED: it moved a byte since the last sweep
    delayed: int  # replies due later: the server, not the client, is what it waits for


T = TypeVar("T", bound=Timed)


class Timeouts:
    """first_byte_timeout and idle_timeout for the event-loop models, which mark activity with one
    attribute store per read or write. A sweep every quarter of the shortest timeout finds the
    expired, so a connection ends between its timeout and a quarter of it later. Each step of a
    listener's stage (a PROXY header, a TLS handshake: `stages`, their bounds in order) has until
    the shorter of its own bound and first_byte_timeout: it moves no deadline while it reads, so
    a client that trickles a header or a handshake is ended all the same; the first byte the
    handler sees is then awaited for first_byte_timeout from the stage's end.

    (The blocking models need no sweep: a socket timeout on each recv() and send() does it, each
    read of a stage waiting at most until the deadline set here.)"""

    def __init__(self, listener: Listener, stages: tuple[float, ...] = ()) -> None:
        self.first_byte = listener.first_byte_timeout or listener.idle_timeout or math.inf
        self.idle = listener.idle_timeout or math.inf
        self.staging = min(self.first_byte, stages[0]) if stages else self.first_byte
        shortest = min(self.first_byte, self.idle, *stages)
        self.interval = max(0.01, shortest / 4) if shortest < math.inf else None

    def started(self, conn: Timed) -> None:
        if self.interval is not None:  # no clock read, no float per connection when nothing times out
            conn.deadline = time.monotonic() + self.staging

    def restaged(self, conn: Timed, bound: float) -> None:
        """The next step of a stage begins, bounded by `bound`."""
        if self.interval is not None:
            conn.deadline = time.monotonic() + min(self.first_byte, bound)

    def staged(self, conn: Timed) -> None:
        """A stage is done: the first byte for the handler is due from now."""
        if self.interval is not None:
            conn.deadline = time.monotonic() + self.first_byte

    def expired(self, connections: Iterable[T]) -> Iterator[T]:
        now = time.monotonic()
        for conn in list(connections):
            if conn.deadline == MOVED:
                conn.deadline = now + self.idle
            elif now >= conn.deadline and not conn.delayed:
                yield conn

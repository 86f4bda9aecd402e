"""`handler: relay`: each client joined to its own upstream, bytes copied both ways as they come.

The policy lives here, once: socat's half-close (when one side ends its output, the other side's
output is ended after what is buffered, and copying goes on the other way until that side ends
too or is quiet for half_close_timeout), what counts as moved, how a failing upstream is counted,
and the UDP session table. Two drivers carry it out, each on its model's way of waiting:
`relay.selector` (non-blocking sockets on the selector models' loop) and `relay.aio` (asyncio
transports). Neither imports a model: each is given what it needs, a `Service` for timers and
accounting, and the selector driver a `Reactor`. Each is its client connection's transport (see
Relayed). Both look the upstream's name up through a
`Resolver`, off their loop.

A listener's stage (a PROXY header, a TLS handshake: lifecycle.Staging) reads the client before
the upstream is connected, judged as any connection's. Either side may speak TLS, through a
TLSLayer (sockd.tls.layer) each driver puts between that side's socket and the relay: on a `tls`
listener the client's handshake is the listener's stage (sockd.tls.stage); to a tls://
upstream (the handler's UpstreamTLS) the upstream's handshake is part of connecting it, and its
failure is the upstream's (handshake_failed). A side's end of output is then a close_notify.

With `upstream_proxy_protocol`, the upstream is sent a PROXY protocol header (sockd.proxy.writing)
before anything else, a tls:// upstream's ClientHello included, as HAProxy sends it: it names the
client, and over v2 the TLS the listener terminated (Relayed.proxy_header). It goes as soon as the
upstream is connected (a server that speaks first must have it), in the same write as what is
ready to follow it then: what the client said meanwhile, or to a tls:// upstream, under the
selector driver, the ClientHello. Each driver asks for it once per client, as it connects the
upstream; a relay without it asks nothing.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from sockd.config import BUFSIZE
from sockd.counters import REJECT_REASONS, SEND, UPSTREAM, Recorder
from sockd.handlers import Relay
from sockd.interfaces import Transport
from sockd.lifecycle import Address, Connection, ConnectionLog, Service
from sockd.limits import MOVED, RELAY_SESSIONS, Ticket, relayed_connections, source_of
from sockd.logging import Throttled
from sockd.proxy.writing import Named, addresses, ssl_tlvs, v1, v2
from sockd.tls.layer import Failure, TLSLayer
from sockd.tls.stage import judged

# What opening an upstream can fail with: refused, unreachable, timed out; ValueError for a host
# name IDNA cannot encode (config refuses most of them).
UPSTREAM_ERRORS = (OSError, ValueError)
# UDP relay sessions per worker (each holds a descriptor: fewer if the worker has fewer, see
# Sessions), and per client address within them: a host sending from many ports recycles its own
# sessions long before it could fill the table.
MAX_SESSIONS = 4096
MAX_SESSIONS_PER_SOURCE = 256
# A UDP session's datagrams that wait for the upstream's lookup; past them, dropped (and counted as
# replies not sent), as a full socket buffer would drop them.
WAITING_DATAGRAMS = 64
# What opening a session's socket fails with when the worker's (or the system's) descriptors are
# all taken: a session is closed to make room (see Sessions.socket_for).
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

# Where the upstream is, as socket() and connect() take it: (family, type, proto, address).
Endpoint = tuple[int, int, int, Any]
# What looking the upstream up gives: its endpoints, or why there are none.
Answer = list[Endpoint] | BaseException

_upstream_warning = Throttled("upstream failed")
_evicted_warning = Throttled("relay sessions full: closed the least recent to make room")


class Reactor(Protocol):
    """What the selector driver needs of its loop."""

    recorder: Recorder

    def register(self, sock: socket.socket, was: int, events: int, callback: Callable[[int], None]) -> int:
        """Wait for `events` on `sock` (none: forget it) where it waited for `was`; returns `events`."""

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` in the loop, asked from another thread (as asyncio's)."""


def endpoints(relay: Relay) -> list[Endpoint]:
    """The upstream's Unix path, or each address its host has (getaddrinfo() may wait on DNS for
    a name: see Resolver)."""
    if isinstance(relay.where, str):
        return [(socket.AF_UNIX, socket.SOCK_STREAM, 0, relay.where)]
    kind = socket.SOCK_DGRAM if relay.scheme == "udp" else socket.SOCK_STREAM
    found = socket.getaddrinfo(*relay.where, type=kind)
    return [(family, kind, proto, where) for family, kind, proto, _, where in found]


def look_up(relay: Relay) -> Answer:
    try:
        return endpoints(relay)
    except UPSTREAM_ERRORS as exc:
        return exc


def has_name(relay: Relay) -> bool:
    """Whether the upstream's host is a name to look up (a path or an IP address is its own answer)."""
    if isinstance(relay.where, str):
        return False
    try:
        ipaddress.ip_address(relay.where[0])
    except ValueError:
        return True
    return False


class Resolver:
    """The upstream's endpoints, looked up off the loop. getaddrinfo() waits on DNS, seconds for
    a slow server (a dead one's timeouts, more), and in the loop it would hold up every client
    the loop serves. So a name is looked up in a thread of its own, and the answer handed to the
    loop by `deliver` (its call_soon_threadsafe). One lookup at a time: every client that asks
    meanwhile waits for that same answer, so a flood of new clients costs one thread, not a
    queue of lookups. Nothing is cached: a client that asks after an answer starts a new lookup,
    so a name that moves is followed. A path or an IP address is answered at once, in the loop
    (getaddrinfo() waits for nothing then)."""

    def __init__(self, relay: Relay, deliver: Callable[..., object]) -> None:
        self.relay = relay
        self.deliver = deliver
        self.named = has_name(relay)
        self.waiting: dict[Callable[[Answer], None], None] = {}  # in the order they asked
        self.looking_up = False

    def ask(self, waiter: Callable[[Answer], None]) -> None:
        """Call `waiter` in the loop with the upstream's endpoints, or what the lookup raised:
        now for a path or an IP address, else once the lookup ends (unless forgotten first)."""
        if not self.named:
            waiter(look_up(self.relay))
            return
        if not self.looking_up:
            try:
                threading.Thread(target=self._look_up, name="sockd-resolve", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had (the process's limit): a failed lookup
                waiter(OSError(errno.EAGAIN, str(exc)))
                return
            self.looking_up = True
        self.waiting[waiter] = None

    def forget(self, waiter: Callable[[Answer], None]) -> None:
        """`waiter` has gone (its client closed): it is told nothing."""
        self.waiting.pop(waiter, None)

    def _look_up(self) -> None:
        """In the lookup's thread."""
        answer = look_up(self.relay)
        with contextlib.suppress(OSError, RuntimeError):  # the loop has ended meanwhile (asyncio's: closed)
            self.deliver(self._answered, answer)

    def _answered(self, answer: Answer) -> None:
        # One at a time, so that a waiter closed by another's (a session evicted for it) is
        # forgotten in time; one that asks meanwhile is answered too.
        while self.waiting:
            waiter = next(iter(self.waiting))
            del self.waiting[waiter]
            waiter(answer)
        self.looking_up = False


def upstream_socket(found: list[Endpoint]) -> socket.socket:
    """A non-blocking socket for the upstream, its connect() started (a datagram socket's is done
    at once). Each endpoint is tried until one does not fail at once, but a connect still in
    progress when it fails cannot move on to the next."""
    failure: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
    for family, kind, proto, where in found:
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


def upstream_failed(relay: Relay, recorder: Recorder, exc: BaseException | str) -> None:
    recorder.errors[UPSTREAM] += 1
    _upstream_warning(upstream=relay.upstream, error=exc if isinstance(exc, str) else reason(exc))


def reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a TimeoutError says nothing


def handshake_failed(failure: Failure) -> str:
    """Why a tls:// upstream's handshake failed, for the warning of upstream_failed."""
    return f"TLS handshake failed: {judged(failure, 'upstream')[1]}"


class Relayed:
    """One relayed client, as both drivers see it: what it moved, how many of its two sides
    have ended their output, and the rule that closes it. It has a lifecycle Connection (its
    ticket, counts, timeout and drain), whose transport is the driver: closing that closes both
    sides once each has written what it holds, aborting it resets both, and its socket is the
    client's.

    It is one request, counted when it ends and timed from its start to its end: a relay cannot
    tell where one of the client's requests ends, only the bytes it moves (counted as they come).

    On a listener with a stage (a PROXY header, TLS), the client passes it before the upstream
    is connected: a client the stage refuses never reaches the upstream, and is no request."""

    __slots__ = ("connection", "ended", "moved", "relay", "started")

    def __init__(self, connection: Connection, relay: Relay) -> None:
        self.connection = connection
        self.relay = relay
        # Answered once its stage is done, if it has one: a stop may end its input from then on
        # (the end is passed on as a half-close), but not in the middle of a header or handshake.
        connection.answered = connection.service.stage is None
        self.ended = 0  # sides that have ended their output
        self.moved = 0  # bytes copied either way (see _close_if_quiet)
        self.started = 0.0

    def opened(self) -> None:
        self.started = self.connection.recorder.clock()
        self.connection.opened()

    def staged(self) -> None:
        """The listener's stage let the client in: the relay's turn."""
        connection = self.connection
        connection.service.timeouts.staged(connection)
        connection.first_answer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.connection.answered:  # its stage let it in: a request (its bytes are counted as they move)
            self.connection.recorder.request(0, 0, self.started)
        self.connection.connection_lost(exc)

    def carried(self, size: int, from_client: bool) -> None:
        connection = self.connection
        connection.deadline = MOVED
        self.moved += size
        if from_client:
            connection.recorder.received += size
        else:
            connection.recorder.sent += size

    def side_ended(self, client: bool) -> None:
        """One side (the client's, or the upstream's) ended its output (its end was passed on to
        the other side)."""
        self.ended += 1
        if self.ended == 2:
            self.connection.transport.close()
        else:
            self._close_if_quiet(-1)

    def _close_if_quiet(self, moved: int) -> None:
        """Half-closed: as socat's -t, give up on the other side once it has been quiet for
        half_close_timeout (a long transfer the other way is not cut short)."""
        if self.moved == moved:
            self.connection.transport.close()
        else:
            self.connection.service.later(self.relay.half_close_timeout, self._close_if_quiet, self.moved)

    def upstream_failed(self, exc: BaseException | str) -> None:
        upstream_failed(self.relay, self.connection.recorder, exc)

    def proxy_header(self, client: Named | None, layer: TLSLayer | None) -> bytes:
        """The PROXY header for the upstream: the client and the address it reached, as the
        PROXY header in front named them if the listener read one, else as the client's socket
        `client` names them; and over v2 its TLS, if the listener's stage terminated it
        (`layer`: the version, the verified certificate the stage read, the ALPN protocol)."""
        proxied = self.connection.proxied
        if proxied is None:
            source, destination = addresses(client)
        else:
            source, destination = proxied.source, proxied.destination
        if self.relay.proxy_protocol == "v1":
            return v1(source, destination)
        if layer is None:
            return v2(source, destination)
        tls, peer = layer.tls, layer.peer
        said = ssl_tlvs(
            tls.version() or "",
            verified=peer is not None,
            reused=tls.session_reused,
            cn=None if peer is None else peer.cn,
            alpn=tls.selected_alpn_protocol(),
        )
        return v2(source, destination, said)


class LoggedRelay:
    """What a logged listener's relay driver reports to, instead of its Relayed: it counts for
    the connection's log line (see lifecycle.ConnectionLog), then passes the report on. As the
    metrics count them, its bytes in are what the client sent, its bytes out what came back for
    it, and it is one request."""

    __slots__ = ("log", "relayed")

    def __init__(self, relayed: Relayed, log: ConnectionLog) -> None:
        self.relayed = relayed
        self.log = log

    def opened(self) -> None:
        self.relayed.opened()

    def carried(self, size: int, from_client: bool) -> None:
        if from_client:
            self.log.bytes_in += size
        else:
            self.log.bytes_out += size
        self.relayed.carried(size, from_client)

    def side_ended(self, client: bool) -> None:
        self.log.ended_by("client closed" if client else "upstream closed")
        self.relayed.side_ended(client)

    def upstream_failed(self, exc: BaseException | str) -> None:
        self.log.ended_by("upstream failed")
        self.relayed.upstream_failed(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.log.requests = int(self.relayed.connection.answered)  # see Relayed.connection_lost
        self.relayed.connection_lost(exc)


def relayed(
    service: Service, ticket: Ticket, recorder: Recorder, relay: Relay, driver: Transport
) -> tuple[Relayed, Relayed | LoggedRelay]:
    """A new relayed client whose driver is `driver`: its Relayed, and what the driver reports
    its events to (the same, or on a logged listener, the LoggedRelay that counts for it)."""
    connection = Connection(service, ticket, recorder)
    connection.transport = driver
    state = Relayed(connection, relay)
    if not service.logged:
        return state, state
    # Every way a relay ends names its cause first, or is a client's reset; a close without
    # either could only come from the upstream's side.
    connection.observer = log = ConnectionLog("upstream closed")
    return state, LoggedRelay(state, log)


class Session(Protocol):
    last_seen: float
    asked: float  # the recorder's clock when the client's latest datagram came

    def close(self) -> None: ...


S = TypeVar("S", bound=Session)


class DatagramDriver(Protocol):
    """What a UDP relay's driver does on its model's loop."""

    def watch(self, sock: socket.socket, readable: Callable[[], None]) -> None:
        """Call `readable()` whenever `sock` is, until unwatch."""

    def unwatch(self, sock: socket.socket) -> None: ...

    def reply(self, data: bytes, client: Address) -> None:
        """Send `data` to `client` from the listening socket."""


class DatagramRelay:
    """A UDP relay, as both drivers see it: each client's datagrams go out on its session's own
    socket, and what comes back on that socket goes to the client through the listening socket.
    Its `driver` watches the sockets and sends the replies, on its model's loop."""

    def __init__(self, names: Resolver, service: Service, recorder: Recorder, driver: DatagramDriver) -> None:
        self.names = names
        self.relay = names.relay
        self.recorder = recorder
        self.driver = driver
        self.sessions: Sessions[DatagramSession] = Sessions(self.relay, service, recorder, time.monotonic)

    def datagram_received(self, data: bytes, client: Address) -> None:
        if not self.sessions.admits(client):
            return
        session = self.sessions.open(client, lambda: DatagramSession(self, client))
        self.recorder.received += len(data)
        session.send(data)

    def failed(self, exc: BaseException) -> None:
        upstream_failed(self.relay, self.recorder, exc)

    def close(self) -> None:
        self.sessions.close()


class DatagramSession:
    """One UDP client's session: its own upstream socket, opened once the upstream is looked up
    (until then its datagrams wait, at most WAITING_DATAGRAMS)."""

    __slots__ = ("asked", "client", "last_seen", "relaying", "sock", "waiting")

    def __init__(self, relaying: DatagramRelay, client: Address) -> None:
        self.relaying = relaying
        self.client = client
        self.sock: socket.socket | None = None
        self.waiting: list[bytes] = []
        self.last_seen = 0.0  # set by Sessions, as `asked`
        self.asked = 0.0

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            try:
                self.sock.send(data)
            except OSError as exc:  # e.g. the upstream port said unreachable to an earlier one
                self.relaying.failed(exc)
            return
        if len(self.waiting) >= WAITING_DATAGRAMS:
            self.relaying.recorder.errors[SEND] += 1
            return
        self.waiting.append(data)
        if len(self.waiting) == 1:  # the session's first: the upstream is looked up for it
            self.relaying.names.ask(self._found)

    def _found(self, answer: Answer) -> None:
        relaying = self.relaying
        try:
            if isinstance(answer, BaseException):
                raise answer
            self.sock = relaying.sessions.socket_for(self.client, lambda: upstream_socket(answer))
        except UPSTREAM_ERRORS as exc:
            relaying.failed(exc)
            relaying.sessions.forget(self.client, self)
            return
        relaying.driver.watch(self.sock, self._replied)
        waiting, self.waiting = self.waiting, []
        for data in waiting:
            self.send(data)

    def _replied(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:  # e.g. the upstream's ICMP port unreachable for an earlier one
            self.relaying.failed(exc)
            return
        self.relaying.sessions.replied(self.client, len(data))
        self.relaying.driver.reply(data, self.client)

    def close(self) -> None:
        if self.sock is None:
            self.relaying.names.forget(self._found)
            return
        self.relaying.driver.unwatch(self.sock)
        self.sock.close()


class Sessions(Generic[S]):
    """A UDP relay's sessions, one per client address (each with its own upstream socket, so
    replies find their way back), least recently seen first: a datagram either way moves its
    session to the end (an OrderedDict's move and its popping of the first are O(1), where a dict
    leaves a hole at the front for each). A session is forgotten after session_timeout without a
    datagram. A new client past MAX_SESSIONS_PER_SOURCE sessions from its address closes that
    address's least recent; past `capacity`, the table's least recent: a new client is always
    served, so a flood cannot lock others out, and a session it closes is counted and warned of.
    `capacity` is MAX_SESSIONS, or what the worker's descriptors allow if that is less (see
    limits.relayed_connections); and should the descriptors run out all the same (some taken by
    others, or the system's), a new session's socket closes the least recent too (socket_for).

    Each reply passed back to a client is a request, timed from the client's latest datagram (as
    a datagram answered is for the other handlers): a session ends only session_timeout after its
    last word, so its life would time nothing.

    It holds its OrderedDict rather than being one: mypyc (mypyc/mypyc#1186) lays a compiled
    subclass of a dict's subclass out at a plain dict's size, and OrderedDict writes past it."""

    def __init__(self, relay: Relay, service: Service, recorder: Recorder, clock: Callable[[], float]) -> None:
        self.table: OrderedDict[Address, S] = OrderedDict()
        self.relay = relay
        self.service = service
        self.recorder = recorder
        self.clock = clock
        self.by_source: dict[str, set[Address]] = {}
        self.capacity = int(min(MAX_SESSIONS, relayed_connections(1)))
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
        and nothing is closed for it). Its socket is the driver's to open, by socket_for."""
        session = self.table.get(client)
        if session is None:
            session = make()
            self._make_room(client)
            self.by_source.setdefault(source_of(client), set()).add(client)
            self.table[client] = session
        else:
            self.table.move_to_end(client)
        session.last_seen = self.clock()
        session.asked = self.recorder.clock()
        return session

    def socket_for(self, client: Address, make: Callable[[], socket.socket]) -> socket.socket:
        """`make()`'s socket for the session of `client`. Out of descriptors, the least recent
        other session is closed for it, and `make` tried once more; what it raises then (or
        anything else the first time) is passed on."""
        try:
            return make()
        except OSError as exc:
            victim = next((other for other in self.table if other != client), None)
            if exc.errno not in OUT_OF_DESCRIPTORS or victim is None:
                raise
            self._evict(victim, client)
            return make()

    def replied(self, client: Address, size: int) -> None:
        """A reply of `size` bytes came back for `client`: a request answered, and its session
        the most recent."""
        session = self.table.get(client)
        if session is None:
            self.recorder.sent += size
            return
        self.table.move_to_end(client)
        session.last_seen = self.clock()
        self.recorder.request(0, size, session.asked)

    def forget(self, client: Address, session: S) -> None:
        """Drop `session` of `client`, if it is still there (its upstream could not be opened)."""
        if self.table.get(client) is session:
            del self.table[client]
            self._disown(client)

    def _make_room(self, client: Address) -> None:
        own = self.by_source.get(source_of(client), ())
        if len(own) >= MAX_SESSIONS_PER_SOURCE:
            # A scan of the source's own sessions, paid only by an address at its cap.
            self._evict(min(own, key=lambda other: self.table[other].last_seen), client)
        elif len(self.table) >= self.capacity:
            self._evict(next(iter(self.table)), client)

    def _evict(self, victim: Address, client: Address) -> None:
        self._close(victim)
        self.recorder.rejected[RELAY_SESSIONS] += 1
        _evicted_warning(reason=REJECT_REASONS[RELAY_SESSIONS], source=source_of(client), sessions=len(self.table))

    def _close(self, client: Address) -> None:
        self.table.pop(client).close()
        self._disown(client)

    def _disown(self, client: Address) -> None:
        source = source_of(client)
        own = self.by_source[source]
        own.discard(client)
        if not own:
            del self.by_source[source]

    def _forget_idle(self) -> None:
        idle_since = self.clock() - self.relay.session_timeout
        idle = list(itertools.takewhile(lambda client: self.table[client].last_seen <= idle_since, self.table))
        for client in idle:
            self._close(client)
        self.service.later(self.relay.session_timeout / 4, self._forget_idle)

    def close(self) -> None:
        for session in self.table.values():
            session.close()
        self.table.clear()
        self.by_source.clear()

"""The life of a connection and of a datagram, written once for every concurrency model.

A model only waits and moves bytes; what happens to a connection is decided here, the same way
whatever the model. Events come in as method calls named as asyncio's protocols name them
(`data_received`, `eof_received`, `connection_lost`); actions go out as calls on the connection's
`transport`, which offers the part of asyncio's Transport the lifecycle uses (`write`, `close`,
`abort`, `pause_reading`, `resume_reading`, `is_closing`), on `end_input` (a stop's drain) and on the service's
`later` (a timer, for `delay`). The asyncio model hands the lifecycle uvloop's own transport, so
a request there costs no call more than a bare protocol's; the other models give it a small
transport of their own. Nothing here touches a socket, so the whole life can be driven
in-process (tests/test_lifecycle.py).

The life of a stream connection:

    accepted ── admission ──> refused: counted with its reason; the model closes the socket
                   │
                   └─ ticket ──> opened ──> greeting? ── write it, close
                                   │
                                   └─> data ─> reply (now, or `delay` later) ─> ... ─┐
                                        replies due hold HIGH_WATER ─> pause          │
                                               reading until they fall below          │
                                        EOF ─> the handler's last word, once the     │
                                               replies still due are written ─> close ┤
                                        too large ─> abort; timed out ─> abort        │
                                        stop ─> end_input once it has had an answer ──┘
                                                        connection_lost: counted, ticket released

Later stages (a PROXY header, a TLS handshake) slot in between `opened` and the handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import structlog

from sockd.config import Listener
from sockd.counters import RESET, SEND, TIMEOUT, TOO_LARGE, Recorder
from sockd.handlers import Handler, TooLarge
from sockd.limits import MOVED, REFLECTION, Admission, Ticket, Timeouts, Unlimited, admission_for
from sockd.logging import Throttled

log = structlog.get_logger()

# Stop reading from a peer once this many bytes wait to go to it (or, through a relay, to its
# counterpart), until they go: a client that sends but never reads gets back-pressure, not a server
# that grows without bound.
HIGH_WATER = 1 << 20
# What a reply waiting for its `delay` holds beyond its bytes: its timer, the timer's handle and
# its arguments (about 600 B on uvloop, 300 B on asyncio's loop, measured with tracemalloc). Counted
# so that many tiny replies are bounded as surely as a few large ones.
DUE_COST = 512
# A worker's datagram replies waiting for their `delay` hold at most this much (bytes and
# DUE_COST each); past it a datagram is answered by no reply, counted as one not sent. A datagram
# listener has no connection to pause: its flood is bounded by dropping, as the network would.
DATAGRAMS_HELD = 16 << 20

_datagrams_held = Throttled("too many delayed datagram replies held; dropping replies")

# Source ports a UDP listener never answers (nor relays from), besides the daemon's own UDP
# listeners': 0, where no reply can go, and echo, daytime, chargen and time, which answer whatever
# comes. Answering one of them, or one of our own services, could set two servers answering each
# other forever from a single forged datagram (CVE-1999-0103). By port alone, whatever the host,
# as FreeBSD's inetd does for its internal services: one lookup per datagram.
REFLECTORS = frozenset({0, 7, 13, 19, 37})

_reflected = Throttled("rejected")

# Where a datagram came from, as recvfrom() says: (host, port[, ...]) or a Unix path.
Address = tuple[Any, ...] | str


class Transport(Protocol):
    """What the lifecycle asks of a connection's I/O: a subset of asyncio.Transport."""

    def write(self, data: bytes) -> None:
        """Send `data`, keeping what the peer cannot take yet."""

    def close(self) -> None:
        """Close once everything written has been sent."""

    def abort(self) -> None:
        """Close now, dropping what is not sent yet."""

    def pause_reading(self) -> None:
        """Read no more, until resume_reading (the lifecycle never resumes a closing connection)."""

    def resume_reading(self) -> None:
        """Read again."""

    def is_closing(self) -> bool: ...


class Service:
    """What every connection of one listener in one worker shares: the handler, the delay, the
    admission rules, the timeouts, the connections open, and whether the worker is stopping.

    `later(delay, callback, *args)` is the model's timer (a loop's call_later, or a sleep for
    the blocking models); `forget(connection)` is told of every connection that ends, after
    it is counted, so an event-loop model can learn when its drain is over. `udp_ports` are the
    ports of the daemon's UDP listeners (see REFLECTORS)."""

    def __init__(
        self, listener: Listener, handler: Handler, later: Callable[..., object], udp_ports: frozenset[int]
    ) -> None:
        self.handler = handler
        self.delay = listener.delay
        self.admission: Admission | Unlimited = admission_for(listener)
        # A listener without limits or access rules asks nothing per connection or datagram.
        self.screening = not isinstance(self.admission, Unlimited)
        self.timeouts = Timeouts(listener)
        self.open: set[Connection] = set()
        self.stopping = False
        self.later = later
        # The source ports whose datagrams are dropped (only UDP has datagrams). A worker that a
        # reload kept goes on with the ports it was started with: a listener new since knows
        # every current port, this one's included, so it drops what this one says to it, and the
        # exchange ends at its first datagram.
        self.reflecting = REFLECTORS | udp_ports

    def reflected(self, address: Address, recorder: Recorder) -> None:
        """A datagram from one of the `reflecting` ports was dropped: count it, and say so."""
        recorder.rejected[REFLECTION] += 1
        _reflected(reason="reflection", source=str(address[0]), port=address[1])

    def stop(self) -> None:
        """The worker stops: every connection that has had an answer has its input ended now
        (the client sees EOF once its pending requests are answered); one that has not is
        answered first, as its request may still be on its way, and ended then. Safe from a
        signal handler: no lock is taken."""
        self.stopping = True
        for connection in list(self.open):
            if connection.answered:
                connection.end_input()

    def sweep(self) -> None:
        """End the connections past first_byte_timeout or idle_timeout (see Timeouts)."""
        for connection in self.timeouts.expired(self.open):
            connection.timed_out()

    def forget(self, connection: Connection) -> None:
        self.open.discard(connection)


class Connection:
    """What every connection's life has, whatever it carries: its place under the limits (a
    ticket, released once it ends), its counts, its timeout, and the stop's drain rule.

    Subclasses define `end_input` (and `peer`, to be logged), and set `transport` before
    `opened` (a relay, which has two, defines `abort` instead)."""

    __slots__ = ("answered", "deadline", "delayed", "recorder", "service", "ticket", "transport")

    transport: Transport

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder) -> None:
        self.service = service
        self.ticket = ticket
        self.recorder = recorder
        self.answered = False  # see Service.stop
        # What the replies due later hold (see DUE_COST), nonzero while any is due: a timeout
        # waits for the server, not the client; at HIGH_WATER reading pauses.
        self.delayed = 0
        self.deadline = MOVED  # see Timeouts

    def end_input(self) -> None:
        """Shut the connection's input (SHUT_RD): the model sees EOF once what was sent is read."""
        raise NotImplementedError

    def peer(self) -> dict[str, object]:
        """Who the client is, for its log line (see LoggedStream)."""
        raise NotImplementedError

    def opened(self) -> None:
        self.recorder.connections += 1
        self.service.timeouts.started(self)
        self.service.open.add(self)

    def first_answer(self) -> None:
        self.answered = True
        if self.service.stopping:  # the drain passed it by while it had no answer yet
            self.end_input()

    def timed_out(self) -> None:
        self.recorder.errors[TIMEOUT] += 1
        self.abort()

    def abort(self) -> None:
        """End the connection now (a relay: both its sides)."""
        self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is closed, by either side; `exc` if it failed (a reset, counted)."""
        self.ticket.release()
        self.recorder.closed += 1
        if exc is not None:
            self.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
        self.service.forget(self)


class Stream(Connection):
    """A connection served by a sans-IO handler session (see sockd.handlers)."""

    __slots__ = ("session",)

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder) -> None:
        super().__init__(service, ticket, recorder)
        self.session = service.handler.session()

    def opened(self) -> None:
        super().opened()
        greeting = self.session.greeting()
        if greeting is not None:  # it says all it has at connect, then closes
            self._reply(greeting, True, 0, self.recorder.clock())

    def data_received(self, data: bytes) -> None:
        started = self.recorder.clock()
        self.deadline = MOVED
        session = self.session
        try:
            reply = session.feed(data)
        except TooLarge:
            self.too_large()
            return
        closing = session.closing
        if closing:
            self.transport.pause_reading()
        if self.service.delay:
            self.delayed += len(reply) + DUE_COST
            if self.delayed >= HIGH_WATER:  # a client sending faster than its replies leave
                self.transport.pause_reading()
            self.service.later(self.service.delay, self._delayed_reply, reply, closing, len(data), started)
            return
        # The path of every request on a busy connection, written out: one call to the handler
        # and one to count it, as a bare server has.
        if reply:
            self.transport.write(reply)
        self.recorder.request(len(data), len(reply), started)
        if closing or not self.answered:
            self._replied(closing)

    def too_large(self) -> None:
        """A request over max_message_size: the connection ends."""
        self.recorder.errors[TOO_LARGE] += 1
        self.abort()

    def _delayed_reply(self, reply: bytes, closing: bool, received: int, started: float) -> None:
        held = self.delayed
        self.delayed = held - len(reply) - DUE_COST
        if self.transport.is_closing():  # the client reset meanwhile: nobody to answer
            return
        self._reply(reply, closing, received, started)
        if held >= HIGH_WATER > self.delayed:
            self.read_again()

    def read_again(self) -> None:
        """Resume reading after a pause, unless a reason for one remains: the session closing (or
        closed), or the replies due later still holding HIGH_WATER. A model whose transport
        cannot tell a full write buffer by itself adds that reason (see models/aio.py)."""
        if not (self.session.closing or self.delayed >= HIGH_WATER or self.transport.is_closing()):
            self.transport.resume_reading()

    def _reply(self, reply: bytes, closing: bool, received: int, started: float) -> None:
        """A greeting, or a reply that waited for `delay`."""
        if reply:
            self.transport.write(reply)
        self.recorder.request(received, len(reply), started)
        self._replied(closing)

    def _replied(self, closing: bool) -> None:
        """After a reply: the first marks the connection answered (see Service.stop); a closing
        one closes it."""
        if not self.answered:
            self.first_answer()
        if closing:
            self.transport.close()

    def eof_received(self) -> bool:
        """The client ended its output: the handler's last word follows the replies still due,
        then the connection closes. True: asyncio must not close it before."""
        tail = self.session.eof()
        if self.delayed:  # it waits `delay` too, so the replies due go out first, in order
            self.delayed += len(tail) + DUE_COST
            self.service.later(self.service.delay, self._delayed_finish, tail)
        else:
            self._finish(tail)
        return True

    def _delayed_finish(self, tail: bytes) -> None:
        self.delayed -= len(tail) + DUE_COST
        if not self.transport.is_closing():
            self._finish(tail)

    def _finish(self, tail: bytes) -> None:
        if tail:
            self.transport.write(tail)
        self.transport.close()


class Logged(Connection):
    """A connection that says, in one info line as it ends, who it served, for how long, what it
    moved and how it ended (`log_connections`, as xinetd's log_on_success). A
    model serves its connections with `logged(listener, its class, ...)`: the counting is in the
    subclasses here (LoggedStream) and in relay.LoggedRelay only, so a listener without it pays
    not one instruction per request or chunk for it.

    `peer()` is read as the connection opens: the client's `source` and `port` (or a Unix peer's
    credentials), from its socket. A subclass counts `bytes_in`, `bytes_out` and `requests`, and
    says how the connection ends through `ended_by`."""

    # No __slots__: a dict per connection, only where connections are logged (a layout of slots
    # of its own could not be mixed with the models' classes, which have theirs).

    unprompted: str  # what `ended` says when no cause was given to ended_by and no reset came
    began: float
    bytes_in: int
    bytes_out: int
    requests: int
    ending: str | None
    who: dict[str, object]

    def opened(self) -> None:
        self.began = time.monotonic()
        self.bytes_in = self.bytes_out = self.requests = 0
        self.ending = None
        self.who = self.peer()
        super().opened()

    def timed_out(self) -> None:
        self.ended_by("timeout")
        super().timed_out()

    def end_input(self) -> None:
        self.ended_by("drained")
        super().end_input()

    def ended_by(self, how: str) -> None:
        """The first cause is the one said: a drained client's EOF follows its drain."""
        if self.ending is None:
            self.ending = how

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        log.info(
            "connection closed",
            **self.who,
            duration=round(time.monotonic() - self.began, 6),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            requests=self.requests,
            ended=self.ending or ("reset" if exc is not None else self.unprompted),
        )


class LoggedStream(Logged, Stream):
    """A Stream logged as it ends (see Logged): its requests are the chunks answered, and a
    greeting."""

    # Neither the client nor a limit: the handler had said all it had (daytime, timestamp).
    unprompted = "server closed"

    def opened(self) -> None:
        self.transport = Counted(self.transport, self)
        super().opened()
        if self.bytes_out:  # a greeting: the handler spoke first, which counts as a request
            self.requests += 1

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.requests += 1
        super().data_received(data)

    def eof_received(self) -> bool:
        self.ended_by("client closed")
        return super().eof_received()

    def too_large(self) -> None:
        self.requests -= 1  # it was not answered
        self.ended_by("too large")
        super().too_large()


C = TypeVar("C", bound=Connection)


def logged(listener: Listener, cls: type[C], how: type[Logged] = LoggedStream) -> type[C]:
    """The class of `listener`'s connections: `cls` (a model's Stream class, or a relay driver's
    connection class with `how` relay.LoggedRelay; it defines `peer`), with its connections
    logged as they end (see Logged) if the listener asks for it (`log_connections`)."""
    if not listener.log_connections:
        return cls
    made: type[C] = type(f"Logged{cls.__name__}", (how, cls), {})
    return made


class Counted:
    """A logged connection's transport: counts what is written, and is its transport otherwise."""

    __slots__ = ("connection", "transport")

    def __init__(self, transport: Transport, connection: LoggedStream) -> None:
        self.transport = transport
        self.connection = connection

    def write(self, data: bytes) -> None:
        self.connection.bytes_out += len(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class Datagrams:
    """The life of a datagram: dropped if it comes from a port of REFLECTORS or of the daemon's
    UDP listeners, else admitted by its source, answered by the handler (now, or `delay`
    later), counted once its reply is sent. Subclasses define `send`.

    `pending` is what the replies due later hold (see DUE_COST), nonzero while any is due: a
    stopping model waits for them; at DATAGRAMS_HELD, replies are dropped."""

    def __init__(self, service: Service, recorder: Recorder) -> None:
        self.service = service
        self.recorder = recorder
        self.pending = 0
        self.screened = service.screening
        self.reflecting = service.reflecting

    def send(self, reply: bytes, address: Address) -> bool:
        """Send one reply; False if it could not be sent (counted by `send_failed`)."""
        raise NotImplementedError

    def send_failed(self, exc: BaseException) -> None:
        """A reply the kernel would not send, or an ICMP error for an earlier one."""
        self.recorder.errors[SEND] += 1
        log.debug("datagram reply failed", error=str(exc))

    def datagram_received(self, data: bytes, address: Address) -> None:
        service, recorder = self.service, self.recorder
        if address[1] in self.reflecting:
            service.reflected(address, recorder)
            return
        if self.screened and not service.admission.allows_datagram(address, recorder):
            return
        started = recorder.clock()
        try:
            reply = service.handler.datagram(data)
        except TooLarge:
            recorder.errors[TOO_LARGE] += 1
            return
        if reply is None:
            return
        if service.delay:
            held = len(reply) + DUE_COST
            if self.pending + held > DATAGRAMS_HELD:
                recorder.errors[SEND] += 1
                _datagrams_held(limit=DATAGRAMS_HELD)
                return
            self.pending += held
            service.later(service.delay, self._delayed_reply, reply, address, len(data), started)
        elif self.send(reply, address):
            recorder.request(len(data), len(reply), started)

    def _delayed_reply(self, reply: bytes, address: Address, received: int, started: float) -> None:
        self.pending -= len(reply) + DUE_COST
        if self.send(reply, address):
            self.recorder.request(received, len(reply), started)

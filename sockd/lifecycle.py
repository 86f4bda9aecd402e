"""The life of a connection and of a datagram, written once for every concurrency model.

A model only waits and moves bytes; what happens to a connection is decided here, the same way
whatever the model. A connection *has* a transport (sockd.transports) and is driven by it as an
asyncio protocol is: `connection_made(transport)`, `data_received`, `eof_received`,
`pause_writing`/`resume_writing`, `connection_lost`. Its actions go out as calls on that
transport (`write`, `close`, `abort`, `pause_reading`, `resume_reading`), on its socket (the
stop's `end_input`) and on the service's `later` (a timer, for `delay`). The asyncio model hands
a connection to the loop as its protocol, and it gets the loop's own transport: a request there
costs no call more than a bare protocol's. The other models give it a transport of
sockd.transports. Nothing here touches a socket itself (what needs one, `end_input` and the
peer's name, is sockd.transports'), so the whole life can be driven in-process
(tests/test_lifecycle.py).

The life of a stream connection:

    accepted ── admission ──> refused: counted with its reason; the model closes the socket
                   │
                   └─ ticket ──> connection_made ──> opened ──> stage? ──────────────────┐
                                                     a listener's stage (a PROXY header, │
                                                     a TLS handshake) reads the input    │
                                                     first, then hands the transport     │
                                                     back to the connection: `staged`    │
                                   ┌─────────────────────────────────────────────────────┘
                                   ├─> greeting? ── write it, close
                                   │
                                   └─> data ─> reply (now, or `delay` later) ─> ... ─┐
                                        replies due hold HIGH_WATER ─> pause          │
                                               reading until they fall below          │
                                        EOF ─> the handler's last word, once the     │
                                               replies still due are written ─> close ┤
                                        too large ─> abort; timed out ─> abort        │
                                        stop ─> end_input once it has had an answer ──┘
                                                        connection_lost: counted, ticket released

A flowing session (chargen) is not asked: from `begin`, its output is written turn by turn
(`flow`) until the transport says it can take no more (`pause_writing`), and again from
`resume_writing`; so a client that does not read holds what one full write buffer holds, and no
more. A turn is bounded (FLOW_TURN): one that the transport never stops (a client reading as fast
as it is written to) goes on from the model's `later`, after its other work. On a blocking
model a write returns once the client has taken it, so a client that does not read holds the
thread in its send (until idle_timeout), and the next turn is the thread's next call, after it
has looked at the connection's input (see models.blocking).

A relay's connection (sockd.relay) passes through the same stage, given the same way, before its
upstream is connected: a client the stage refuses never reaches the upstream. So does an exec's
(sockd.exec), before its child is started.

A listener's stages run one after another on the same transport (`chain`): a PROXY header
(sockd.proxy.stage) precedes the TLS ClientHello (sockd.tls.stage), so the header's stage hands
what came after it to the handshake's. Each step has its own time (Timeouts.restaged). The
client a header names is kept on its connection (`proxied`), for whatever later needs the
client's address rather than the balancer's.

Reading is paused for reasons, each a bit of `Connection.paused` (see PAUSES), and resumed once
none remains: the transports of every model, and the asyncio relay for its client, pause and
resume a connection through `pause` and `resume` (`pause_writing` and `resume_writing` for a
full write buffer).

What a connection is seen doing (`log_connections`; a TLS handshake's outcome, a verified
peer, the client a PROXY header names) goes to its `observer`, a ConnectionLog, which only a
logged listener's connections have: they are made with a LoggedStream between their transport
and themselves, which counts what passes, so a listener without it runs not one instruction
per request for it (as trio runs no hook that no instrument asked for).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import structlog

from sockd.config import Listener
from sockd.counters import RESET, SEND, TIMEOUT, TOO_LARGE, Recorder
from sockd.handlers import Handler, TooLarge
from sockd.interfaces import Receiver, StreamTransport, Transport
from sockd.limits import MOVED, REFLECTION, Admission, Ticket, Timeouts, Unlimited, admission_for
from sockd.logging import Throttled
from sockd.transports import HIGH_WATER, admitted, end_input, peer

if TYPE_CHECKING:
    from sockd.proxy.reading import Header

log = structlog.get_logger()

# What a reply waiting for its `delay` holds beyond its bytes: its timer, the timer's handle and
# its arguments (about 600 B on uvloop, 300 B on asyncio's loop, measured with tracemalloc). Counted
# so that many tiny replies are bounded as surely as a few large ones.
DUE_COST: Final = 512
# A worker's datagram replies waiting for their `delay` hold at most this much (bytes and
# DUE_COST each); past it a datagram is answered by no reply, counted as one not sent. A datagram
# listener has no connection to pause: its flood is bounded by dropping, as the network would.
DATAGRAMS_HELD: Final = 16 << 20

_datagrams_held = Throttled("too many delayed datagram replies held; dropping replies")

# Source ports a UDP listener never answers (nor relays from), besides the daemon's own UDP
# listeners': 0, where no reply can go, and echo, daytime, chargen and time, which answer whatever
# comes. Answering one of them, or one of our own services, could set two servers answering each
# other forever from a single forged datagram (CVE-1999-0103). By port alone, whatever the host,
# as FreeBSD's inetd does for its internal services: one lookup per datagram.
REFLECTORS = frozenset({0, 7, 13, 19, 37})

_reflected = Throttled("rejected")

# How many of a flowing session's outputs one turn of Stream.flow writes before the model's other
# connections have their turn.
FLOW_TURN: Final = 16

# The reasons a connection's reading is paused (PAUSES: one bit each of Connection.paused). The
# constants on the data path are Final: compiled, each is a constant in the code, not a lookup in
# the module's dict.
WRITE_FULL: Final = 1  # what it writes to cannot take more (asyncio's pause_writing, a transport's HIGH_WATER)
REPLIES_DUE: Final = 2  # its replies waiting for `delay` hold HIGH_WATER
CLOSING: Final = 4  # its session has said its last word
INPUT_ENDED: Final = 8  # its peer ended its output (EOF): there is nothing more to read
CONNECTING: Final = 16  # a relay's upstream has not answered yet
PAUSES: Final = WRITE_FULL | REPLIES_DUE | CLOSING | INPUT_ENDED | CONNECTING

# Where a datagram came from, as recvfrom() says: (host, port[, ...]) or a Unix path.
Address = tuple[Any, ...] | str
# What a stage calls once it is done with a connection (see Stream.staged): with what came after
# what it took, and the layer that stays between the transport and the connection (TLS's), if any.
Staged = Callable[[bytes, StreamTransport | None], None]


class Staging(Protocol):
    """A stage's maker (see Service.stage): given the connection, what its transport drives (a
    Stream, its LoggedStream, or a relay's driver), that transport, and what to call once done,
    it returns what the transport is to drive until the stage is done. A stage that refuses the
    connection closes it instead. `bounds`: how long a connection may take over each of its
    steps, in order (one, but for a chain's)."""

    @property
    def bounds(self) -> tuple[float, ...]: ...

    def __call__(
        self, connection: Connection, entry: Receiver, transport: StreamTransport, staged: Staged
    ) -> Receiver: ...


class Chain:
    """Two stages on one transport, one after the other: `then` is made once `first` is done,
    the transport drives it, and it is fed what came after what `first` took. `first` leaves no
    layer: one that stays between the transport and the connection (TLS's) comes last."""

    __slots__ = ("bounds", "first", "then")

    def __init__(self, first: Staging, then: Staging) -> None:
        self.first = first
        self.then = then
        self.bounds = first.bounds + then.bounds

    def __call__(self, connection: Connection, entry: Receiver, transport: StreamTransport, staged: Staged) -> Receiver:
        then = self.then

        def first_done(rest: bytes, layer: StreamTransport | None) -> None:
            assert layer is None, "a stage that leaves a layer must come last"
            receiver = then(connection, entry, transport, staged)
            transport.set_protocol(receiver)
            connection.service.timeouts.restaged(connection, then.bounds[0])
            if rest and not transport.is_closing():
                receiver.data_received(rest)

        return self.first(connection, entry, transport, first_done)


def chain(*stages: Staging | None) -> Staging | None:
    """The stages given (None: not this listener's), one after another; None if there is none."""
    present = [stage for stage in stages if stage is not None]
    if not present:
        return None
    chained = present[-1]
    for stage in reversed(present[:-1]):
        chained = Chain(stage, chained)
    return chained


class Service:
    """What every connection of one listener in one worker shares: the handler, the delay, the
    admission rules, the timeouts, the connections open, and whether the worker is draining them.

    The model says what it does with its connections through callables, not by subclassing:
    `later(delay, callback, *args)` is its timer (a loop's call_later, or a sleep for the
    blocking models, whose thread makes a call of no delay once back in its loop: see
    models.blocking); `made(connection)`, if given, is asked whether a connection whose
    transport was just made may open (the asyncio model's admission, which needs the loop's
    transport); `gone(connection)` is told of every connection that ends, after it is counted,
    so an event-loop model can learn when its drain is over. `stage`, if given, makes the stage
    each connection passes through between `opened` and the handler (see Stream.staged).
    `udp_ports` are the ports of the daemon's UDP listeners (see REFLECTORS)."""

    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        later: Callable[..., object],
        udp_ports: frozenset[int],
        *,
        made: Callable[[Connection], bool] | None = None,
        gone: Callable[[Connection], None] | None = None,
        stage: Staging | None = None,
    ) -> None:
        self.handler = handler
        self.delay = listener.delay
        self.admission: Admission | Unlimited = admission_for(listener)
        # A listener without limits or access rules asks nothing per connection or datagram.
        self.screening = not isinstance(self.admission, Unlimited)
        self.logged = listener.log_connections
        self.timeouts = Timeouts(listener, stage.bounds if stage is not None else ())
        self.open: set[Connection] = set()
        self.draining = False  # see drain
        self.later = later
        self.made = made
        self.gone = gone
        self.stage = stage
        # The write buffers the last sweep saw not empty, and their sizes (see sweep).
        self.buffered: dict[Connection, int] = {}
        # The source ports whose datagrams are dropped (only UDP has datagrams). A worker that a
        # reload kept goes on with the ports it was started with: a listener new since knows
        # every current port, this one's included, so it drops what this one says to it, and the
        # exchange ends at its first datagram.
        self.reflecting = REFLECTORS | udp_ports

    def reflected(self, address: Address, recorder: Recorder) -> None:
        """A datagram from one of the `reflecting` ports was dropped: count it, and say so."""
        recorder.rejected[REFLECTION] += 1
        _reflected(reason="reflection", source=str(address[0]), port=address[1])

    def drain(self) -> None:
        """The worker ends its connections (its Stop's second step, `end`): every connection that
        has had an answer has its input ended now (the client sees EOF once its pending requests
        are answered); one that has not is answered first, as its request may still be on its
        way, and ended then. Safe from a
        signal handler: no lock is taken."""
        self.draining = True
        for connection in list(self.open):
            if connection.answered:
                connection.end_input()

    def sweep(self) -> None:
        """End the connections past first_byte_timeout or idle_timeout (see Timeouts). A
        transport does not say when its buffer drains, so one whose buffer changed size since
        the last sweep has been active: its client is reading."""
        last, buffered = self.buffered, {}
        for connection in self.open:
            size = connection.transport.get_write_buffer_size()
            if size:
                buffered[connection] = size
            if size != last.get(connection, 0):
                connection.deadline = MOVED
        self.buffered = buffered
        for connection in self.timeouts.expired(self.open):
            connection.timed_out()

    def forget(self, connection: Connection) -> None:
        self.open.discard(connection)
        if self.gone is not None:
            self.gone(connection)


class ConnectionLog:
    """What one connection is seen doing, said in one info line as it ends (`log_connections`,
    as xinetd's log_on_success): who it served, for how long, what it moved and how it ended.
    Only a logged listener's connections have one (their `observer`); it is the one place a
    stage reports what it learnt (`note`: a TLS handshake's outcome, a verified peer, the
    client a PROXY header names).

    `unprompted` is what `ended` says when no cause was given to ended_by and no reset came."""

    __slots__ = ("began", "bytes_in", "bytes_out", "ending", "requests", "unprompted", "who")

    def __init__(self, unprompted: str) -> None:
        self.unprompted = unprompted
        self.began = 0.0
        self.bytes_in = self.bytes_out = self.requests = 0
        self.ending: str | None = None
        self.who: dict[str, object] = {}

    def opened(self, transport: Transport) -> None:
        self.began = time.monotonic()
        self.who = peer(transport)

    def note(self, **fields: object) -> None:
        """Add what a stage learnt of the connection to its line."""
        self.who.update(fields)

    def ended_by(self, how: str) -> None:
        """The first cause is the one said: a drained client's EOF follows its drain."""
        if self.ending is None:
            self.ending = how

    def closed(self, exc: BaseException | None) -> None:
        log.info(
            "connection closed",
            **self.who,
            duration=round(time.monotonic() - self.began, 6),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            requests=self.requests,
            ended=self.ending or ("reset" if exc is not None else self.unprompted),
        )


class Connection:
    """What every connection's life has, whatever it carries: its transport, its place under the
    limits (a ticket, released once it ends), its counts, its timeout, why its reading is
    paused, and the stop's drain rule; behind a balancer, the client its PROXY header named
    (`proxied`; None: the socket's peer is the client). A relay's is driven by the relay
    (sockd.relay), whose driver is its transport; a handler's is a Stream."""

    __slots__ = (
        "answered",
        "deadline",
        "delayed",
        "observer",
        "paused",
        "proxied",
        "recorder",
        "service",
        "ticket",
        "transport",
    )

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
        self.paused = 0  # the reasons reading is paused (see PAUSES)
        self.observer: ConnectionLog | None = None
        self.proxied: Header | None = None

    def screened(self, transport: asyncio.Transport) -> bool:
        """Whether a connection a loop has made may open: the loop's server accepted it before
        the listener's limits could be asked (transports.admitted). One refused is forgotten."""
        service = self.service
        if not service.screening:
            return True
        ticket = admitted(transport, service.admission, self.recorder)
        if ticket is None:
            service.forget(self)
            return False
        self.ticket = ticket
        return True

    def opened(self) -> None:
        if self.observer is not None:
            self.observer.opened(self.transport)
        self.recorder.connections += 1
        self.service.timeouts.started(self)
        self.service.open.add(self)

    def who(self) -> dict[str, object]:
        """The client, as a warning names it: the one its PROXY header named, or its peer."""
        proxied = self.proxied
        return peer(self.transport) if proxied is None else proxied.named()

    def pause(self, reason: int) -> None:
        """Stop reading, for `reason` (one of PAUSES); again only once every reason is gone."""
        paused = self.paused
        self.paused = paused | reason
        if not paused:
            self.transport.pause_reading()

    def resume(self, reason: int) -> None:
        """`reason` to pause is gone: read again if it was the last (and the connection is not closing)."""
        paused = self.paused
        if paused & reason:
            self.paused = paused = paused & ~reason
            if not paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        """What the transport writes to cannot take more: reading stops until it can."""
        self.pause(WRITE_FULL)

    def resume_writing(self) -> None:
        self.resume(WRITE_FULL)

    def first_answer(self) -> None:
        self.answered = True
        if self.service.draining:  # the drain passed it by while it had no answer yet
            self.end_input()

    def end_input(self) -> None:
        """Shut the connection's input (SHUT_RD): the model sees EOF once what was sent is read."""
        if self.observer is not None:
            self.observer.ended_by("drained")
        end_input(self.transport)

    def timed_out(self) -> None:
        if self.observer is not None:
            self.observer.ended_by("timeout")
        self.recorder.errors[TIMEOUT] += 1
        self.abort()

    def abort(self) -> None:
        """End the connection now (a relay's transport: both its sides)."""
        self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is closed, by either side; `exc` if it failed (a reset, counted)."""
        self.ticket.release()
        self.recorder.closed += 1
        if exc is not None:
            self.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
        self.service.forget(self)
        if self.observer is not None:
            self.observer.closed(exc)


class Stream(Connection):
    """A connection served by a sans-IO handler session (see sockd.handlers)."""

    __slots__ = ("session",)

    transport: StreamTransport

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder) -> None:
        super().__init__(service, ticket, recorder)
        self.session = service.handler.session()

    def connection_made(self, transport: StreamTransport) -> None:
        self.transport = transport
        made = self.service.made
        if made is None or made(self):
            self.opened()

    def opened(self) -> None:
        super().opened()
        stage = self.service.stage
        if stage is None:
            self.begin()
        else:  # the stage reads the input until it is done (see staged), beneath a LoggedStream
            entry = cast(Stream | LoggedStream, self.transport.get_protocol())
            carrier = entry.transport
            carrier.set_protocol(stage(self, entry, carrier, lambda rest, layer: self.staged(entry, rest, layer)))

    def staged(self, entry: Receiver, rest: bytes, layer: StreamTransport | None = None) -> None:
        """The stage is done. Without a `layer`, the transport drives `entry` (what it drove
        before the stage) again, so a request costs what it costs without a stage; a stage that
        stays between them (TLS) is the `layer`, which drives `entry` and is its transport from
        now on. The handler begins, and is fed what came after what the stage took."""
        if layer is None:
            self.transport.set_protocol(entry)
        else:
            cast(Stream | LoggedStream, entry).transport = layer
        self.service.timeouts.staged(self)
        self.begin()
        if rest and not self.transport.is_closing():
            entry.data_received(rest)

    def begin(self) -> None:
        """The handler's turn: a greeting, if it has one; a flowing session's output, if it flows."""
        greeting = self.session.greeting()
        if greeting is not None:  # it says all it has at connect, then closes
            if self.observer is not None:
                self.observer.requests += 1  # the handler spoke first, which counts as a request
            self._reply(greeting, True, 0, self.recorder.clock())
        elif self.session.flowing:
            self.first_answer()  # it is answering: a drain may end its input now
            self.flow()

    def flow(self) -> None:
        """One turn of a flowing session's output: written until the transport is full (its
        resume_writing starts the next turn) or closing, or FLOW_TURN outputs have gone, when
        the next turn waits for the model's `later`."""
        transport, more, recorder = self.transport, self.session.more, self.recorder
        for _ in range(FLOW_TURN):
            if self.paused & WRITE_FULL or transport.is_closing():
                return
            output = more()
            transport.write(output)
            recorder.sent += len(output)  # sockd_sent_bytes: what it wrote, unasked
        self.service.later(0, self.flow)

    def resume_writing(self) -> None:
        self.resume(WRITE_FULL)
        if self.session.flowing:
            self.flow()

    def data_received(self, data: bytes) -> None:
        recorder = self.recorder
        # A blocking model's thread marked itself busy when its read returned (see Recorder): that
        # reading is this request's start, one clock read fewer a request. 0 on an event loop.
        started = recorder.busy_since or recorder.clock()
        self.deadline = MOVED
        session = self.session
        try:
            reply = session.feed(data)
        except TooLarge:
            self.too_large()
            return
        closing = session.closing
        if closing:
            self.pause(CLOSING)
        if self.service.delay:
            self.delayed += len(reply) + DUE_COST
            if self.delayed >= HIGH_WATER:  # a client sending faster than its replies leave
                self.pause(REPLIES_DUE)
            self.service.later(self.service.delay, self._delayed_reply, reply, closing, len(data), started)
            return
        # The path of every request on a busy connection, written out: one call to the handler
        # and one to count it, as a bare server has.
        if reply:
            self.transport.write(reply)
        recorder.request(len(data), len(reply), started)
        if closing or not self.answered:
            self._replied(closing)

    def too_large(self) -> None:
        """A request over max_message_size: the connection ends."""
        if self.observer is not None:
            self.observer.requests -= 1  # it was not answered
            self.observer.ended_by("too large")
        self.recorder.errors[TOO_LARGE] += 1
        self.abort()

    def _delayed_reply(self, reply: bytes, closing: bool, received: int, started: float) -> None:
        self.delayed -= len(reply) + DUE_COST
        if self.transport.is_closing():  # the client reset meanwhile: nobody to answer
            return
        self._reply(reply, closing, received, started)
        if self.delayed < HIGH_WATER:
            self.resume(REPLIES_DUE)

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
        self.paused |= INPUT_ENDED  # the transport reads no more by itself: nothing to resume
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


class LoggedStream:
    """A logged stream's transport, as the stream sees it, and its protocol, as the transport
    sees it: it sits between the two, where a TLS layer would, and counts what passes for the
    stream's ConnectionLog, then passes it on. Only a logged listener's connections have one
    (see stream): the others' transports drive them directly."""

    __slots__ = ("log", "stream", "transport")

    transport: StreamTransport

    def __init__(self, stream: Stream, log: ConnectionLog) -> None:
        self.stream = stream
        self.log = log

    # -- as the stream's protocol

    def connection_made(self, transport: StreamTransport) -> None:
        self.transport = transport
        self.stream.connection_made(self)

    def data_received(self, data: bytes) -> None:
        log = self.log
        log.bytes_in += len(data)
        log.requests += 1
        self.stream.data_received(data)

    def eof_received(self) -> bool:
        self.log.ended_by("client closed")
        return self.stream.eof_received()

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.stream.connection_lost(exc)

    # -- as the stream's transport

    def write(self, data: bytes) -> None:
        self.log.bytes_out += len(data)
        self.transport.write(data)

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def set_protocol(self, protocol: Receiver) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> Receiver:
        protocol: Receiver = self.transport.get_protocol()
        return protocol


def stream(service: Service, ticket: Ticket, recorder: Recorder) -> Stream | LoggedStream:
    """A new stream connection, as its transport is to drive it: the Stream itself, or, on a
    logged listener, the LoggedStream that counts for it."""
    connection = Stream(service, ticket, recorder)
    if not service.logged:
        return connection
    # Neither the client nor a limit: the handler had said all it had (daytime, timestamp).
    connection.observer = observer = ConnectionLog("server closed")
    return LoggedStream(connection, observer)


class Datagrams:
    """The life of a datagram: dropped if it comes from a port of REFLECTORS or of the daemon's
    UDP listeners, else admitted by its source, answered by the handler (now, or `delay`
    later), counted once its reply is sent by `send(reply, address)` (the model's: a socket's
    sendto, or a loop transport's), which raises OSError if it could not be sent.

    `pending` is what the replies due later hold (see DUE_COST), nonzero while any is due: a
    stopping model waits for them (`drained`, if given, is called each time it falls to zero);
    at DATAGRAMS_HELD, replies are dropped."""

    def __init__(
        self,
        service: Service,
        recorder: Recorder,
        send: Callable[[bytes, Address], object],
        drained: Callable[[], None] | None = None,
    ) -> None:
        self.service = service
        self.recorder = recorder
        self.send = send
        self.drained = drained
        self.pending = 0
        self.screened = service.screening
        self.reflecting = service.reflecting

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
            return
        try:
            self.send(reply, address)
        except OSError as exc:
            self.send_failed(exc)
            return
        recorder.request(len(data), len(reply), started)

    def _delayed_reply(self, reply: bytes, address: Address, received: int, started: float) -> None:
        self.pending -= len(reply) + DUE_COST
        try:
            self.send(reply, address)
        except OSError as exc:
            self.send_failed(exc)
        else:
            self.recorder.request(received, len(reply), started)
        if not self.pending and self.drained is not None:
            self.drained()

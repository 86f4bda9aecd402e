"""Sans-IO handlers: bytes in, reply bytes out. No handler touches a socket.

A stream connection gets a `Session` from `Handler.session()`, and its lifecycle (sockd.lifecycle)
drives it: if `greeting()` is not None, that is written at once and the connection closes.
Otherwise each chunk read is fed to `feed` and what it returns is written back; once `closing`
is true that last reply is written and the connection closes. At the client's EOF, what `eof()`
returns is written and the connection closes. A `flowing` session (chargen) speaks without being
asked: from connect, the lifecycle writes what `more()` returns for as long as the transport
takes it, and again each time it can take more. A datagram is answered with whatever
`Handler.datagram` returns (None: no reply).

A request over the listener's `max_message_size` raises `TooLarge` from `feed` or `datagram`;
the lifecycle counts it and closes the connection or drops the datagram.

A handler holds no state of the instance's own: the agent answers from a `Told`, what the
supervisor last said of the instance to the worker (sockd.worker's `state` line).
"""

from __future__ import annotations

import datetime
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sockd.config import HandlerName, Listener, TimestampFormat
from sockd.spec import InstanceState


class TooLarge(Exception):
    """A request over max_message_size."""


class Session(Protocol):
    @property
    def closing(self) -> bool: ...

    @property
    def flowing(self) -> bool: ...

    def greeting(self) -> bytes | None: ...

    def feed(self, data: bytes) -> bytes: ...

    def eof(self) -> bytes: ...

    def more(self) -> bytes: ...


class Handler(Protocol):
    # Whether a stream's bytes are taken in chunks of any size (echo, discard) rather than read
    # as requests (timestamp): max_message_size bounds requests, not a stream's chunks.
    chunked: bool

    def session(self) -> Session: ...

    def datagram(self, data: bytes) -> bytes | None: ...


class Stateless:
    """A handler that keeps no per-connection state is its own session: no allocation per
    accept on the hot path. By default it says nothing and answers nothing."""

    closing = False
    chunked = True
    flowing = False

    def session(self) -> Stateless:
        return self

    def greeting(self) -> bytes | None:
        """What to say at connect, before any request; a session that greets says all it has
        then, and the connection closes (the RFC services). None: wait for requests."""
        return None

    def feed(self, data: bytes) -> bytes:
        return b""

    def eof(self) -> bytes:
        return b""

    def more(self) -> bytes:
        """A flowing session's next output, written when the transport can take it."""
        return b""

    def datagram(self, data: bytes) -> bytes | None:
        return None


class Echo(Stateless):
    """Every byte comes back; a stream stays open until the client closes its side."""

    def feed(self, data: bytes) -> bytes:
        return data

    def datagram(self, data: bytes) -> bytes:
        return data


class Timestamp(Stateless):
    """The seed's server: the current time after the first chunk, then close; one per datagram."""

    closing = True
    chunked = False

    def __init__(self, clock: Callable[[], str]) -> None:
        self.stamp = clock

    def feed(self, data: bytes) -> bytes:
        return self.stamp().encode()

    def datagram(self, data: bytes) -> bytes:
        return self.stamp().encode()


class Discard(Stateless):
    """RFC 863: reads and drops everything; no datagram is answered."""


class Announce(Stateless):
    """Says one thing at connect and closes; answers any datagram with it (RFC 867, RFC 868)."""

    def __init__(self, say: Callable[[], bytes]) -> None:
        self.say = say

    def greeting(self) -> bytes:
        return self.say()

    def datagram(self, data: bytes) -> bytes:
        return self.say()


def chargen_cycle() -> bytes:
    """RFC 864's pattern, one whole period of it: line n is the 72 characters of the 95 printable
    ASCII ones (32 to 126) that start n places along their rotation, and CRLF. After 95 lines it
    repeats, so a stream is this, again and again."""
    printable = bytes(range(32, 127))
    ring = printable * 2
    return b"".join(ring[n : n + 72] + b"\r\n" for n in range(len(printable)))


CHARGEN_CYCLE = chargen_cycle()
# RFC 864 over UDP: "a datagram containing a random number (between 0 and 512) of characters".
CHARGEN_DATAGRAM_MOST = 512


class Chargen(Stateless):
    """RFC 864: on a stream, the pattern's lines from connect until the client closes (input is
    discarded), as fast as the client takes them and no faster (see lifecycle.Stream.flow); each
    datagram is answered by one of a random length from 0 to 512, the pattern truncated. The
    stream's state is none: each `more()` is one whole period, which ends where the next begins."""

    flowing = True

    def more(self) -> bytes:
        return CHARGEN_CYCLE

    def datagram(self, data: bytes) -> bytes:
        # Not a secret, only the RFC's variety: the module's generator will do.
        return CHARGEN_CYCLE[: random.randint(0, CHARGEN_DATAGRAM_MOST)]


# RFC 868 counts seconds since 1900-01-01 00:00 UTC, not since 1970 (70 years, 17 of them leap).
SECONDS_1900_TO_1970 = 2_208_988_800


def rfc868_time() -> bytes:
    """The time as a 32-bit big-endian count of seconds since 1900 (it wraps in 2036)."""
    return ((int(time.time()) + SECONDS_1900_TO_1970) % 2**32).to_bytes(4, "big")


def daytime() -> bytes:
    """RFC 867 leaves the form free; this is the one it suggests: "Weekday, Month Day, Year
    Time-Zone", in local time."""
    return time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n").encode()


@dataclass
class Told:
    """What the supervisor last told the worker of the instance (see sockd.worker): until told
    otherwise, a listener may be down (maint)."""

    state: InstanceState = "maint"


# HAProxy's agent-check reads one line of words (its configuration manual, "agent-check"). "drain"
# and "maint" set the server's administrative state, which only "ready" sets back: an agent that
# answered "drain" before a restart must say "ready" after it, or the server stays out for good.
AGENT_ANSWERS: dict[InstanceState, bytes] = {"up": b"up ready\n", "drain": b"drain\n", "maint": b"maint\n"}


class Agent(Stateless):
    """`handler: agent`: answers HAProxy's agent-check with the instance's state, as the worker was
    last told it, in one line at connect, and closes."""

    def __init__(self, told: Told) -> None:
        self.told = told

    def greeting(self) -> bytes:
        return AGENT_ANSWERS[self.told.state]


# How long a relay keeps a UDP client's upstream socket after its last datagram, if the listener
# sets no idle_timeout.
UDP_SESSION_TIMEOUT = 60.0


@dataclass(frozen=True)
class UpstreamTLS:
    """How a relay speaks TLS to a tls:// upstream: the context that verifies it (and holds the
    certificate shown to it, if any), and the name its certificate must have (sent as SNI)."""

    context: ssl.SSLContext
    server_name: str


class Relay(Stateless):
    """`handler: relay`: not bytes in, bytes out, but each client joined to an upstream. It answers
    nothing itself; the models that can relay (config allows no other) see it and connect each
    client to `upstream`, copying both ways; through TLS if `tls` is given, and after a PROXY
    protocol header if `proxy_protocol` says which (sockd.proxy.writing)."""

    def __init__(self, listener: Listener, tls: UpstreamTLS | None = None) -> None:
        assert listener.upstream is not None
        self.upstream = listener.upstream
        self.scheme, self.where = listener.upstream_endpoint
        self.tls = tls
        self.connect_timeout = listener.connect_timeout
        self.half_close_timeout = listener.half_close_timeout
        self.session_timeout = listener.idle_timeout or UDP_SESSION_TIMEOUT
        self.proxy_protocol = listener.upstream_proxy_protocol


class Exec(Stateless):
    """`handler: exec`: not bytes in, bytes out, but a program per connection, whose stdin and
    stdout are the connection (sockd.exec). It answers nothing itself; the models that can
    supervise children (config allows no other) see it and run `command` for each client.
    `shutdown_timeout` is when a stop's drain ends the children still running."""

    def __init__(self, listener: Listener, shutdown_timeout: float) -> None:
        assert listener.command is not None
        self.listener = listener.name
        self.command = listener.command
        self.env = listener.env
        self.cwd = listener.cwd
        self.timeout = listener.exec_timeout
        self.limits = listener.limits
        self.shutdown_timeout = shutdown_timeout


# Once an exec listener's client or child has ended its output, how long the other may still
# send: the relay's default (half_close_timeout).
CHILD_HALF_CLOSE_TIMEOUT = 0.5


class ToChild(Relay):
    """The settings of the relay that copies between an exec listener's staged client and its
    child (sockd.exec.ExecRelay): its upstream is the child's end of a socketpair, with no address
    to look up, no TLS and no header of its own. Here, not beside ExecRelay: a class of an
    interpreted module cannot subclass a compiled one (Relay, in the mypyc build)."""

    def __init__(self, handler: Exec) -> None:  # not Relay's, which reads a listener's upstream
        self.upstream = f"exec {handler.command[0]}"  # as the relay's warnings name it
        self.scheme, self.where = "unix", ""
        self.tls = None
        self.connect_timeout = handler.timeout
        self.half_close_timeout = CHILD_HALF_CLOSE_TIMEOUT
        self.session_timeout = handler.timeout
        self.proxy_protocol = None


class SeedClock:
    """str(datetime.datetime.now()), the seed's form, with the date and the time of day worked
    out once a second rather than at every request (datetime.now() and str() of it cost 10,800
    instructions a reply, measured under callgrind: a quarter of a connection-per-request
    timestamp's server CPU). The same text: local time, microseconds floored from the same
    clock (`now`, in nanoseconds), and none shown when they are zero. The second and its text
    are one tuple, replaced whole, so threads that share the handler never see one second's
    text for another."""

    __slots__ = ("last", "now")

    def __init__(self, now: Callable[[], int] = time.time_ns) -> None:
        self.now = now
        self.last: tuple[int, str] = (-1, "")

    def __call__(self) -> str:
        # Plain // and -, not divmod() and format(): compiled, machine arithmetic and no
        # generic call.
        micros = self.now() // 1000
        second = micros // 1_000_000
        micro = micros - second * 1_000_000
        last = self.last
        if last[0] != second:
            self.last = last = (second, str(datetime.datetime.fromtimestamp(second)))
        if not micro:
            return last[1]
        return last[1] + "." + str(1_000_000 + micro)[1:]  # six digits, zeros first


CLOCKS: dict[TimestampFormat, Callable[[], str]] = {
    "seed": SeedClock(),
    "iso8601": lambda: datetime.datetime.now(datetime.UTC).isoformat(),
    "unix": lambda: f"{time.time():.6f}",
}

HANDLERS: dict[HandlerName, Callable[[Listener], Handler]] = {
    "echo": lambda listener: Echo(),
    "timestamp": lambda listener: Timestamp(CLOCKS[listener.timestamp_format]),
    "discard": lambda listener: Discard(),
    "daytime": lambda listener: Announce(daytime),
    "time": lambda listener: Announce(rfc868_time),
    "chargen": lambda listener: Chargen(),
    "relay": Relay,
}


class Limited:
    """A handler whose requests may be at most `limit` bytes."""

    def __init__(self, handler: Handler, limit: int) -> None:
        self.handler = handler
        self.limit = limit
        self.chunked = handler.chunked

    def session(self) -> Session:
        session = self.handler.session()
        return session if self.chunked else LimitedSession(session, self.limit)

    def datagram(self, data: bytes) -> bytes | None:
        if len(data) > self.limit:
            raise TooLarge
        return self.handler.datagram(data)


class LimitedSession:
    def __init__(self, session: Session, limit: int) -> None:
        self.session = session
        self.limit = limit

    @property
    def closing(self) -> bool:
        return self.session.closing

    @property
    def flowing(self) -> bool:
        return self.session.flowing

    def greeting(self) -> bytes | None:
        return self.session.greeting()

    def feed(self, data: bytes) -> bytes:
        if len(data) > self.limit:
            raise TooLarge
        return self.session.feed(data)

    def eof(self) -> bytes:
        return self.session.eof()

    def more(self) -> bytes:
        return self.session.more()


def build(
    listener: Listener, upstream_tls: UpstreamTLS | None = None, told: Told | None = None, shutdown_timeout: float = 0.0
) -> Handler:
    """The listener's handler; a relay to a tls:// upstream is given its TLS (sockd.tls.contexts),
    an agent what its worker is told (nothing yet, without `told`), an exec its worker's
    shutdown_timeout."""
    handler: Handler
    if listener.handler == "exec":
        handler = Exec(listener, shutdown_timeout)
    elif listener.handler == "relay":
        handler = Relay(listener, upstream_tls)
    elif listener.handler == "agent":
        handler = Agent(Told() if told is None else told)
    else:
        handler = HANDLERS[listener.handler](listener)
    if listener.max_message_size is None:
        return handler
    return Limited(handler, listener.max_message_size)

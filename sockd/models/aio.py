"""asyncio with protocols (not streams, which cost a coroutine and a buffer copy per read), on
uvloop when it is installed: the fast model."""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import Callable
from typing import cast

import structlog

from sockd.config import EventLoop, Listener
from sockd.counters import BEAT_INTERVAL, RESET, SEND, TIMEOUT, TOO_LARGE, Stats
from sockd.handlers import Handler, Relay, TooLarge
from sockd.limits import Admission, Timeouts, admitted, datagram_allowed, released
from sockd.models import RESOURCE_PAUSE, Address, Stop, accept_failed, datagram_reply, shutdown_read
from sockd.models.relay import MAX_SESSIONS, sessions_warning, upstream_failed

log = structlog.get_logger()

# Connections taken per readiness of the listening socket, as asyncio's own server does: a burst
# is accepted in one turn without starving the connections already open.
ACCEPT_BATCH = 100


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:  # optional (wheels for Linux and macOS); config refuses event_loop: uvloop then
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class Model:
    def __init__(self, listener: Listener, handler: Handler, stats: Stats) -> None:
        self.listener = listener
        self.handler = handler
        self.stats = stats
        self.delay = listener.delay
        self.admission = Admission.of(listener)
        self.timeouts = Timeouts(listener)
        # asyncio and uvloop set TCP_NODELAY on every connection themselves: undo it if asked.
        self.nagle = listener.protocol == "tcp" and not listener.nodelay
        self.new_loop = loop_factory(listener.event_loop)
        self.relay = handler if isinstance(handler, Relay) else None
        self.busy: set[StreamProtocol | RelayProtocol] = set()  # open connections
        self.connecting: set[asyncio.Task[None]] = set()  # accepted, their transports not made yet
        self.paused: asyncio.TimerHandle | None = None  # accepting, while out of descriptors
        self.pending_datagrams = 0
        self.idle = asyncio.Event()
        self.stopped = False  # accepts no more
        self.stopping = False  # and has drained the connections it had

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as self.recorder, asyncio.Runner(loop_factory=self.new_loop) as runner:
            runner.run(self._serve(sock, stop))

    async def _serve(self, sock: socket.socket, stop: Stop) -> None:
        self.sock = sock
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        loop.add_reader(stop.fileno(), self._stopped, loop, stop, stopped)
        self._beat(loop)
        if self.timeouts.interval is not None:
            self._sweep(loop, self.timeouts.interval)
        if sock.type == socket.SOCK_DGRAM:
            kind = DatagramProtocol if self.relay is None else DatagramRelayProtocol
            _, datagrams = await loop.create_datagram_endpoint(lambda: kind(self), sock=sock)
            await stopped.wait()
            await self._drained()
            datagrams.close()
            return
        # sockd accepts, not the loop's server: on running out of descriptors uvloop closes the
        # connections waiting in the backlog and asyncio pauses a second (and trips over its own
        # closed server later); this way every model counts it, pauses, and resumes alike.
        loop.add_reader(sock.fileno(), self._accept, loop, sock)
        await stopped.wait()
        if not self.paused:
            loop.remove_reader(sock.fileno())
        while self.connecting:  # connections accepted just now: to be drained like the others
            await asyncio.wait(set(self.connecting))
        self.stopping = True
        for protocol in list(self.busy):
            if protocol.answered:  # see shutdown_read: the others end after their first answer
                protocol.drain()
        await self._drained()

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.stopped:  # in the same turn as the stop, after it
                return
            try:
                conn, address = sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:
                accept_failed(exc, self.recorder)
                loop.remove_reader(sock.fileno())
                self.paused = loop.call_later(RESOURCE_PAUSE, self._resume_accepting, loop, sock)
                return
            source = admitted(self.admission, self.listener, conn, address, self.recorder)
            if source is None:
                continue
            conn.setblocking(False)
            task = loop.create_task(self._connect(loop, conn, source))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    def _resume_accepting(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.paused = None
        if not self.stopped:
            loop.add_reader(sock.fileno(), self._accept, loop, sock)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, source: str) -> None:
        try:
            if self.relay is None:
                await loop.connect_accepted_socket(lambda: StreamProtocol(self, source), conn)
            else:
                relay = self.relay
                await loop.connect_accepted_socket(lambda: RelayProtocol(self, relay, source), conn)
        except OSError as exc:  # the client left before its transport was made
            self.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
            conn.close()
            released(self.admission, source)

    async def _drained(self) -> None:
        """Until no connection is open and no delayed datagram reply is due (see done)."""
        while self.busy or self.pending_datagrams:
            self.idle.clear()
            await self.idle.wait()

    def _stopped(self, loop: asyncio.AbstractEventLoop, stop: Stop, stopped: asyncio.Event) -> None:
        loop.remove_reader(stop.fileno())  # it stays readable: left registered, it would spin
        self.stopped = True
        stopped.set()

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stats.beat()
        loop.call_later(BEAT_INTERVAL, self._beat, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """End the connections past first_byte_timeout or idle_timeout (see Timeouts). A transport
        does not say when its buffer drains, so a buffer that changed size counts as activity."""
        for protocol in self.busy:
            buffered = protocol.write_buffered()
            if buffered != protocol.buffered:
                protocol.buffered, protocol.active = buffered, True
        for protocol in self.timeouts.expired(self.busy):
            self.recorder.errors[TIMEOUT] += 1
            protocol.expire()
        loop.call_later(interval, self._sweep, loop, interval)

    def done(self) -> None:
        if not self.busy and not self.pending_datagrams:
            self.idle.set()


class StreamProtocol(asyncio.Protocol):
    # Slots, not a dict per instance: with thousands of idle connections, the difference is a
    # third of sockd's memory per connection.
    __slots__ = (
        "active",
        "answered",
        "buffered",
        "deadline",
        "delay",
        "delayed",
        "model",
        "recorder",
        "session",
        "source",
        "tail",
        "transport",
    )

    def __init__(self, model: Model, source: str) -> None:
        self.model = model
        self.source = source  # see limits.source_of
        self.session = model.handler.session()
        self.delay = model.delay
        self.recorder = model.recorder
        self.answered = False
        self.delayed = 0
        self.tail: bytes | None = None  # what to send at the client's EOF, once delayed replies are out
        self.active = False  # see Timeouts
        self.deadline = 0.0
        self.buffered = 0  # the write buffer's size at the last sweep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        model = self.model
        if model.nagle:
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        model.timeouts.started(self)
        model.busy.add(self)
        self.recorder.connections += 1
        greeting = self.session.greeting()
        if greeting is not None:  # it says all it has at connect, then closes
            self._reply(greeting, True, 0, self.recorder.clock())

    def data_received(self, data: bytes) -> None:
        started = self.recorder.clock()
        self.active = True
        session = self.session
        try:
            reply = session.feed(data)
        except TooLarge:
            self.recorder.errors[TOO_LARGE] += 1
            self.transport.close()
            return
        if session.closing:
            self.transport.pause_reading()
        if self.delay:
            self.delayed += 1
            loop = asyncio.get_running_loop()
            loop.call_later(self.delay, self._delayed_reply, reply, session.closing, len(data), started)
        else:
            self._reply(reply, session.closing, len(data), started)

    def _delayed_reply(self, reply: bytes, closing: bool, received: int, started: float) -> None:
        self.delayed -= 1
        if self.transport.is_closing():  # the client reset meanwhile: nobody to answer
            return
        self._reply(reply, closing, received, started)

    def _reply(self, reply: bytes, closing: bool, received: int, started: float) -> None:
        transport = self.transport
        if reply:
            transport.write(reply)
        self.recorder.request(received, len(reply), started)
        if not self.answered:
            self.answered = True
            if self.model.stopping:  # the drain passed it by while it had no answer yet
                self.drain()
        if closing:
            transport.close()
        elif self.tail is not None and not self.delayed:
            self._finish(self.tail)

    def eof_received(self) -> bool:
        self.tail = self.session.eof()
        if not self.delayed:  # otherwise the last delayed reply finishes the connection
            self._finish(self.tail)
        return True  # we close ourselves, after the replies still to come

    def _finish(self, tail: bytes) -> None:
        if tail:
            self.transport.write(tail)
        self.transport.close()

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def write_buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def expire(self) -> None:
        # Replies the client never read would hold close() open for ever: those connections reset.
        if self.buffered:
            self.transport.abort()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        released(self.model.admission, self.source)
        self.recorder.closed += 1
        if exc is not None:
            self.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
        self.model.busy.discard(self)
        self.model.done()

    def drain(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            shutdown_read(sock.fileno())


class DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, model: Model) -> None:
        self.model = model
        self.handler = model.handler
        self.delay = model.delay
        self.recorder = model.recorder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not datagram_allowed(self.model.admission, self.model.listener, addr, self.recorder):
            return
        started = self.recorder.clock()
        reply = datagram_reply(self.handler, data, self.recorder)
        if reply is None:
            return
        if self.delay:
            self.model.pending_datagrams += 1
            asyncio.get_running_loop().call_later(self.delay, self._send_delayed, reply, addr, len(data), started)
        else:
            self._send(reply, addr)
            self.recorder.request(len(data), len(reply), started)

    def _send_delayed(self, reply: bytes, addr: Address, received: int, started: float) -> None:
        self._send(reply, addr)
        self.recorder.request(received, len(reply), started)
        self.model.pending_datagrams -= 1
        self.model.done()

    def _send(self, reply: bytes, addr: Address) -> None:
        if reply:
            self.transport.sendto(reply, addr)
            return
        # An empty datagram is a datagram (echo answers one with one), but asyncio's and uvloop's
        # sendto() drop empty data without a word: it goes out through the socket itself.
        try:
            self.model.sock.sendto(reply, addr)
        except OSError as exc:
            self.error_received(exc)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply, or a reply the kernel would not send.
        self.recorder.errors[SEND] += 1
        log.debug("datagram error", error=str(exc))

    def close(self) -> None:
        self.transport.close()


# -- relay: each client joined to the upstream, bytes copied both ways as they come


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a TimeoutError says nothing


async def open_upstream(
    loop: asyncio.AbstractEventLoop, relay: Relay, factory: Callable[[], asyncio.BaseProtocol]
) -> asyncio.BaseTransport:
    where = relay.where
    async with asyncio.timeout(relay.connect_timeout):
        if isinstance(where, str):
            return (await loop.create_unix_connection(cast(Callable[[], asyncio.Protocol], factory), where))[0]
        if relay.scheme == "tcp":
            return (await loop.create_connection(cast(Callable[[], asyncio.Protocol], factory), *where))[0]
        datagrams = cast(Callable[[], asyncio.DatagramProtocol], factory)
        return (await loop.create_datagram_endpoint(datagrams, remote_addr=where))[0]


class RelayProtocol(asyncio.Protocol):
    """A client of a relay: what it sends goes to its upstream connection, and back. When one side
    ends its output, the other side's output is ended (shutdown(SHUT_WR), after what is buffered)
    and copying goes on the other way until that side ends too or is quiet for half_close_timeout:
    socat's half-close. Each side's transport pauses reading while the other's buffer is full."""

    __slots__ = (
        "active",
        "answered",
        "buffered",
        "client_ended",
        "connecting",
        "deadline",
        "delayed",
        "early",
        "ended",
        "model",
        "moved",
        "recorder",
        "relay",
        "source",
        "transport",
        "upstream",
    )

    def __init__(self, model: Model, relay: Relay, source: str) -> None:
        self.model = model
        self.relay = relay
        self.source = source
        self.recorder = model.recorder
        self.upstream: UpstreamProtocol | None = None
        # What the client said before the upstream answered (None: its end, too); passed on then.
        self.early: list[bytes | None] = []
        self.client_ended = False
        self.ended = 0  # sides whose output has ended
        self.moved = 0  # bytes copied either way (see side_ended)
        self.answered = True  # a stop may end its input at once: the end is passed on as a half-close
        self.delayed = 0
        self.active = False  # see Timeouts
        self.deadline = 0.0
        self.buffered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # until the upstream answers
        model = self.model
        model.timeouts.started(self)
        model.busy.add(self)
        self.recorder.connections += 1
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await open_upstream(loop, self.relay, lambda: UpstreamProtocol(self))
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a name IDNA cannot encode
            upstream_failed(self.relay, self.recorder, _reason(exc))
            self.transport.close()  # the client sees EOF at once
            return
        if self.transport.is_closing():  # the client gave up meanwhile
            transport.close()

    def upstream_ready(self, upstream: UpstreamProtocol) -> None:
        """The upstream answered: pass on what the client said meanwhile, then copy as it comes."""
        self.upstream = upstream
        for data in self.early:
            if data is None:
                self.eof_received()
            else:
                self.data_received(data)
        self.early.clear()
        if not self.client_ended:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:  # the loop began reading before connection_made could pause it
            self.early.append(data)
            self.transport.pause_reading()
            return
        size = len(data)
        self.active = True
        self.moved += size
        self.recorder.received += size
        self.upstream.transport.write(data)

    def eof_received(self) -> bool:
        self.client_ended = True
        if self.upstream is None:
            self.early.append(None)
            return True
        self.upstream.transport.write_eof()
        self.side_ended()
        return True  # the other way may go on

    def side_ended(self) -> None:
        self.ended += 1
        if self.ended == 2:
            self.close()
        else:
            self._close_if_quiet(-1)

    def _close_if_quiet(self, moved: int) -> None:
        """Half-closed: as socat's -t, give up on the other side once it has been quiet for
        half_close_timeout (a long transfer the other way is not cut short)."""
        if self.moved == moved:
            self.close()
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.relay.half_close_timeout, self._close_if_quiet, self.moved)

    def write_buffered(self) -> int:
        """Bytes either transport still has to write (see Model._sweep)."""
        upstream = 0 if self.upstream is None else self.upstream.transport.get_write_buffer_size()
        return self.transport.get_write_buffer_size() + upstream

    def close(self) -> None:
        """Close both sides once they have written what they hold; a side that takes nothing for
        half_close_timeout is reset instead, so a stuck peer cannot keep either open."""
        self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()
        self._abort_if_stuck(-1)

    def _abort_if_stuck(self, buffered: int) -> None:
        now = self.write_buffered()
        if not now:
            return
        if now == buffered:
            self.expire()
        else:
            asyncio.get_running_loop().call_later(self.relay.half_close_timeout, self._abort_if_stuck, now)

    # Back-pressure: a side that cannot take more stops the other side's reading.

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def expire(self) -> None:
        self.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def drain(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            shutdown_read(sock.fileno())

    def connection_lost(self, exc: Exception | None) -> None:
        self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.transport.close()
            self._abort_if_stuck(-1)
        released(self.model.admission, self.source)
        self.recorder.closed += 1
        if exc is not None:
            self.recorder.errors[RESET] += 1
        self.model.busy.discard(self)
        self.model.done()


class UpstreamProtocol(asyncio.Protocol):
    """The upstream side of one relayed client."""

    __slots__ = ("client", "transport")

    def __init__(self, client: RelayProtocol) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client.upstream_ready(self)

    def data_received(self, data: bytes) -> None:
        client, size = self.client, len(data)
        client.active = True
        client.moved += size
        client.recorder.sent += size
        client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.transport.write_eof()
        self.client.side_ended()
        return True

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # reset mid-stream: the client cannot be told more than that it ended
            upstream_failed(self.client.relay, self.client.recorder, _reason(exc))
            self.client.transport.abort()
        else:
            self.client.transport.close()


class DatagramRelayProtocol(asyncio.DatagramProtocol):
    """A UDP relay: a session per client address, each with its own upstream socket (so replies
    find their way back), forgotten after session_timeout without a datagram."""

    def __init__(self, model: Model) -> None:
        assert model.relay is not None
        self.model = model
        self.relay = model.relay
        self.recorder = model.recorder
        self.sessions: dict[Address, DatagramSession] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        loop = asyncio.get_running_loop()
        self.sweeper = loop.call_later(self.relay.session_timeout / 4, self._forget_idle, loop)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not datagram_allowed(self.model.admission, self.model.listener, addr, self.recorder):
            return
        session = self.sessions.get(addr)
        if session is None:
            if len(self.sessions) >= MAX_SESSIONS:
                sessions_warning(sessions=MAX_SESSIONS)
                return
            session = self.sessions[addr] = DatagramSession(self, addr)
        self.recorder.received += len(data)
        session.send(data)

    def _forget_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for addr, session in list(self.sessions.items()):
            if now - session.last_seen >= self.relay.session_timeout:
                session.close()
                del self.sessions[addr]
        self.sweeper = loop.call_later(self.relay.session_timeout / 4, self._forget_idle, loop)

    def close(self) -> None:
        self.sweeper.cancel()
        for session in self.sessions.values():
            session.close()
        self.transport.close()


class DatagramSession(asyncio.DatagramProtocol):
    def __init__(self, listener: DatagramRelayProtocol, client: Address) -> None:
        self.listener = listener
        self.client = client
        self.last_seen = asyncio.get_running_loop().time()
        self.waiting: list[bytes] | None = []  # datagrams that came before the upstream socket
        self.transport: asyncio.DatagramTransport | None = None
        self.opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            await open_upstream(asyncio.get_running_loop(), self.listener.relay, lambda: self)
        except (OSError, TimeoutError) as exc:
            upstream_failed(self.listener.relay, self.listener.recorder, _reason(exc))
            self.listener.sessions.pop(self.client, None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.waiting or ():
            self.transport.sendto(data)
        self.waiting = None

    def send(self, data: bytes) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        if self.transport is None:
            assert self.waiting is not None
            self.waiting.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        self.listener.recorder.sent += len(data)
        self.listener.transport.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        upstream_failed(self.listener.relay, self.listener.recorder, _reason(exc))  # e.g. ICMP port unreachable

    def close(self) -> None:
        self.opening.cancel()
        if self.transport is not None:
            self.transport.close()

"""asyncio with protocols (not streams, which cost a coroutine and a buffer copy per read), on
uvloop when it is installed: the fast model. The lifecycle is the protocol, and uvloop's
transport is its transport: a request costs what it costs a bare uvloop protocol."""

from __future__ import annotations

import _socket
import asyncio
import importlib
import os
import resource
import socket
from collections.abc import Callable
from typing import Any, cast

import structlog

from sockd.config import EventLoop, Listener
from sockd.counters import BEAT_INTERVAL, RESET, RESOURCES, Recorder, Stats
from sockd.handlers import Handler, Relay
from sockd.lifecycle import Address, Connection, Service, Stream, logged
from sockd.limits import FREE, MOVED
from sockd.models.shared import (
    RESOURCE_PAUSE,
    SocketDatagrams,
    accept_failed,
    admitted,
    end_transport_input,
    out_of_resources,
    peer_of,
    stop_listening,
)
from sockd.relay import LoggedRelay, Resolver
from sockd.relay.aio import DatagramRelayProtocol, RelayProtocol
from sockd.sockets import OUT_OF_RESOURCES
from sockd.stopping import Stop

log = structlog.get_logger()

# Descriptors a worker keeps free of connections (see Acceptor): one for whatever needs one.
SPARE_DESCRIPTORS = 1
# Connections sockd takes per readiness of the listening socket, as asyncio's own server does: a
# burst is accepted in one turn without starving the connections already open.
ACCEPT_BATCH = 100
# How near the descriptor limit the loop's server gives way to sockd's accept(), and how far below
# that it takes over again (see Acceptor): so it does not switch back and forth at every connection.
MARGIN = 64
RESUME_ROOM = 16


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:  # optional (wheels for Linux and macOS); config refuses event_loop: uvloop then
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class AioService(Service):
    """The service, knowing when its last connection is gone (the end of a drain), and which
    connections have a full write buffer."""

    def __init__(
        self, listener: Listener, handler: Handler, loop: asyncio.AbstractEventLoop, udp_ports: frozenset[int]
    ) -> None:
        super().__init__(listener, handler, later=loop.call_later, udp_ports=udp_ports)
        self.idle = asyncio.Event()
        # asyncio and uvloop set TCP_NODELAY on every connection themselves: undo it if asked.
        self.nagle = listener.protocol == "tcp" and not listener.nodelay
        # Between pause_writing and resume_writing: the transports do not say it otherwise (their
        # buffer's size between the two water marks could be either). A set, not a flag on each
        # connection: it costs nothing to the thousands that are never backed up.
        self.backed_up: set[Connection] = set()
        self.acceptor: Acceptor | None = None  # a stream listener's: told of every connection gone

    def forget(self, connection: Connection) -> None:
        super().forget(connection)
        self.backed_up.discard(connection)
        if self.acceptor is not None:
            self.acceptor.released()
        if not self.open:
            self.idle.set()


class Full(Exception):
    """Raised by the server's protocol factory at the descriptor limit: libuv then stops
    accepting, and the one connection it had just accepted is closed (see Acceptor)."""


class Acceptor:
    """How a stream listener's connections are accepted: by uvloop's own server while
    descriptors are plenty, by sockd near their limit (and always on the standard loop).

    uvloop's server accepts and makes each connection's transport in C: a connection costs what
    it costs a bare uvloop server, half of what a Python accept() and a task to make its transport
    cost. But out of descriptors, a loop's server copes badly: libuv closes every connection
    waiting in the backlog, asyncio pauses a second. So once the connections held come within
    MARGIN of the limit, the server stops (it listens on a duplicate: the socket stays open, and
    clients wait in its backlog) and sockd accepts itself, pausing on EMFILE and losing nothing,
    as every model does; once they are RESUME_ROOM below that, a server starts again. (A burst of
    more than MARGIN connections in one turn of the loop, right at the limit, costs the one
    accepted past it: counted as resources and warned of.)

    Every server made calls listen() again on the socket it is given, which shares its backlog
    with the supervisor's and every worker's copy: it is given the listener's `backlog`, or the
    loop's default (100) would be the listener's from then on.

    A connection holds `per_connection` descriptors (a relay's two). `factory` makes a
    connection's protocol, which takes its ticket once it is made (see admitted)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        per_connection: int,
        recorder: Recorder,
        *,
        backlog: int,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.backlog = backlog
        self.factory = factory
        self.recorder = recorder
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # never unlimited, on Linux
        # What is open now, and the duplicate a server holds, are not for connections.
        self.capacity = (soft - len(os.listdir("/proc/self/fd")) - 1 - SPARE_DESCRIPTORS) // per_connection
        self.server: asyncio.AbstractServer | None = None
        self.starting: asyncio.Task[None] | None = None  # a server being made
        self.reading = False  # sockd accepts
        self.paused: asyncio.TimerHandle | None = None  # sockd's accept(), out of descriptors
        self.connecting: set[asyncio.Task[None]] = set()  # accepted by sockd, their transports not made yet
        self.held = 0  # connections accepted and not yet gone (opened, or to be opened next turn)
        self.stopped = False
        # Only a loop that makes a connection's transport as it accepts it (uvloop) is let accept.
        # The standard loop's server makes each in a task, as sockd's own accept does, so it saves
        # nothing; and closed while such a task is pending (a worker retiring), it loses that
        # connection (its Server._attach asserts it is still open).
        self.server_accepts = not isinstance(loop, asyncio.BaseEventLoop)

    def start(self) -> None:
        if self.server_accepts and self.held < self.capacity - MARGIN:
            self._serve()
        else:
            self._read()

    def _serve(self) -> None:
        log.debug("accepting through the loop's server", held=self.held)
        self.starting = self.loop.create_task(self._new_server())
        self.starting.add_done_callback(self._server_made)

    async def _new_server(self) -> None:
        self.server = await self.loop.create_server(self._made, sock=self.sock.dup(), backlog=self.backlog)

    def _server_made(self, task: asyncio.Task[None]) -> None:
        self.starting = None
        if task.cancelled() or task.exception() is not None:  # no descriptor for the duplicate
            self._read()
        elif self.stopped:  # meanwhile
            self._close_server()

    def _made(self) -> asyncio.Protocol:
        """The server's protocol factory, for a connection it has just accepted."""
        if self.held >= self.capacity:
            self.recorder.errors[RESOURCES] += 1
            out_of_resources(error="a burst at the descriptor limit: one connection closed")
            raise Full
        self.held += 1
        if self.held == self.capacity - MARGIN:
            self.loop.call_soon(self._read)  # not while the server is in its accept callback
        return self.factory()

    def _read(self) -> None:
        """sockd accepts from now on, instead of a server."""
        log.debug("accepting by sockd: near the descriptor limit", held=self.held)
        self._close_server()
        self._start_reading()

    def _start_reading(self) -> None:
        if not (self.reading or self.stopped):
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _close_server(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _address = self.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:
                accept_failed(exc, self.recorder)
                self._stop_reading()
                self.paused = self.loop.call_later(RESOURCE_PAUSE, self._resume)
                return
            self.held += 1
            # The bare C socket, not socket.socket: uvloop keeps it as long as the connection
            # lives, and it is 40 bytes smaller (no slots, no GC header) with thousands open.
            conn = _socket.socket(self.sock.family, self.sock.type, self.sock.proto, fd)
            task = self.loop.create_task(self._connect(conn))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self, conn: _socket.socket) -> None:
        try:  # both loops use only what the C socket has
            await self.loop.connect_accepted_socket(self.factory, cast(socket.socket, conn))
        except OSError as exc:  # the client left before its transport was made
            self.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
            conn.close()
            self.released()

    def _stop_reading(self) -> None:
        """sockd accepts no more, nor will after a pause."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None

    def _resume(self) -> None:
        self.paused = None
        self._start_reading()

    def released(self) -> None:
        """A connection has gone (or was refused)."""
        self.held -= 1
        # While a server accepts (nearly always), there is nothing more to do.
        if self.server is None and self.starting is None and not self.stopped:
            self._serve_again_with_room()

    def _serve_again_with_room(self) -> None:
        """sockd accepts, or is paused: a server takes over once there is room again."""
        if self.server_accepts and self.held <= self.capacity - MARGIN - RESUME_ROOM:
            self._stop_reading()
            self._serve()

    def halt(self) -> None:
        """Accept no more, from this turn on (the listening socket is the caller's to close)."""
        self.stopped = True
        self._close_server()
        self._stop_reading()

    async def halted(self) -> None:
        """Until every connection accepted has its transport, and no server is being made."""
        while self.connecting or self.starting:
            await asyncio.wait({*self.connecting, *([self.starting] if self.starting else [])})


class Model:
    def __init__(self, listener: Listener, handler: Handler, stats: Stats, udp_ports: frozenset[int]) -> None:
        self.listener = listener
        self.handler = handler
        self.stats = stats
        self.udp_ports = udp_ports
        self.new_loop = loop_factory(listener.event_loop)
        self.relay = handler if isinstance(handler, Relay) else None
        self.stream = logged(listener, StreamProtocol)

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as self.recorder, asyncio.Runner(loop_factory=self.new_loop) as runner:
            runner.run(self._serve(sock, stop))

    async def _serve(self, sock: socket.socket, stop: Stop) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self.service = service = AioService(self.listener, self.handler, loop, self.udp_ports)
        stopped = asyncio.Event()
        loop.add_reader(stop.fileno(), self._stopped, loop, stop, stopped)
        loop.add_reader(stop.ending.fileno(), self._ending, loop, stop)
        self._beat(loop)
        if service.timeouts.interval is not None:
            self._sweep(loop, service.timeouts.interval, {})
        if sock.type == socket.SOCK_DGRAM:
            datagrams = self._datagrams(sock)
            await loop.create_datagram_endpoint(lambda: datagrams, sock=sock)
            await stopped.wait()
            if isinstance(datagrams, DatagramProtocol):
                # No datagram more (the next generation takes them, under its rules), while the
                # replies still due go out through the transport.
                datagrams.transport.set_protocol(asyncio.DatagramProtocol())
                await datagrams.replied()
            datagrams.close()
            return
        per_connection = 1 if self.relay is None else 2
        service.acceptor = acceptor = Acceptor(
            loop, sock, self._protocol(), per_connection, self.recorder, backlog=self.listener.backlog
        )
        acceptor.start()
        await stopped.wait()
        await acceptor.halted()
        stop_listening(sock)
        # Not `service.open`: a connection the loop's server accepted in its last turn opens in
        # the next, and a worker that left before would reset it.
        while acceptor.held:
            service.idle.clear()
            await service.idle.wait()

    def _protocol(self) -> Callable[[], asyncio.Protocol]:
        """A connection's protocol, its ticket had once it is made (see admitted)."""
        service, recorder, relay, stream = self.service, self.recorder, self.relay, self.stream
        if relay is None:
            return lambda: stream(service, FREE, recorder)
        relayed = logged(self.listener, RelayProtocol, LoggedRelay)
        names = Resolver(relay, asyncio.get_running_loop().call_soon_threadsafe)
        return lambda: relayed(service, FREE, recorder, names)

    def _datagrams(self, sock: socket.socket) -> DatagramProtocol | DatagramRelayProtocol:
        if self.relay is None:
            return DatagramProtocol(self.service, self.recorder, sock)
        names = Resolver(self.relay, asyncio.get_running_loop().call_soon_threadsafe)
        return DatagramRelayProtocol(self.service, self.recorder, names)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """What the loop could not give anybody: in one line, without a traceback. (asyncio's
        server, out of descriptors, says so here as it pauses.)"""
        exc = context.get("exception")
        if isinstance(exc, Full):  # counted and warned of already
            return
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self.recorder.errors[RESOURCES] += 1
            out_of_resources(error=exc.strerror)
            return
        log.error("event loop error", message=context.get("message"), error=repr(exc))

    def _stopped(self, loop: asyncio.AbstractEventLoop, stop: Stop, stopped: asyncio.Event) -> None:
        loop.remove_reader(stop.fileno())  # it stays readable: left registered, it would spin
        if self.service.acceptor is not None:
            self.service.acceptor.halt()
        stopped.set()

    def _ending(self, loop: asyncio.AbstractEventLoop, stop: Stop) -> None:
        loop.remove_reader(stop.ending.fileno())
        self.service.stop()

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stats.beat()
        loop.call_later(BEAT_INTERVAL, self._beat, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop, interval: float, buffered: dict[Connection, int]) -> None:
        """A transport does not say when its buffer drains, so a buffer that changed size since
        the last sweep counts as activity; then the lifecycle's sweep (see Timeouts). `buffered`
        holds the sizes the last sweep saw, of the few buffers that were not empty."""
        now_buffered: dict[Connection, int] = {}
        for connection in self.service.open:
            assert isinstance(connection, StreamProtocol | RelayProtocol)
            size = connection.write_buffered()
            if size:
                now_buffered[connection] = size
            if size != buffered.get(connection, 0):
                connection.deadline = MOVED
        self.service.sweep()
        loop.call_later(interval, self._sweep, loop, interval, now_buffered)


class StreamProtocol(Stream, asyncio.Protocol):
    # Slots, not a dict per instance: with thousands of idle connections, the difference is a
    # third of sockd's memory per connection.
    __slots__ = ()

    service: AioService
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        if self.service.screening and not admitted(self, self.transport):
            return
        if self.service.nagle:
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        self.opened()

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        self.service.backed_up.add(self)
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.service.backed_up.discard(self)
        self.read_again()

    def read_again(self) -> None:
        # Each reason to pause resumes only once the other is gone too.
        if self not in self.service.backed_up:
            super().read_again()

    def write_buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def end_input(self) -> None:
        end_transport_input(self.transport)

    def peer(self) -> dict[str, object]:
        return peer_of(self.transport.get_extra_info("socket"))


class DatagramProtocol(SocketDatagrams, asyncio.DatagramProtocol):
    def __init__(self, service: Service, recorder: Recorder, sock: socket.socket) -> None:
        super().__init__(service, recorder, sock)
        self.idle = asyncio.Event()  # set when the last delayed reply has gone out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self, reply: bytes, address: Address) -> bool:
        if not reply:
            # An empty datagram is a datagram (echo answers one with one), but asyncio's and
            # uvloop's sendto() drop empty data without a word: it goes out through the socket.
            return super().send(reply, address)
        self.transport.sendto(reply, address)  # a failure comes back through error_received
        return True

    def _delayed_reply(self, reply: bytes, address: Address, received: int, started: float) -> None:
        super()._delayed_reply(reply, address, received, started)
        if not self.pending:
            self.idle.set()

    async def replied(self) -> None:
        """Until no delayed reply is due."""
        while self.pending:
            self.idle.clear()
            await self.idle.wait()

    def error_received(self, exc: Exception) -> None:
        self.send_failed(exc)

    def close(self) -> None:
        self.transport.close()

"""asyncio with protocols (not streams, which cost a coroutine and a buffer copy per read), on
uvloop when it is installed: the fast model. The loop drives each lifecycle connection as its
protocol (a Stream speaks asyncio's protocol interface, without being an asyncio.Protocol), and
uvloop's transport is the connection's transport: a request costs what it costs a bare uvloop
protocol, three Python calls (data_received, the session's feed, the recorder's request)."""

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
from sockd.exec import Children, ExecProtocol, ExecRelay, settle
from sockd.handlers import Exec, Handler, Relay
from sockd.lifecycle import Connection, Datagrams, Service, Staging, stream
from sockd.limits import FREE
from sockd.models.shared import accept_failed, out_of_resources, stop_listening
from sockd.relay import Resolver
from sockd.relay.aio import DatagramRelayProtocol, RelayProtocol
from sockd.sockets import OUT_OF_RESOURCES, RESOURCE_PAUSE
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
    connection's protocol, which takes its ticket once it is made (see admitted).

    With a `limit` (an exec listener's max_connections: its children), sockd accepts, and not
    past it: the clients beyond wait in the backlog, as inetd's, until a connection has gone,
    rather than being refused as another listener's are."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        per_connection: int,
        recorder: Recorder,
        *,
        backlog: int,
        limit: int | None = None,
    ) -> None:
        self.loop = loop
        self.limit = limit
        self.full = False  # held reached `limit`: sockd accepts no more until one has gone
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
        self.server_accepts = limit is None and not isinstance(loop, asyncio.BaseEventLoop)

    def start(self) -> None:
        if self.server_accepts and self.held < self.capacity - MARGIN:
            self._accept_by_loop_server()
        else:
            self._accept_by_sockd()

    def _accept_by_loop_server(self) -> None:
        log.debug("accepting through the loop's server", held=self.held)
        self.starting = self.loop.create_task(self._new_server())
        self.starting.add_done_callback(self._server_made)

    async def _new_server(self) -> None:
        self.server = await self.loop.create_server(self._made, sock=self.sock.dup(), backlog=self.backlog)

    def _server_made(self, task: asyncio.Task[None]) -> None:
        self.starting = None
        if task.cancelled() or task.exception() is not None:  # no descriptor for the duplicate
            self._accept_by_sockd()
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
            self.loop.call_soon(self._accept_by_sockd)  # not while the server is in its accept callback
        return self.factory()

    def _accept_by_sockd(self) -> None:
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
            if self.limit is not None and self.held >= self.limit:
                self._stop_reading()
                self.full = True
                return
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
        if self.full:
            self.full = False
            self._start_reading()
        # While a server accepts (nearly always), there is nothing more to do.
        elif self.server is None and self.starting is None and not self.stopped:
            self._serve_again_with_room()

    def _serve_again_with_room(self) -> None:
        """sockd accepts, or is paused: a server takes over once there is room again."""
        if self.server_accepts and self.held <= self.capacity - MARGIN - RESUME_ROOM:
            self._stop_reading()
            self._accept_by_loop_server()

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
    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        stage: Staging | None = None,
    ) -> None:
        self.listener = listener
        self.handler = handler
        self.stats = stats
        self.udp_ports = udp_ports
        self.stage = stage
        self.new_loop = loop_factory(listener.event_loop)
        self.relay = handler if isinstance(handler, Relay) else None
        self.exec = handler if isinstance(handler, Exec) else None
        self.children: Children | None = None  # an exec listener's (see sockd.exec)
        # asyncio and uvloop set TCP_NODELAY on every connection themselves: undo it if asked.
        self.nagle = listener.protocol == "tcp" and not listener.nodelay
        self.acceptor: Acceptor | None = None  # a stream listener's: told of every connection gone

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as self.recorder, asyncio.Runner(loop_factory=self.new_loop) as runner:
            runner.run(self._serve(sock, stop))

    async def _serve(self, sock: socket.socket, stop: Stop) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self.idle = asyncio.Event()  # set when the last connection is gone (the end of a drain)
        self.service = service = Service(
            self.listener,
            self.handler,
            later=loop.call_later,
            udp_ports=self.udp_ports,
            gone=self._gone,
            stage=self.stage,
        )
        if service.screening or self.nagle:  # else a connection the loop has made has nothing to pass
            service.made = self._made
        stopped = asyncio.Event()
        loop.add_reader(stop.fileno(), self._stopped, loop, stop, stopped)
        loop.add_reader(stop.ending.fileno(), self._ending, loop, stop)
        self._beat(loop)
        if service.timeouts.interval is not None:
            self._sweep(loop, service.timeouts.interval)
        if sock.type == socket.SOCK_DGRAM:
            datagrams = self._datagrams(sock)
            await loop.create_datagram_endpoint(lambda: cast(asyncio.DatagramProtocol, datagrams), sock=sock)
            await stopped.wait()
            if isinstance(datagrams, DatagramProtocol):
                # No datagram more (the next generation takes them, under its rules), while the
                # replies still due go out through the transport.
                datagrams.transport.set_protocol(asyncio.DatagramProtocol())
                await datagrams.replied()
            datagrams.close()
            return
        # A relay holds its client's socket and its upstream's; an exec's child, its pidfd and
        # the pipe of its stderr (the child has the socket), and behind a stage the client's
        # socket and its end of the child's socketpair too.
        per_connection = 1 if self.relay is None and self.exec is None else 2
        if self.exec is not None and service.stage is not None:
            per_connection = 4
        self.acceptor = acceptor = Acceptor(
            loop,
            sock,
            self._protocol(),
            per_connection,
            self.recorder,
            backlog=self.listener.backlog,
            limit=self.listener.max_connections if self.exec is not None else None,
        )
        acceptor.start()
        await stopped.wait()
        await acceptor.halted()
        stop_listening(sock)
        # Not `service.open`: a connection the loop's server accepted in its last turn opens in
        # the next, and a worker that left before would reset it.
        while acceptor.held:
            self.idle.clear()
            await self.idle.wait()

    def _protocol(self) -> Callable[[], asyncio.Protocol]:
        """A connection's protocol, its ticket had once it is made (see _made)."""
        service, recorder, relay = self.service, self.recorder, self.relay
        if self.exec is not None:
            unable = settle(self.exec)
            staged = service.stage is not None  # the child's bytes are copied (see sockd.exec)
            children = self.children = Children(self.exec, asyncio.get_running_loop(), self.nagle, staged, unable)
            if staged:
                return lambda: ExecRelay(service, FREE, recorder, children)
            return lambda: ExecProtocol(service, FREE, recorder, children)
        if relay is None:
            # The lifecycle's connection is the protocol itself (see the module's docstring).
            return lambda: cast(asyncio.Protocol, stream(service, FREE, recorder))
        names = Resolver(relay, asyncio.get_running_loop().call_soon_threadsafe)
        return lambda: RelayProtocol(service, FREE, recorder, names)

    def _made(self, connection: Connection) -> bool:
        """Whether a connection the loop has made may open: its ticket had (the loop's server
        accepted it before the listener's limits could be asked), and Nagle's algorithm back on
        if asked for."""
        transport = connection.transport
        if not connection.screened(cast(asyncio.Transport, transport)):
            return False
        if self.nagle:
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        return True

    def _gone(self, connection: Connection) -> None:
        if self.acceptor is not None:
            self.acceptor.released()
        if not self.service.open:
            self.idle.set()

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
        if self.acceptor is not None:
            self.acceptor.halt()
        stopped.set()

    def _ending(self, loop: asyncio.AbstractEventLoop, stop: Stop) -> None:
        loop.remove_reader(stop.ending.fileno())
        self.service.drain()
        if self.children is not None:
            self.children.stop()

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stats.beat()
        loop.call_later(BEAT_INTERVAL, self._beat, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.service.sweep()
        loop.call_later(interval, self._sweep, loop, interval)


class DatagramProtocol:
    """A UDP listener's protocol on the loop: its datagrams go to the lifecycle's Datagrams, and
    the replies out through the socket's own sendto, which the lifecycle calls itself. Not the
    loop transport's: uvloop's converts the address back from text at every sendto (through
    snprintf and inet_ntop: 1,700 instructions a datagram under callgrind, more than the rest of
    its reply), and both loops' drop an empty datagram without a word, where an empty datagram is
    a datagram (echo answers one with one). The socket does not block: a reply its buffer cannot
    take is dropped and counted (`send`), as the network may drop it. An ICMP error for an
    earlier reply still comes back through error_received."""

    transport: asyncio.DatagramTransport

    def __init__(self, service: Service, recorder: Recorder, sock: socket.socket) -> None:
        self.idle = asyncio.Event()  # set when the last delayed reply has gone out
        self.datagrams = Datagrams(service, recorder, sock.sendto, drained=self.idle.set)
        # What the loop calls for each datagram: the lifecycle's own method, no call between.
        self.datagram_received = self.datagrams.datagram_received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    async def replied(self) -> None:
        """Until no delayed reply is due."""
        while self.datagrams.pending:
            self.idle.clear()
            await self.idle.wait()

    def error_received(self, exc: Exception) -> None:
        self.datagrams.send_failed(exc)

    def pause_writing(self) -> None:
        """A full send buffer drops replies, as the network may: nothing to pause."""

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def close(self) -> None:
        self.transport.close()

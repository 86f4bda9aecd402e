"""asyncio with protocols (not streams, which cost a coroutine and a buffer copy per read), on
uvloop when it is installed: the fast model. The lifecycle is the protocol, and uvloop's
transport is its transport: a request costs what it costs a bare uvloop protocol."""

from __future__ import annotations

import _socket
import asyncio
import importlib
import socket
from collections.abc import Callable
from typing import cast

import structlog

from sockd.config import EventLoop, Listener
from sockd.counters import BEAT_INTERVAL, RESET, Recorder, Stats
from sockd.handlers import Handler, Relay
from sockd.lifecycle import Address, Connection, Service, Stream, logged
from sockd.limits import MOVED, Ticket
from sockd.models import Stop
from sockd.models.shared import (
    RESOURCE_PAUSE,
    SocketDatagrams,
    accept_failed,
    admit,
    end_transport_input,
    peer_of,
    stop_listening,
)
from sockd.relay.aio import DatagramRelayProtocol, RelayProtocol

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

    def forget(self, connection: Connection) -> None:
        super().forget(connection)
        self.backed_up.discard(connection)
        if not self.open:
            self.idle.set()


class Model:
    def __init__(self, listener: Listener, handler: Handler, stats: Stats, udp_ports: frozenset[int]) -> None:
        self.listener = listener
        self.handler = handler
        self.stats = stats
        self.udp_ports = udp_ports
        self.new_loop = loop_factory(listener.event_loop)
        self.relay = handler if isinstance(handler, Relay) else None
        self.stream = logged(StreamProtocol) if listener.log_connections else StreamProtocol
        self.connecting: set[asyncio.Task[None]] = set()  # accepted, their transports not made yet
        self.paused: asyncio.TimerHandle | None = None  # accepting, while out of descriptors
        self.stopped = False  # accepts no more

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as self.recorder, asyncio.Runner(loop_factory=self.new_loop) as runner:
            runner.run(self._serve(sock, stop))

    async def _serve(self, sock: socket.socket, stop: Stop) -> None:
        loop = asyncio.get_running_loop()
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
        # sockd accepts, not the loop's server: on running out of descriptors uvloop closes the
        # connections waiting in the backlog and asyncio pauses a second (and trips over its own
        # closed server later); this way every model counts it, pauses, and resumes alike.
        loop.add_reader(sock.fileno(), self._accept, loop, sock)
        await stopped.wait()
        if not self.paused:
            loop.remove_reader(sock.fileno())
        stop_listening(sock)
        while self.connecting:  # connections accepted just now: to be served like the others
            await asyncio.wait(set(self.connecting))
        while service.open:
            service.idle.clear()
            await service.idle.wait()

    def _datagrams(self, sock: socket.socket) -> DatagramProtocol | DatagramRelayProtocol:
        if self.relay is None:
            return DatagramProtocol(self.service, self.recorder, sock)
        return DatagramRelayProtocol(self.service, self.recorder, self.relay)

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.stopped:  # in the same turn as the stop, after it
                return
            try:
                fd, address = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:
                accept_failed(exc, self.recorder)
                loop.remove_reader(sock.fileno())
                self.paused = loop.call_later(RESOURCE_PAUSE, self._resume_accepting, loop, sock)
                return
            # The bare C socket, not socket.socket: uvloop keeps it as long as the connection
            # lives, and it is 40 bytes smaller (no slots, no GC header) with 8,000 of them open.
            conn = _socket.socket(sock.family, sock.type, sock.proto, fd)
            ticket = admit(conn, address, self.service, self.recorder)
            if ticket is None:
                continue
            conn.setblocking(False)
            task = loop.create_task(self._connect(loop, conn, ticket))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    def _resume_accepting(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.paused = None
        if not self.stopped:
            loop.add_reader(sock.fileno(), self._accept, loop, sock)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: _socket.socket, ticket: Ticket) -> None:
        service, recorder, relay, stream = self.service, self.recorder, self.relay, self.stream
        sock = cast(socket.socket, conn)  # both loops use only what the C socket has
        try:
            if relay is None:
                await loop.connect_accepted_socket(lambda: stream(service, ticket, recorder), sock)
            else:
                await loop.connect_accepted_socket(lambda: RelayProtocol(service, ticket, recorder, relay), sock)
        except OSError as exc:  # the client left before its transport was made
            recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
            conn.close()
            ticket.release()

    def _stopped(self, loop: asyncio.AbstractEventLoop, stop: Stop, stopped: asyncio.Event) -> None:
        loop.remove_reader(stop.fileno())  # it stays readable: left registered, it would spin
        self.stopped = True
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

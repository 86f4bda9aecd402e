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
from sockd.handlers import Handler, TooLarge
from sockd.limits import Admission, Timeouts, source_of
from sockd.models import RESOURCE_PAUSE, Address, Stop, accept_failed, shutdown_read

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
        self.busy: set[StreamProtocol] = set()  # open connections
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
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        loop.add_reader(stop.fileno(), self._stopped, loop, stop, stopped)
        self._beat(loop)
        if self.timeouts.interval is not None:
            self._sweep(loop, self.timeouts.interval)
        if sock.type == socket.SOCK_DGRAM:
            transport, _ = await loop.create_datagram_endpoint(lambda: DatagramProtocol(self), sock=sock)
            await stopped.wait()
            await self._drained()
            transport.close()
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
            try:
                conn, address = sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:
                accept_failed(exc, self.recorder)
                loop.remove_reader(sock.fileno())
                self.paused = loop.call_later(RESOURCE_PAUSE, self._resume_accepting, loop, sock)
                return
            source = source_of(self.listener, address)
            if self.admission is not None and not self.admission.admit(conn, source, self.recorder):
                conn.close()
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
            await loop.connect_accepted_socket(lambda: StreamProtocol(self, source), conn)
        except OSError as exc:  # the client left before its transport was made
            self.recorder.errors[RESET] += 1
            log.debug("connection lost", error=str(exc))
            conn.close()

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
            buffered = protocol.transport.get_write_buffer_size()
            if buffered != protocol.buffered:
                protocol.buffered, protocol.active = buffered, True
        for protocol in self.timeouts.expired(self.busy, loop.time()):
            self.recorder.errors[TIMEOUT] += 1
            protocol.expire()
        loop.call_later(interval, self._sweep, loop, interval)

    def done(self) -> None:
        if not self.busy and not self.pending_datagrams:
            self.idle.set()


class StreamProtocol(asyncio.Protocol):
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
        model.timeouts.started(self, asyncio.get_running_loop().time())
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

    def expire(self) -> None:
        # Replies the client never read would hold close() open for ever: those connections reset.
        if self.buffered:
            self.transport.abort()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.model.admission is not None:
            self.model.admission.release(self.source)
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
        admission = self.model.admission
        if admission is not None and not admission.allows_datagram(source_of(self.model.listener, addr), self.recorder):
            return
        started = self.recorder.clock()
        try:
            reply = self.handler.datagram(data)
        except TooLarge:
            self.recorder.errors[TOO_LARGE] += 1
            return
        if reply is None:
            return
        if self.delay:
            self.model.pending_datagrams += 1
            asyncio.get_running_loop().call_later(self.delay, self._send_delayed, reply, addr, len(data), started)
        else:
            self.transport.sendto(reply, addr)
            self.recorder.request(len(data), len(reply), started)

    def _send_delayed(self, reply: bytes, addr: Address, received: int, started: float) -> None:
        self.transport.sendto(reply, addr)
        self.recorder.request(received, len(reply), started)
        self.model.pending_datagrams -= 1
        self.model.done()

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply, or a reply the kernel would not send.
        self.recorder.errors[SEND] += 1
        log.debug("datagram error", error=str(exc))

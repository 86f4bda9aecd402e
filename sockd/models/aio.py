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
from sockd.counters import BEAT_INTERVAL, RESET, SEND, Stats
from sockd.handlers import Handler
from sockd.models import Address, Stop, shutdown_read

log = structlog.get_logger()


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
        self.handler = handler
        self.stats = stats
        self.delay = listener.delay
        self.new_loop = loop_factory(listener.event_loop)
        self.busy: set[StreamProtocol] = set()  # open connections
        self.pending_datagrams = 0
        self.idle = asyncio.Event()
        self.stopping = False

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        with self.stats.recorder() as self.recorder, asyncio.Runner(loop_factory=self.new_loop) as runner:
            runner.run(self._serve(sock, stop))

    async def _serve(self, sock: socket.socket, stop: Stop) -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        loop.add_reader(stop.fileno(), self._stopped, loop, stop, stopped)
        self._beat(loop)
        if sock.type == socket.SOCK_DGRAM:
            transport, _ = await loop.create_datagram_endpoint(lambda: DatagramProtocol(self), sock=sock)
            await stopped.wait()
            await self._drained()
            transport.close()
            return
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(lambda: StreamProtocol(self), sock=sock)
        else:
            server = await loop.create_server(lambda: StreamProtocol(self), sock=sock)
        await stopped.wait()
        server.close()
        await asyncio.sleep(0)  # let a connection accepted just now reach connection_made
        self.stopping = True
        for protocol in list(self.busy):
            if protocol.answered:  # see shutdown_read: the others end after their first answer
                protocol.drain()
        await self._drained()

    async def _drained(self) -> None:
        """Until no connection is open and no delayed datagram reply is due (see done)."""
        while self.busy or self.pending_datagrams:
            self.idle.clear()
            await self.idle.wait()

    @staticmethod
    def _stopped(loop: asyncio.AbstractEventLoop, stop: Stop, stopped: asyncio.Event) -> None:
        loop.remove_reader(stop.fileno())  # it stays readable: left registered, it would spin
        stopped.set()

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stats.beat()
        loop.call_later(BEAT_INTERVAL, self._beat, loop)

    def done(self) -> None:
        if not self.busy and not self.pending_datagrams:
            self.idle.set()


class StreamProtocol(asyncio.Protocol):
    def __init__(self, model: Model) -> None:
        self.model = model
        self.session = model.handler.session()
        self.delay = model.delay
        self.recorder = model.recorder
        self.answered = False
        self.delayed = 0
        self.tail: bytes | None = None  # what to send at the client's EOF, once delayed replies are out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.model.busy.add(self)
        self.recorder.connections += 1
        greeting = self.session.greeting()
        if greeting is not None:  # it says all it has at connect, then closes
            self._reply(greeting, True, 0, self.recorder.clock())

    def data_received(self, data: bytes) -> None:
        started = self.recorder.clock()
        session = self.session
        reply = session.feed(data)
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

    def connection_lost(self, exc: Exception | None) -> None:
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
        started = self.recorder.clock()
        reply = self.handler.datagram(data)
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

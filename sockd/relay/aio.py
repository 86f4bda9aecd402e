"""The relay on asyncio transports, which do the buffering: each side's transport pauses reading
while the other side's write buffer is full."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from sockd.counters import Recorder
from sockd.handlers import Relay
from sockd.lifecycle import Address, Service
from sockd.limits import Ticket
from sockd.models.shared import admitted, end_transport_input, peer_of
from sockd.relay import UPSTREAM_ERRORS, Relayed, Sessions, upstream_failed


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


class RelayProtocol(Relayed, asyncio.Protocol):
    """A client of a relay: what it sends goes to its upstream connection, and back."""

    __slots__ = ("client_ended", "connecting", "early", "upstream")

    transport: asyncio.Transport

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, relay: Relay) -> None:
        super().__init__(service, ticket, recorder, relay)
        self.upstream: UpstreamProtocol | None = None
        # What the client said before the upstream answered (None: its end, too); passed on then.
        self.early: list[bytes | None] = []
        self.client_ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.service.screening and not admitted(self, self.transport):
            return
        self.transport.pause_reading()  # until the upstream answers
        self.opened()
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await open_upstream(loop, self.relay, lambda: UpstreamProtocol(self))
        except UPSTREAM_ERRORS as exc:
            self.upstream_failed(exc)
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
        self.carried(len(data), True)
        self.upstream.transport.write(data)

    def eof_received(self) -> bool:
        self.client_ended = True
        if self.upstream is None:
            self.early.append(None)
            return True
        self.upstream.transport.write_eof()
        self.side_ended(True)
        return True  # the other way may go on

    def write_buffered(self) -> int:
        """Bytes either transport still has to write (see the asyncio model's sweep)."""
        upstream = 0 if self.upstream is None else self.upstream.transport.get_write_buffer_size()
        return self.transport.get_write_buffer_size() + upstream

    def close_both(self) -> None:
        """A side that takes nothing for half_close_timeout is reset instead, so a stuck peer
        cannot keep either open."""
        self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()
        self._abort_if_stuck(-1)

    def _abort_if_stuck(self, buffered: int) -> None:
        now = self.write_buffered()
        if not now:
            return
        if now == buffered:
            self.abort()
        else:
            self.service.later(self.relay.half_close_timeout, self._abort_if_stuck, now)

    def abort(self) -> None:
        self.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    # Back-pressure: a side that cannot take more stops the other side's reading.

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def end_input(self) -> None:
        end_transport_input(self.transport)

    def peer(self) -> dict[str, object]:
        return peer_of(self.transport.get_extra_info("socket"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.transport.close()
            self._abort_if_stuck(-1)
        super().connection_lost(exc)


class UpstreamProtocol(asyncio.Protocol):
    """The upstream side of one relayed client."""

    __slots__ = ("client", "transport")

    def __init__(self, client: RelayProtocol) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client.upstream_ready(self)

    def data_received(self, data: bytes) -> None:
        self.client.carried(len(data), False)
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.transport.write_eof()
        self.client.side_ended(False)
        return True

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # reset mid-stream: the client cannot be told more than that it ended
            self.client.upstream_failed(exc)
            self.client.transport.abort()
        else:
            self.client.transport.close()


class DatagramRelayProtocol(asyncio.DatagramProtocol):
    """A UDP relay: each client's datagrams go out on its session's upstream socket."""

    def __init__(self, service: Service, recorder: Recorder, relay: Relay) -> None:
        self.service = service
        self.recorder = recorder
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.sessions: Sessions[DatagramSession] = Sessions(
            self.relay, self.service, self.recorder, asyncio.get_running_loop().time
        )

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not self.sessions.admits(addr):
            return
        session = self.sessions.open(addr, lambda: DatagramSession(self, addr))
        self.recorder.received += len(data)
        session.send(data)

    def close(self) -> None:
        self.sessions.close()
        self.transport.close()


class DatagramSession(asyncio.DatagramProtocol):
    def __init__(self, listener: DatagramRelayProtocol, client: Address) -> None:
        self.listener = listener
        self.client = client
        self.last_seen = asyncio.get_running_loop().time()
        self.asked = 0.0
        self.waiting: list[bytes] | None = []  # datagrams that came before the upstream socket
        self.transport: asyncio.DatagramTransport | None = None
        self.opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            await open_upstream(asyncio.get_running_loop(), self.listener.relay, lambda: self)
        except UPSTREAM_ERRORS as exc:
            upstream_failed(self.listener.relay, self.listener.recorder, exc)
            self.listener.sessions.forget(self.client, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.waiting or ():
            self.transport.sendto(data)
        self.waiting = None

    def send(self, data: bytes) -> None:
        if self.transport is None:
            assert self.waiting is not None
            self.waiting.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.listener.sessions.replied(self.client, len(data))
        self.listener.transport.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        upstream_failed(self.listener.relay, self.listener.recorder, exc)  # e.g. ICMP port unreachable

    def close(self) -> None:
        self.opening.cancel()
        if self.transport is not None:
            self.transport.close()

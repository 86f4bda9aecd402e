"""The relay on asyncio transports, which do the buffering: each side's transport pauses reading
while the other side's write buffer is full. A UDP relay's sessions are the loop's readers (see
relay.DatagramRelay).

A listener's stage (a PROXY header, a TLS handshake: see lifecycle.Staging) reads the client
before the upstream is connected. TLS on either side is a TLSLayer between the loop's transport
and the side's protocol, which takes it for its transport: on a `tls` listener, the client's
handshake is the stage's; to a tls:// upstream, the upstream's handshake is part of
opening it. The layer's `write_eof` is a close_notify, after which it goes on reading, so a
half-close passes through TLS as through TCP (the loop's own TLS cannot do that)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any, cast

from sockd.counters import Recorder
from sockd.handlers import UpstreamTLS
from sockd.interfaces import Receiver, StreamTransport
from sockd.lifecycle import CONNECTING, INPUT_ENDED, WRITE_FULL, Address, Service
from sockd.limits import Ticket
from sockd.relay import UPSTREAM_ERRORS, Answer, DatagramRelay, Endpoint, Resolver, handshake_failed, relayed
from sockd.tls.layer import Failure, TLSLayer

# A side's transport: the loop's, or the TLSLayer over it.
Carrier = asyncio.Transport | TLSLayer


async def found(names: Resolver) -> list[Endpoint]:
    """The upstream's endpoints, as `names` answers them."""
    answered: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

    def deliver(answer: Answer) -> None:
        if not answered.done():  # cancelled, the task's `finally` not run yet
            answered.set_result(answer)

    names.ask(deliver)
    try:
        answer = await answered
    finally:
        names.forget(deliver)  # cancelled (timed out, or the client gone)
    if isinstance(answer, BaseException):
        raise answer
    return answer


async def open_upstream(
    loop: asyncio.AbstractEventLoop, names: Resolver, factory: Callable[[], asyncio.Protocol], header: bytes = b""
) -> Carrier:
    """A connection to the upstream, within connect_timeout (its lookup and, to a tls://
    upstream, its handshake included): each endpoint is tried in turn until one answers. The
    protocol `factory` makes is told of it (connection_made) once it can carry its bytes.
    `header` (a PROXY header) is sent first, on the bare connection: before a tls:// upstream's
    ClientHello."""
    failure: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
    async with asyncio.timeout(names.relay.connect_timeout):
        for family, kind, proto, where in await found(names):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, where)
                if header:  # on a new connection it fits the send buffer: sent at once
                    await loop.sock_sendall(sock, header)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            tls = names.relay.tls
            if tls is None:
                return await carrier(loop, sock, factory)
            return await originate(loop, sock, cast(Receiver, factory()), tls)
    raise failure


async def carrier(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol]
) -> asyncio.Transport:
    """The loop's transport over `sock`, connected, driving what `factory` makes."""
    if sock.family == socket.AF_UNIX:
        return (await loop.create_unix_connection(factory, sock=sock))[0]
    # As create_connection(host, port) would: asyncio's loop leaves a socket handed to it as it is.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return (await loop.create_connection(factory, sock=sock))[0]


async def originate(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Receiver, tls: UpstreamTLS
) -> TLSLayer:
    """TLS over the connection to a tls:// upstream: `protocol` gets the layer for its transport
    once the handshake has verified the upstream. A handshake that fails raises (the layer has
    closed the connection, after the alert OpenSSL wrote); one cut short (connect_timeout) is
    aborted."""
    done: asyncio.Future[Failure] = loop.create_future()

    def established(layer: TLSLayer, failure: Failure) -> None:
        if done.done():  # cancelled: the connection was aborted
            return
        done.set_result(failure)
        if failure is None:  # before the loop gives the layer anything more
            layer.set_protocol(protocol)
            protocol.connection_made(layer)

    # Until then the layer drives a protocol that hears nothing: a failed handshake is the
    # relay's to tell, once (see RelayProtocol._open_upstream), not `protocol`'s loss of its upstream.
    layer = TLSLayer(tls.context, cast(Receiver, asyncio.Protocol()), established, server_hostname=tls.server_name)
    transport = await carrier(loop, sock, lambda: cast(asyncio.Protocol, layer))
    try:
        failure = await done
    except BaseException:
        transport.abort()
        raise
    if failure is not None:
        raise ConnectionError(handshake_failed(failure))
    return layer


class RelayProtocol(asyncio.Protocol):
    """A client of a relay: what it sends goes to its upstream connection, and back. It is the
    loop's protocol for the client's connection, and the transport of its lifecycle connection
    (see relay.Relayed): closing that closes both sides."""

    __slots__ = ("client_ended", "connecting", "early", "events", "header", "names", "state", "transport", "upstream")

    transport: Carrier

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, names: Resolver) -> None:
        self.state, self.events = relayed(service, ticket, recorder, names.relay, self)
        self.names = names
        self.upstream: UpstreamProtocol | None = None
        self.connecting: asyncio.Task[None] | None = None  # opening the upstream
        # What the client said before the upstream answered (None: its end, too); passed on then.
        self.early: list[bytes | None] = []
        self.header = b""  # the PROXY header, to go with what the client said meanwhile (see upstream_ready)
        self.client_ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop_transport = self.transport = cast(asyncio.Transport, transport)
        connection = self.state.connection
        if not connection.screened(loop_transport):
            return
        service = connection.service
        self.events.opened()
        if service.stage is None:
            self._connect()
        else:  # the client's header or handshake first (see _staged)
            stage = service.stage(connection, self, loop_transport, self._staged)
            loop_transport.set_protocol(cast(asyncio.Protocol, stage))

    def _staged(self, rest: bytes, layer: StreamTransport | None) -> None:
        """The listener's stage let the client in: the loop's transport drives the relay again,
        or the layer that stays (TLS's) is the client's transport from now on; what came after
        what the stage took goes to the upstream once it answers."""
        if layer is None:
            self.transport.set_protocol(self)
        else:
            assert isinstance(layer, TLSLayer)  # the one layer a stage leaves
            self.transport = layer
        self.state.staged()
        self._connect()
        if rest:
            self.data_received(rest)

    def _connect(self) -> None:
        self.state.connection.pause(CONNECTING)  # until the upstream answers
        self.connecting = asyncio.get_running_loop().create_task(self._open_upstream())

    async def _open_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        relay, before_tls = self.names.relay, b""
        if relay.proxy_protocol is not None:
            client = self.transport
            layer = client if isinstance(client, TLSLayer) else None
            header = self.state.proxy_header(client.get_extra_info("socket"), layer)
            # Before a tls:// upstream's ClientHello, on the bare connection, as HAProxy sends it;
            # else in one write with what the client said meanwhile.
            if relay.tls is None:
                self.header = header
            else:
                before_tls = header
        try:
            transport = await open_upstream(loop, self.names, lambda: UpstreamProtocol(self), before_tls)
        except UPSTREAM_ERRORS as exc:
            self.events.upstream_failed(exc)
            self.transport.close()  # the client sees EOF at once
            return
        if self.transport.is_closing():  # the client gave up meanwhile
            transport.close()

    def upstream_ready(self, upstream: UpstreamProtocol) -> None:
        """The upstream answered: pass on the PROXY header, if it is still to go, and what the
        client said meanwhile, in one write; then copy as it comes."""
        self.upstream = upstream
        said = b"".join(data for data in self.early if data is not None)
        if said:
            self.events.carried(len(said), True)
        if self.header or said:
            upstream.transport.write(self.header + said)
        if None in self.early:  # the client's end, after what it said
            self.eof_received()
        self.early.clear()
        if not self.client_ended:
            self.state.connection.resume(CONNECTING)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:  # the loop began reading before connection_made could pause it
            self.early.append(data)
            self.transport.pause_reading()
            return
        self.events.carried(len(data), True)
        self.upstream.transport.write(data)

    def eof_received(self) -> bool:
        self.client_ended = True
        self.state.connection.paused |= INPUT_ENDED  # the transport reads no more by itself
        if self.upstream is None:
            self.early.append(None)
            return True
        self.upstream.transport.write_eof()
        self.events.side_ended(True)
        return True  # the other way may go on

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.transport.close()
            self._abort_if_stuck(-1)
        self._ended(exc)

    def _ended(self, exc: BaseException | None) -> None:
        """Both sides are closed: the connection ends (an exec's, once its child is reaped too)."""
        self.events.connection_lost(exc)

    # Back-pressure: a side that cannot take more stops the other side's reading.

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- as the lifecycle connection's transport

    def close(self) -> None:
        """Both sides, once each has written what it holds. A side that takes nothing for
        half_close_timeout is reset instead, so a stuck peer cannot keep either open."""
        self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()
        self._abort_if_stuck(-1)

    def abort(self) -> None:
        self.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        """Bytes either side still has to write (see lifecycle.Service.sweep)."""
        upstream = 0 if self.upstream is None else self.upstream.transport.get_write_buffer_size()
        return self.transport.get_write_buffer_size() + upstream

    def _abort_if_stuck(self, buffered: int) -> None:
        now = self.get_write_buffer_size()
        if not now:
            return
        if now == buffered:
            self.abort()
        else:
            self.state.connection.service.later(self.state.relay.half_close_timeout, self._abort_if_stuck, now)


class UpstreamProtocol(asyncio.Protocol):
    """The upstream side of one relayed client."""

    __slots__ = ("client", "transport")

    transport: Carrier

    def __init__(self, client: RelayProtocol) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport | TLSLayer) -> None:
        self.transport = cast(Carrier, transport)
        self.client.upstream_ready(self)

    def data_received(self, data: bytes) -> None:
        self.client.events.carried(len(data), False)
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.transport.write_eof()
        self.client.events.side_ended(False)
        return True

    def pause_writing(self) -> None:
        self.client.state.connection.pause(WRITE_FULL)

    def resume_writing(self) -> None:
        self.client.state.connection.resume(WRITE_FULL)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # reset mid-stream: the client cannot be told more than that it ended
            self.client.events.upstream_failed(exc)
            self.client.transport.abort()
        else:
            self.client.transport.close()


class DatagramRelayProtocol:
    """A UDP relay on asyncio (see relay.DatagramRelay), the listening socket's protocol: each
    session's socket is one of the loop's readers, and replies go out through the listening
    socket's transport."""

    transport: asyncio.DatagramTransport

    def __init__(self, service: Service, recorder: Recorder, names: Resolver) -> None:
        self.loop = asyncio.get_running_loop()
        self.relaying = DatagramRelay(names, service, recorder, self)
        # What the loop calls for each datagram: the relay's own method, no call of ours between.
        self.datagram_received = self.relaying.datagram_received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def watch(self, sock: socket.socket, readable: Callable[[], None]) -> None:
        self.loop.add_reader(sock, readable)

    def unwatch(self, sock: socket.socket) -> None:
        self.loop.remove_reader(sock)

    def reply(self, data: bytes, client: Address) -> None:
        self.transport.sendto(data, client)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error for a reply to a client: nothing to do (see DatagramSession for the upstream's)."""

    def pause_writing(self) -> None:
        """A full send buffer drops replies, as the network may: nothing to pause."""

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def close(self) -> None:
        self.relaying.close()
        self.transport.close()

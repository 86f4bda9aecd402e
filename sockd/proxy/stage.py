"""A `proxy_protocol` listener's stage (lifecycle.Service.stage): the PROXY header a balancer puts
before its client's bytes, read (sockd.proxy.reading) before anything else of the connection.
Written once for every model and both relays, as the TLS stage is: each gives the stage the
transport it made, whatever it is; on a TLS listener the header's stage comes first, and hands
what came after the header to the handshake's (lifecycle.chain).

The peer was let in at accept because `proxy_trusted` names it (limits.Admission). As the spec
asks, nothing is guessed: what the peer sends must be a whole, valid header of the listener's
version within proxy_timeout (the stage's bound: limits.Timeouts), or the connection is closed
and counted (`sockd_connections_rejected_total{reason="proxy_protocol"}`, and one throttled
warning a reason): garbage, a header cut short by the peer's end, or one too slow. A peer that
ends or resets its connection having sent nothing of a header refused nothing: it is a client
that closed, or a reset (counted as one). Nothing of the client's reaches the handler, or a
relay's upstream, before the header is whole.
Then the client the header names (the peer itself, for LOCAL or UNKNOWN) is judged by the
listener's source rules (allow/deny, per-source counts and rates: Admission.admit_client), and,
let in, is the connection's source for the rest of its life: kept on the connection
(`proxied`), and said in its log line (its address, the balancer's as `via`, and the header's
UNIQUE_ID, AUTHORITY and ALPN)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sockd.config import Listener, ProxyVersion
from sockd.config.schema import host_port
from sockd.interfaces import Receiver, StreamTransport
from sockd.limits import PROXY_PROTOCOL
from sockd.logging import Throttled
from sockd.proxy.reading import Header, InvalidHeader, Reader
from sockd.transports import peer, peer_address

if TYPE_CHECKING:
    from sockd.lifecycle import Connection, Staged

_rejected = Throttled("rejected", per="why")


class ProxyStage:
    """Makes each connection's HeaderStage."""

    __slots__ = ("bounds", "version")

    def __init__(self, version: ProxyVersion, timeout: float) -> None:
        self.version = version
        self.bounds = (timeout,)

    def __call__(self, connection: Connection, entry: Receiver, transport: StreamTransport, staged: Staged) -> Receiver:
        return HeaderStage(Reader(self.version), connection, entry, transport, staged)


class HeaderStage:
    """What a connection's transport drives while its header comes: its Reader is fed what
    comes, until the header is whole (or refused: `reader` is None from then on)."""

    __slots__ = ("connection", "entry", "reader", "staged", "transport")

    def __init__(
        self, reader: Reader, connection: Connection, entry: Receiver, transport: StreamTransport, staged: Staged
    ) -> None:
        self.reader: Reader | None = reader
        self.connection = connection
        self.entry = entry
        self.transport = transport
        self.staged = staged

    def connection_made(self, transport: Any) -> None:
        """Never told: the stage is given its transport."""

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:  # refused, and closing
            return
        try:
            read = reader.feed(data)
        except InvalidHeader as exc:
            self._refuse(exc.reason)
            return
        if read is not None:
            self._read(*read)

    def eof_received(self) -> bool | None:
        reader = self.reader
        if reader is not None and reader.begun:
            self._refuse("closed before its header was whole")
        elif reader is not None:  # a peer that only connected (a plain TCP check): nothing to refuse
            self.reader = None
            if self.connection.observer is not None:
                self.connection.observer.ended_by("client closed")
            self.transport.close()
        return None

    def pause_writing(self) -> None:
        self.entry.pause_writing()

    def resume_writing(self) -> None:
        self.entry.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        # Cut short by this side, its time up; a reset is the peer's, counted as any reset is
        # (HAProxy resets its health checks: the header may be lost with the rest).
        if self.reader is not None and exc is None:
            self._refused("timeout")
        self.entry.connection_lost(exc)

    def _refuse(self, why: str) -> None:
        self._refused(why)
        self.transport.close()

    def _refused(self, why: str) -> None:
        self.reader = None
        connection = self.connection
        connection.recorder.rejected[PROXY_PROTOCOL] += 1
        _rejected(reason="proxy_protocol", why=why, **peer(connection.transport))
        if connection.observer is not None:
            connection.observer.ended_by(f"PROXY header refused: {why}")

    def _read(self, header: Header, rest: bytes) -> None:
        """The header is whole: its client, if the listener's rules let it in, is the connection's."""
        self.reader = None
        connection, transport = self.connection, self.transport
        balancer = peer_address(transport)
        client = header.source
        shown: dict[str, object] = {}
        if client is not None and isinstance(balancer, tuple):
            shown["via"] = host_port(balancer[0], balancer[1])
        admitted = connection.service.admission.admit_client(
            connection.ticket, balancer if client is None else client, connection.recorder, **shown
        )
        observer = connection.observer
        if observer is not None and client is not None:
            observer.note(**header.named(), **shown, **header.fields())
        if not admitted:
            if observer is not None:
                observer.ended_by("rejected")
            transport.close()
            return
        if client is not None:
            connection.proxied = header
        self.staged(rest, None)


def stage_for(listener: Listener) -> ProxyStage | None:
    """The stage of a listener with `proxy_protocol`; None for one without."""
    if listener.proxy_protocol is None:
        return None
    return ProxyStage(listener.proxy_protocol, listener.proxy_timeout)

"""TLS between a transport and what it drives, sans-IO: an `ssl.SSLObject` over two memory BIOs.

A `TLSLayer` is the protocol of a connection's transport (it is given the ciphertext) and the
transport of what the connection's owner drives (it is given the plaintext), as asyncio's own TLS
is, and as lifecycle.LoggedStream sits between a stream and its transport. It needs nothing of a
transport but its asyncio-shaped methods, so one class serves every model (the loop's transport,
a SelectorTransport, a BlockingTransport) and both sides of a relay; the handshake, and what
follows it, is its owner's (`established`): a server's stage (sockd.tls.stage) or a relay's
connection to a TLS upstream.

Unlike asyncio's, it can end its output and go on reading (`write_eof` sends a close_notify, as
TLS 1.3 allows): a relay passes a half-close through TLS as it passes one through TCP.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from sockd.config import BUFSIZE
from sockd.interfaces import Receiver, StreamTransport
from sockd.tls.failures import HandshakeCut, HandshakeEOF
from sockd.tls.identity import Identity

# What a failed handshake is told as: OpenSSL's reason, or the error itself.
Failure = ssl.SSLError | ssl.CertificateError | OSError | ValueError | None
# Told once, when the handshake ends: None if it succeeded, else why it failed (the layer is
# aborted after).
Established = Callable[["TLSLayer", Failure], None]

# The errors of a handshake or a read that end a TLS connection: OpenSSL's (bad records, alerts,
# verification), and what `ssl` raises beside them.
TLS_ERRORS = (ssl.SSLError, ssl.CertificateError, ValueError)


class TLSLayer:
    """One connection's TLS. `protocol` is what it drives with the plaintext, once the handshake
    is done; `transport` what carries the ciphertext; `established` is told how the handshake
    ended. Until then, what the peer sends waits in the incoming BIO, and nothing reaches
    `protocol` but the connection's loss."""

    __slots__ = (
        "established",
        "failure",
        "handshaking",
        "incoming",
        "input_ended",
        "outgoing",
        "output_ended",
        "peer",
        "peer_ended",
        "protocol",
        "reading",
        "tls",
        "transport",
    )

    transport: StreamTransport

    def __init__(
        self,
        context: ssl.SSLContext,
        protocol: Receiver,
        established: Established,
        *,
        server_hostname: str | None = None,
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_hostname is None, server_hostname=server_hostname
        )
        self.protocol = protocol
        self.established = established
        self.handshaking = True
        self.reading = True  # what `protocol` asked (pause_reading): plaintext waits in the BIOs meanwhile
        self.peer_ended = False  # the peer's TCP stream ended (see eof_received)
        self.input_ended = False  # `protocol` has been told of the end of the input
        self.output_ended = False  # a close_notify has gone, or the connection is ending: write no more
        self.failure: BaseException | None = None  # what ended an established connection, if TLS did
        # The peer's verified certificate's names, once its owner has read them (a stage that
        # verifies clients): read once, for the connection's log and a relay's PROXY header.
        self.peer: Identity | None = None

    def start(self, transport: StreamTransport) -> None:
        """Begin the handshake over `transport` (a client speaks first)."""
        self.transport = transport
        self._handshake()

    # -- as the transport's protocol

    def connection_made(self, transport: Any) -> None:
        self.start(transport)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.handshaking:
            self._handshake()
            return
        if not self.reading:
            return
        # The path of every request, written out as the loop of _read: one whole record come,
        # its plaintext passed on, and nothing left to read. A record's plaintext is shorter than
        # what came, so no more is asked for: a bytes object of BUFSIZE, shrunk after, would cost
        # a malloc and a realloc per request.
        incoming = self.incoming
        wanted = min(incoming.pending, BUFSIZE)
        try:
            plain = self.tls.read(wanted)
        except ssl.SSLWantReadError:  # a record not whole yet
            return
        except ssl.SSLZeroReturnError:  # see _read
            plain = b""
        except TLS_ERRORS as exc:  # not read again: a second read after an alert says b"", an end
            self._broken(exc)
            return
        # Less than was asked for: the record's plaintext was read whole, and OpenSSL holds no
        # more (it reads ahead no record: Python never sets read_ahead), so no tls.pending(),
        # which releases and takes back the GIL, to say so.
        if plain and not incoming.pending and (len(plain) < wanted or not self.tls.pending()):
            self.protocol.data_received(plain)
            if self.outgoing.pending:
                self._flush()
            return
        self._read(plain)

    def eof_received(self) -> bool | None:
        """The peer's TCP stream ended. Without a close_notify first: a truncation, told as an
        end all the same (as asyncio's TLS and most servers do)."""
        if self.handshaking:
            self._failed(HandshakeEOF())
            return None
        self.peer_ended = True
        if self.reading:
            self._read()
        return True

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.output_ended = True
        if self.handshaking:  # a reset, or this side's abort (see HandshakeCut)
            self.handshaking = False
            self.established(self, exc if isinstance(exc, OSError) else HandshakeCut())
        self.protocol.connection_lost(exc or self.failure)

    # -- the engine

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except TLS_ERRORS as exc:
            self._failed(exc)
            return
        self.handshaking = False
        self._flush()
        self.established(self, None)
        if not self.transport.is_closing() and self.reading:
            self._read()  # what came with the handshake's last flight

    def _failed(self, failure: Failure) -> None:
        """The handshake failed: the alert OpenSSL wrote goes out, then the connection ends."""
        self.handshaking = False
        self._flush()
        self.established(self, failure)
        self.transport.close()

    def _read(self, data: bytes | None = None) -> None:
        """Give `protocol` the plaintext the incoming BIO holds (after `data`, read already),
        while it reads."""
        tls, incoming, protocol = self.tls, self.incoming, self.protocol
        while self.reading:
            if data is None:
                try:
                    data = tls.read(BUFSIZE)
                except ssl.SSLWantReadError:
                    if not self.peer_ended:
                        break
                    data = b""  # all that came whole is read: the end (a record cut short is dropped)
                except ssl.SSLZeroReturnError:  # the peer's close_notify after ours (a half-close both ways)
                    data = b""
                except TLS_ERRORS as exc:
                    self._broken(exc)
                    return
            if not data:  # a close_notify, or the TCP stream's end
                self.reading, self.input_ended = False, True
                self._flush()
                if not protocol.eof_received():
                    self.close()
                return
            protocol.data_received(data)
            data = None
            # Nothing more come: done, without the exception of a read that finds nothing.
            if not incoming.pending and not tls.pending() and not self.peer_ended:
                break
        if self.outgoing.pending:  # a session ticket, a key update's answer
            self._flush()

    def _broken(self, exc: BaseException) -> None:
        """A bad record, or an alert from the peer: the connection is over (what OpenSSL wrote,
        an alert of its own, goes first)."""
        self.failure = exc
        self._flush()
        self.abort()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())

    # -- as the protocol's transport

    def write(self, data: bytes) -> None:
        if self.output_ended or not data:  # see close and abort
            return
        try:
            self.tls.write(data)
        except TLS_ERRORS as exc:  # OpenSSL's connection is over already (an alert it has read)
            self._broken(exc)
            return
        self.transport.write(self.outgoing.read())

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """End the output with a close_notify, and go on reading."""
        if not self.output_ended:
            self.output_ended = True
            try:
                self.tls.unwrap()
            except (ssl.SSLWantReadError, *TLS_ERRORS):
                pass  # it waits for the peer's close_notify, which reading will take in
            self._flush()

    def close(self) -> None:
        """Say close_notify, then close the transport once what is written has gone."""
        if not self.handshaking:
            self.write_eof()
        self.output_ended = True
        self.transport.close()

    def abort(self) -> None:
        self.output_ended = True
        self.transport.abort()

    def pause_reading(self) -> None:
        self.reading = False
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading or self.input_ended:
            return
        self.reading = True
        self.transport.resume_reading()
        if not self.handshaking and (self.incoming.pending or self.tls.pending() or self.peer_ended):
            self._read()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.tls
        if name == "peercert":
            return self.tls.getpeercert()
        if name == "cipher":
            return self.tls.cipher()
        return self.transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def set_protocol(self, protocol: Receiver) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Receiver:
        return self.protocol

"""How a TLS handshake can end without OpenSSL's word on it. Apart from sockd.tls.layer, which
mypyc compiles: a compiled class cannot subclass these built-in exceptions."""

from __future__ import annotations


class HandshakeEOF(ConnectionResetError):
    """The peer ended its connection before the handshake did."""

    def __init__(self) -> None:
        super().__init__("the peer closed the connection during the TLS handshake")


class HandshakeCut(ConnectionAbortedError):
    """This side ended the connection during the handshake: the only reason it does is that the
    handshake outlasted its timeout (see lifecycle.Timeouts)."""

    def __init__(self) -> None:
        super().__init__("the TLS handshake did not finish in time")

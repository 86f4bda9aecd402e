"""A TLS listener's stage (lifecycle.Service.stage): the handshake between a connection's opening
and its handler, then the TLSLayer stays between the two for the connection's life. Written once
for every model: each gives the stage the transport it made, whatever it is.

The handshake is bounded by its own deadline (lifecycle's Timeouts: the shorter of
handshake_timeout and first_byte_timeout, as nothing the handler sees has come yet; from the
end of a PROXY header, if one comes first), counted by
how it ended (counters.HANDSHAKE_RESULTS), and a failure said in one throttled warning with its
reason. A verified client's names go to the connection's log line, and, with `allow`, decide
whether it may in; they stay on its layer (`peer`), for a relay's PROXY header. A stream's
connection and a relay's are judged alike: the stage is given the lifecycle Connection and what
to call once it admits the client (`staged`: a Stream's own; a relay's, which connects the
upstream then)."""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING

from sockd.counters import CLIENT_CERT_REJECTED, HANDSHAKE_FAILED, HANDSHAKE_OK, HANDSHAKE_TIMEOUT
from sockd.interfaces import Receiver, StreamTransport
from sockd.logging import Throttled
from sockd.tls.contexts import stage_context
from sockd.tls.failures import HandshakeCut, HandshakeEOF
from sockd.tls.identity import Allowed, Identity
from sockd.tls.layer import Failure, TLSLayer

if TYPE_CHECKING:
    from sockd.config.schema import TLSConfig
    from sockd.lifecycle import Connection, Staged
    from sockd.spec import WorkerSpec

_failed = Throttled("TLS handshake failed", per="reason")
_refused = Throttled("TLS client refused: its certificate names none that `allow` lists", per="reason")

# OpenSSL's reasons for a handshake that failed on the client's certificate, not on the protocol.
CERTIFICATE_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"})


class TLSStage:
    """Makes each connection's TLSLayer and judges its handshake."""

    def __init__(self, context: ssl.SSLContext, tls: TLSConfig) -> None:
        self.context = context
        self.bounds = (tls.handshake_timeout,)
        self.verifies = tls.client_auth != "none"
        self.allowed = (
            None if tls.allow is None else Allowed(frozenset(tls.allow.cn), tuple(tls.allow.dns), tuple(tls.allow.uri))
        )

    def __call__(self, connection: Connection, entry: Receiver, transport: StreamTransport, staged: Staged) -> Receiver:
        began = time.monotonic()  # not the recorder's clock, which is 0 with metrics off

        def established(layer: TLSLayer, failure: Failure) -> None:
            if failure is None:
                self._admit(connection, layer, staged, began)
            else:
                self._failed(connection, failure, began)

        layer = TLSLayer(self.context, entry, established)
        layer.start(transport)
        return layer

    def _admit(self, connection: Connection, layer: TLSLayer, staged: Staged, began: float) -> None:
        client = layer.peer = Identity.of(layer.tls.getpeercert()) if self.verifies else None
        names = client.fields() if client is not None else {}
        observer = connection.observer
        if observer is not None:
            observer.note(tls=layer.tls.version(), **names)
        if self.allowed is not None and not self.allowed.admits(client):
            connection.recorder.handshake(CLIENT_CERT_REJECTED, began)
            _refused(reason="not allowed" if client is not None else "no certificate", **names)
            if observer is not None:
                observer.ended_by("client certificate refused")
            layer.close()
            return
        connection.recorder.handshake(HANDSHAKE_OK, began, layer.tls.version())
        staged(b"", layer)

    def _failed(self, connection: Connection, failure: Failure, began: float) -> None:
        result, reason = judged(failure, "client")
        connection.recorder.handshake(result, began)
        _failed(reason=reason, **connection.who())
        if connection.observer is not None:
            connection.observer.ended_by(f"TLS handshake failed: {reason}")


def judged(failure: Failure, by: str) -> tuple[int, str]:
    """How a handshake that failed is counted (counters.HANDSHAKE_RESULTS), and its reason in
    words; `by` is who the peer is, for the one that closed the connection."""
    if isinstance(failure, HandshakeCut):
        return HANDSHAKE_TIMEOUT, "timeout"
    if isinstance(failure, ssl.SSLCertVerificationError):
        return CLIENT_CERT_REJECTED, failure.verify_message
    if isinstance(failure, ssl.SSLError):
        why = failure.reason or failure.strerror or type(failure).__name__
        result = CLIENT_CERT_REJECTED if why in CERTIFICATE_REASONS else HANDSHAKE_FAILED
        return result, why.lower().replace("_", " ")
    if isinstance(failure, HandshakeEOF):
        return HANDSHAKE_FAILED, f"closed by the {by}"
    return HANDSHAKE_FAILED, str(failure)


def stage_for(spec: WorkerSpec) -> TLSStage | None:
    """The stage of a worker's listener: its TLS, if it has any."""
    context = stage_context(spec)
    if context is None or spec.listener.tls is None:
        return None
    return TLSStage(context, spec.listener.tls)

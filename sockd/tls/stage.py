"""A TLS listener's stage (lifecycle.Service.stage): the handshake between a connection's opening
and its handler, then the TLSLayer stays between the two for the connection's life. Written once
for every model: each gives the stage the transport it made, whatever it is.

The handshake is bounded by the connection's first deadline (lifecycle's Timeouts: the shorter of
handshake_timeout and first_byte_timeout, as nothing the handler sees has come yet), counted by
how it ended (counters.HANDSHAKE_RESULTS), and a failure said in one throttled warning with its
reason. A verified client's names go to the connection's log line, and, with `allow`, decide
whether it may in."""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING

import structlog

from sockd.config import Config
from sockd.counters import CLIENT_CERT_REJECTED, HANDSHAKE_FAILED, HANDSHAKE_OK, HANDSHAKE_TIMEOUT
from sockd.logging import Throttled
from sockd.tls.contexts import server_context
from sockd.tls.failures import HandshakeCut, HandshakeEOF
from sockd.tls.identity import Allowed, Identity
from sockd.tls.layer import Failure, TLSLayer
from sockd.tls.material import read_material
from sockd.transports import Receiver, StreamTransport, peer

if TYPE_CHECKING:
    from sockd.config.schema import TLSConfig
    from sockd.lifecycle import Stream
    from sockd.spec import WorkerSpec

log = structlog.get_logger()

_failed = Throttled("TLS handshake failed", per="reason")
_refused = Throttled("TLS client refused: its certificate names none that `allow` lists", per="reason")

# OpenSSL's reasons for a handshake that failed on the client's certificate, not on the protocol.
CERTIFICATE_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"})


class TLSStage:
    """Makes each connection's TLSLayer and judges its handshake."""

    def __init__(self, context: ssl.SSLContext, tls: TLSConfig) -> None:
        self.context = context
        self.verifies = tls.client_auth != "none"
        self.allowed = (
            None if tls.allow is None else Allowed(frozenset(tls.allow.cn), tuple(tls.allow.dns), tuple(tls.allow.uri))
        )

    def __call__(self, stream: Stream, entry: Receiver, transport: StreamTransport) -> Receiver:
        began = time.monotonic()  # not the recorder's clock, which is 0 with metrics off

        def established(layer: TLSLayer, failure: Failure) -> None:
            if failure is None:
                self._admit(stream, entry, layer, began)
            else:
                self._failed(stream, failure, began)

        layer = TLSLayer(self.context, entry, established)
        layer.start(transport)
        return layer

    def _admit(self, stream: Stream, entry: Receiver, layer: TLSLayer, began: float) -> None:
        peer = Identity.of(layer.tls.getpeercert()) if self.verifies else None
        observer = stream.observer
        if observer is not None:
            observer.note(tls=layer.tls.version(), **(peer.fields() if peer is not None else {}))
        if self.allowed is not None and not self.allowed.admits(peer):
            stream.recorder.handshake(CLIENT_CERT_REJECTED, began)
            _refused(reason="not allowed" if peer is not None else "no certificate", **(peer.fields() if peer else {}))
            if observer is not None:
                observer.ended_by("client certificate refused")
            layer.close()
            return
        stream.recorder.handshake(HANDSHAKE_OK, began, layer.tls.version())
        stream.staged(entry, b"", layer)

    def _failed(self, stream: Stream, failure: Failure, began: float) -> None:
        if isinstance(failure, HandshakeCut):
            result, reason = HANDSHAKE_TIMEOUT, "timeout"
        elif isinstance(failure, ssl.SSLCertVerificationError):
            result, reason = CLIENT_CERT_REJECTED, failure.verify_message
        elif isinstance(failure, ssl.SSLError):
            why = failure.reason or failure.strerror or type(failure).__name__
            result = CLIENT_CERT_REJECTED if why in CERTIFICATE_REASONS else HANDSHAKE_FAILED
            reason = why.lower().replace("_", " ")
        elif isinstance(failure, HandshakeEOF):
            result, reason = HANDSHAKE_FAILED, "closed by the client"
        else:
            result, reason = HANDSHAKE_FAILED, str(failure)
        stream.recorder.handshake(result, began)
        _failed(reason=reason, **peer(stream.transport))
        if stream.observer is not None:
            stream.observer.ended_by(f"TLS handshake failed: {reason}")


def stage_for(spec: WorkerSpec) -> TLSStage | None:
    """The stage of a worker's listener: its TLS, if it has any."""
    tls = spec.listener.tls
    if tls is None:
        return None
    # Until the spec carries the material the supervisor read: read here.
    material, _ = read_material(Config(listeners=[spec.listener]))
    server = material[spec.listener.name].server
    assert server is not None
    return TLSStage(server_context(tls, server), tls)

"""A server's TLSLayer in-process, through the TLS stage on test_lifecycle's recording transport:
whatever bytes come, in whatever pieces, a connection ends in one counted failure or waits for
more, and nothing raises; a real client's bytes, however cut, are echoed whole."""

from __future__ import annotations

import itertools
import ssl
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lifecycle import Recording, inet, made, service

from sockd.counters import HANDSHAKE_FAILED, HANDSHAKE_OK
from sockd.lifecycle import Stream
from sockd.tls.layer import TLSLayer
from sockd.tls.stage import TLSStage

from support import CA, SERVER_NAME, client_hello

# Fixtures made once for every example (they are not reset between them, and need not be).
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def stage(tls_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> TLSStage:
    files = tls_ca.server().write(tmp_path_factory.mktemp("layer"), "server")
    tls = inet(tls={"cert": str(files.cert), "key": str(files.key)}).tls
    assert tls is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    return TLSStage(context, tls)


@pytest.fixture(scope="module")
def client(tls_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_ca.write(tmp_path_factory.mktemp("client"))))


def connection(stage: TLSStage) -> tuple[Stream, Recording, TLSLayer]:
    """A connection opened on a TLS listener: its stream, its transport, and the layer the
    transport drives."""
    entry, transport = made(service(stage=stage))
    layer = transport.get_protocol()
    assert isinstance(layer, TLSLayer)
    return cast(Stream, entry), transport, layer


def written(transport: Recording) -> bytes:
    """What the server has written so far, taken from the record."""
    data = b"".join(action[1] for action in transport.recorded if isinstance(action, tuple))
    transport.recorded = [action for action in transport.recorded if not isinstance(action, tuple)]
    return data


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


HELLO = client_hello()
# Any bytes; and a real ClientHello's beginning (or the whole of it) followed by any bytes, so
# that the handshake gets past its first record before it meets what it cannot take.
NOT_A_HANDSHAKE = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda cut, tail: HELLO[:cut] + tail, st.integers(0, len(HELLO)), st.binary(max_size=1024)),
)
CUTS = st.lists(st.integers(0, 1 << 16), max_size=12)


@EXAMPLES
@given(data=NOT_A_HANDSHAKE, cuts=CUTS)
def test_any_bytes_in_any_pieces_end_in_one_counted_failure_or_wait(
    stage: TLSStage, data: bytes, cuts: list[int]
) -> None:
    stream, transport, layer = connection(stage)
    for piece in pieces(data, cuts):
        if transport.is_closing():  # a closed transport delivers nothing more
            break
        layer.data_received(piece)
        ended = sum(stream.recorder.handshakes)
        assert ended == ("close" in transport.recorded), transport.recorded  # failed and closed, or waiting
    if not transport.is_closing():
        layer.eof_received()  # the client gives up: a handshake cut short is a failure too
    layer.connection_lost(None)
    assert stream.recorder.handshakes[HANDSHAKE_FAILED] == 1
    assert sum(stream.recorder.handshakes) == 1
    assert stream.recorder.totals().requests == 0  # nothing reached the handler


@EXAMPLES
@given(request=st.binary(min_size=1, max_size=40000), cuts=CUTS, garbage=st.binary(min_size=4, max_size=64))
def test_a_clients_bytes_cut_anywhere_are_echoed_whole_and_garbage_after_ends_the_connection(
    stage: TLSStage, client: ssl.SSLContext, request: bytes, cuts: list[int], garbage: bytes
) -> None:
    stream, transport, layer = connection(stage)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
    for _ in range(4):  # the client's flights, each cut into pieces, and the server's answers
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            done = False
        else:
            done = True
        for piece in pieces(outgoing.read(), cuts):
            layer.data_received(piece)
        incoming.write(written(transport))
        if done:
            break
    assert stream.recorder.handshakes[HANDSHAKE_OK] == 1
    peer.write(request)
    for piece in pieces(outgoing.read(), cuts):
        layer.data_received(piece)
    incoming.write(written(transport))
    echoed = b""
    while len(echoed) < len(request):
        try:
            echoed += peer.read(1 << 16)
        except ssl.SSLWantReadError:
            break
    assert echoed == request
    # A record of no type TLS has (a header is five bytes): the connection ends, and nothing raises.
    layer.data_received(b"\x00" + garbage)
    assert "abort" in transport.recorded

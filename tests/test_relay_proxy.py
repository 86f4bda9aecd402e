"""handler: relay with upstream_proxy_protocol, in both relay drivers (uvloop's and the standard
loop's asyncio too): the PROXY header an upstream of the test's reads byte for byte before
anything else (from a tcp or a unix listener, before a tls:// upstream's ClientHello, with the SSL
TLVs of a TLS listener's verified client, and naming the client a balancer's header named); a
second sockd behind the relay, reading the header, logs the first one's client; and the real
HAProxy, `accept-proxy`, names the client it learnt in its log. The expected headers are built
by support.proxy, not by sockd's writer."""

from __future__ import annotations

import queue
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
from test_relay import DRIVERS, upstream
from test_relay_tls import Certificates, certs, tls_listener

from support import (
    SERVER_NAME,
    STDLIB_LOOP,
    TIMEOUT,
    VERSIONS,
    Launcher,
    accepting_proxy,
    client_context,
    connect,
    inet,
    model_options,
    read_to_eof,
    recv_exactly,
)
from support import listener as entry
from support.proxy import LOCAL_HEADER, SERVER, header

__all__ = ["certs"]  # the fixture, shared with test_relay_tls

LOOPS = [*DRIVERS, STDLIB_LOOP]  # asyncio's sock_sendall is the loop's own: uvloop's, then the standard one's
SIGNATURE = LOCAL_HEADER[:12]
GREETING = b"the upstream speaks first"
TRUSTED: dict[str, Any] = {"proxy_trusted": ["127.0.0.1/32"]}


def relay_to(model: str, target: str, version: str, where: str | Path = "127.0.0.1", **options: Any) -> dict[str, Any]:
    concurrency, loop = model_options(model)
    protocol = "tcp" if where == "127.0.0.1" else "unix"
    return entry(
        "r", protocol, "relay", concurrency, where, upstream=target, upstream_proxy_protocol=version, **loop, **options
    )


def read_header(conn: socket.socket) -> bytes:
    """A PROXY header, framed as the spec has it, and nothing after it: v1 to its CRLF (at most
    107 bytes), v2 to the end of the length its 16th byte gives. Read a byte at a time until
    which it is shows, as the shortest v1 (`PROXY UNKNOWN\\r\\n`) is shorter than v2's 16."""
    start = b""
    while SIGNATURE.startswith(start) and len(start) < len(SIGNATURE):
        start += recv_exactly(conn, 1)
    if start == SIGNATURE:
        start += recv_exactly(conn, 4)
        return start + recv_exactly(conn, struct.unpack("!H", start[14:16])[0])
    while not start.endswith(b"\r\n") and len(start) < 107:
        start += recv_exactly(conn, 1)
    return start


def naming(version: str, client: socket.socket, listener: str, tlvs: bytes = b"") -> bytes:
    """The header that names `client`, connected to the relay's `listener` (both on loopback)."""
    return header(version, ("127.0.0.1", client.getsockname()[1]), ("127.0.0.1", inet(listener)[1]), tlvs)


class Heard:
    """An upstream of the test's: what it read, the header, then the client's bytes to their end."""

    def __init__(self) -> None:
        self.headers: queue.Queue[bytes] = queue.Queue()
        self.rests: queue.Queue[bytes] = queue.Queue()

    def serve(self, conn: socket.socket) -> None:
        """Greet once the header is in, before the client says anything: the header came at
        connect, not with the client's first bytes."""
        self.headers.put(read_header(conn))
        conn.sendall(GREETING)
        self.rests.put(read_to_eof(conn))

    def header(self) -> bytes:
        return self.headers.get(timeout=TIMEOUT)

    def rest(self) -> bytes:
        return self.rests.get(timeout=TIMEOUT)


def greeted(client: socket.socket) -> None:
    assert recv_exactly(client, len(GREETING)) == GREETING


# -- an upstream of the test's, reading the raw bytes


@pytest.mark.parametrize("model", LOOPS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_tcp_client_is_named_to_the_upstream_before_anything_else(
    start_sockd: Launcher, model: str, version: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        daemon = start_sockd([relay_to(model, server.url, version)])
        address = daemon.address("r")
        with connect(address) as client:
            greeted(client)
            client.sendall(b"and then the client")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b""
            assert heard.header() == naming(version, client, address)
        assert heard.rest() == b"and then the client"


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize(("version", "expected"), [("v1", b"PROXY UNKNOWN\r\n"), ("v2", LOCAL_HEADER)])
def test_a_unix_client_has_no_address_to_name_so_the_upstream_uses_its_own(
    start_sockd: Launcher, sockdir: Path, model: str, version: str, expected: bytes
) -> None:
    heard = Heard()
    with upstream(heard.serve, sockdir / "up") as server:
        daemon = start_sockd([relay_to(model, server.url, version, sockdir / "r")])
        with connect(daemon.address("r")) as client:
            greeted(client)
            client.sendall(b"from a unix client")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b""
        assert (heard.header(), heard.rest()) == (expected, b"from a unix client")


@pytest.mark.parametrize("model", LOOPS)
def test_the_header_goes_before_a_tls_upstreams_client_hello(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certs.server.cert, certs.server.key)
    heard = Heard()

    def serve(conn: socket.socket) -> None:
        heard.headers.put(read_header(conn))  # in plaintext, on the TCP connection
        with server_side.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(GREETING)
            heard.rests.put(tls.recv(1024))

    with upstream(serve) as server:
        target = server.url.replace("tcp://", "tls://")
        options = {"upstream_ca": str(certs.ca), "upstream_server_name": SERVER_NAME}
        daemon = start_sockd([relay_to(model, target, "v2", **options)])
        address = daemon.address("r")
        with connect(address) as client:
            greeted(client)
            client.sendall(b"through TLS")
            assert heard.header() == naming("v2", client, address)
        assert heard.rest() == b"through TLS"


@pytest.mark.parametrize("model", LOOPS)
@pytest.mark.parametrize(("incoming", "outgoing"), [("v1", "v2"), ("v2", "v1"), ("local", "v2")])
def test_the_client_a_balancer_named_is_the_one_named_to_the_upstream(
    start_sockd: Launcher, model: str, incoming: str, outgoing: str
) -> None:
    heard = Heard()
    named = ("192.0.2.7", 51000)
    with upstream(heard.serve) as server:
        options = {"proxy_protocol": "any", **TRUSTED}
        daemon = start_sockd([relay_to(model, server.url, outgoing, **options)])
        address = daemon.address("r")
        with connect(address) as balancer:
            # The balancer's header and its client's first bytes, in one segment, as HAProxy sends them.
            said = LOCAL_HEADER if incoming == "local" else header(incoming, named)
            balancer.sendall(said + b"the client's first bytes")
            balancer.shutdown(socket.SHUT_WR)
            greeted(balancer)
            assert read_to_eof(balancer) == b""
            # A health check of the balancer's names no client: the balancer's connection is the client.
            expected = naming(outgoing, balancer, address) if incoming == "local" else header(outgoing, named, SERVER)
            assert heard.header() == expected
        assert heard.rest() == b"the client's first bytes"


# -- a TLS listener's client, described by the SSL TLVs


def ssl_tlv(client: int, verify: int, version: str, cn: bytes | None) -> bytes:
    """PP2_TYPE_SSL as the spec's section 2.2.6 lays it out, written out here by hand."""
    inner = struct.pack("!BI", client, verify) + b"\x21" + struct.pack("!H", len(version)) + version.encode()
    if cn is not None:
        inner += b"\x22" + struct.pack("!H", len(cn)) + cn
    return b"\x20" + struct.pack("!H", len(inner)) + inner


def relaying_tls(model: str, target: str, certs: Certificates, **tls: Any) -> dict[str, Any]:
    """A TLS listener relaying with v2; a client certificate, with client_auth, is verified by the tests' CA."""
    if "client_auth" in tls:
        tls["client_ca"] = str(certs.ca)
    return tls_listener(model, target, certs, tls=tls, upstream_proxy_protocol="v2")


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_verified_client_certificates_cn_and_the_tls_version_reach_the_upstream(
    start_sockd: Launcher, certs: Certificates, model: str, version: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        tls = {"client_auth": "required", "alpn": ["h2", "http/1.1"]}
        daemon = start_sockd([relaying_tls(model, server.url, certs, **tls)])
        address = daemon.address("r")
        context = client_context(certs.ca, version, certs.client)
        context.set_alpn_protocols(["http/1.1"])
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME) as client:
            greeted(client)
            # PP2_CLIENT_SSL | CERT_CONN | CERT_SESS, verify 0; the chosen ALPN after the SSL TLV.
            tlvs = ssl_tlv(0x07, 0, VERSIONS[version][2], b"relay-client") + b"\x01\x00\x08http/1.1"
            assert heard.header() == naming("v2", client, address, tlvs)


@pytest.mark.parametrize("model", DRIVERS)
def test_a_client_without_a_certificate_is_said_to_be_unverified(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        daemon = start_sockd([relaying_tls(model, server.url, certs, client_auth="optional")])
        address = daemon.address("r")
        with client_context(certs.ca, "1.3").wrap_socket(connect(address), server_hostname=SERVER_NAME) as client:
            greeted(client)
            assert heard.header() == naming("v2", client, address, ssl_tlv(0x01, 1, "TLSv1.3", None))


@pytest.mark.parametrize("model", DRIVERS)
def test_a_resumed_session_says_the_certificate_came_with_the_session_not_the_connection(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        daemon = start_sockd([relaying_tls(model, server.url, certs, client_auth="required")])
        address = daemon.address("r")
        context = client_context(certs.ca, "1.3", certs.client)
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME) as first:
            greeted(first)  # TLS 1.3's tickets came before it
            session = first.session
        heard.header()
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME, session=session) as client:
            greeted(client)
            assert client.session_reused
            assert heard.header() == naming("v2", client, address, ssl_tlv(0x05, 0, "TLSv1.3", b"relay-client"))


# -- a second sockd behind the relay, reading the header


def echo_reading(version: str, **options: Any) -> dict[str, Any]:
    return entry("e", "tcp", "echo", "asyncio", proxy_protocol=version, log_connections=True, **TRUSTED, **options)


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_sockd_behind_the_relay_logs_the_relays_client(start_sockd: Launcher, model: str, version: str) -> None:
    behind = start_sockd([echo_reading(version)])
    front = start_sockd([relay_to(model, f"tcp://{behind.address('e')}", version)])
    with connect(front.address("r")) as client:
        client.sendall(b"who am I")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b"who am I"
        mine = client.getsockname()[1]
    line = behind.wait_for("connection closed")
    assert (line["source"], line["port"], line["bytes_in"]) == ("127.0.0.1", mine, len(b"who am I"))
    assert line["via"].startswith("127.0.0.1:")  # the relay's own connection


@pytest.mark.parametrize("model", DRIVERS)
def test_a_sockd_behind_a_tls_relay_logs_the_alpn_its_client_chose(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    behind = start_sockd([echo_reading("v2")])
    front = start_sockd([relaying_tls(model, f"tcp://{behind.address('e')}", certs, alpn=["http/1.1"])])
    context = client_context(certs.ca, "1.3")
    context.set_alpn_protocols(["http/1.1"])
    with context.wrap_socket(connect(front.address("r")), server_hostname=SERVER_NAME) as client:
        client.sendall(b"over TLS")
        assert recv_exactly(client, len(b"over TLS")) == b"over TLS"
        mine = client.getsockname()[1]
    line = behind.wait_for("connection closed")
    assert (line["source"], line["port"], line["alpn"]) == ("127.0.0.1", mine, "http/1.1")


# -- the real HAProxy as the upstream


def echo_once(conn: socket.socket) -> None:
    conn.sendall(read_to_eof(conn))


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_behind_the_relay_learns_the_client_and_the_address_it_reached(
    start_sockd: Launcher, tmp_path: Path, model: str, version: str
) -> None:
    with upstream(echo_once) as echo, accepting_proxy(tmp_path, echo.url.removeprefix("tcp://")) as (port, log):
        daemon = start_sockd([relay_to(model, f"tcp://127.0.0.1:{port}", version)])
        address = daemon.address("r")
        with connect(address) as client:
            client.sendall(b"through haproxy")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"through haproxy"
            mine = client.getsockname()[1]
        line = log.get(timeout=TIMEOUT)
    assert line == f"client=127.0.0.1:{mine} reached={address}"


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_takes_a_unix_clients_header_and_keeps_the_connections_own_addresses(
    start_sockd: Launcher, tmp_path: Path, sockdir: Path, model: str, version: str
) -> None:
    with upstream(echo_once) as echo, accepting_proxy(tmp_path, echo.url.removeprefix("tcp://")) as (port, log):
        daemon = start_sockd([relay_to(model, f"tcp://127.0.0.1:{port}", version, sockdir / "r")])
        with connect(daemon.address("r")) as client:
            client.sendall(b"from a unix client")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"from a unix client"
        line = log.get(timeout=TIMEOUT)
    # The relay's own connection: from loopback, to HAProxy's own port.
    assert line.startswith("client=127.0.0.1:"), line
    assert line.endswith(f" reached=127.0.0.1:{port}"), line

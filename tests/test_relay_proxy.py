"""handler: relay with upstream_proxy_protocol, in both relay drivers (uvloop's and the standard
loop's asyncio too): the PROXY header an upstream of the test's reads byte for byte before
anything else (from a tcp or a unix listener, before a tls:// upstream's ClientHello, and with
the SSL TLVs of a TLS listener's verified client), and the real HAProxy, `accept-proxy`,
naming the client it learnt in its log."""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
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
    client_context,
    connect,
    inet,
    model_options,
    read_to_eof,
    recv_exactly,
    require,
)
from support import listener as entry

__all__ = ["certs"]  # the fixture, shared with test_relay_tls

LOOPS = [*DRIVERS, STDLIB_LOOP]  # asyncio's sock_sendall is the loop's own: uvloop's, then the standard one's
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL_UNSPEC = SIGNATURE + b"\x20\x00\x00\x00"
GREETING = b"the upstream speaks first"


def relay_to(model: str, target: str, version: str, where: str | Path = "127.0.0.1", **options: Any) -> dict[str, Any]:
    concurrency, loop = model_options(model)
    protocol = "tcp" if where == "127.0.0.1" else "unix"
    return entry(
        "r", protocol, "relay", concurrency, where, upstream=target, upstream_proxy_protocol=version, **loop, **options
    )


def read_header(conn: socket.socket) -> bytes:
    """A PROXY header, framed as the spec has it, and nothing after it: v1 to its CRLF (at most
    107 bytes), v2 to the end of the length its 16th byte gives. Read a byte at a time until
    which it is shows, as the shortest v1 (`PROXY UNKNOWN\r\n`) is shorter than v2's 16."""
    start = b""
    while SIGNATURE.startswith(start) and len(start) < 12:
        start += recv_exactly(conn, 1)
    if start == SIGNATURE:
        start += recv_exactly(conn, 4)
        return start + recv_exactly(conn, struct.unpack("!H", start[14:16])[0])
    while not start.endswith(b"\r\n") and len(start) < 107:
        start += recv_exactly(conn, 1)
    return start


def expected_v1(client: socket.socket, listener: str) -> bytes:
    return b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (client.getsockname()[1], inet(listener)[1])


def expected_v2(client: socket.socket, listener: str, tlvs: bytes = b"") -> bytes:
    block = socket.inet_aton("127.0.0.1") * 2 + struct.pack("!HH", client.getsockname()[1], inet(listener)[1])
    return SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(block) + len(tlvs)) + block + tlvs


class Heard:
    """What an upstream of the test read: the header, then the client's bytes to their end."""

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


def exchange(address: str, payload: bytes) -> None:
    """Connect, wait for the upstream's greeting, send `payload` and end; the upstream's end follows."""
    with connect(address) as client:
        assert recv_exactly(client, len(GREETING)) == GREETING
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b""


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
            assert recv_exactly(client, len(GREETING)) == GREETING
            client.sendall(b"and then the client")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b""
            expected = expected_v1(client, address) if version == "v1" else expected_v2(client, address)
    assert heard.header() == expected
    assert heard.rest() == b"and then the client"


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize(("version", "expected"), [("v1", b"PROXY UNKNOWN\r\n"), ("v2", LOCAL_UNSPEC)])
def test_a_unix_client_has_no_address_to_name_so_the_upstream_uses_its_own(
    start_sockd: Launcher, sockdir: Path, model: str, version: str, expected: bytes
) -> None:
    heard = Heard()
    with upstream(heard.serve, sockdir / "up") as server:
        daemon = start_sockd([relay_to(model, server.url, version, sockdir / "r")])
        exchange(daemon.address("r"), b"from a unix client")
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
            assert recv_exactly(client, len(GREETING)) == GREETING
            client.sendall(b"through TLS")
            expected = expected_v2(client, address)
    assert (heard.header(), heard.rest()) == (expected, b"through TLS")


# -- a TLS listener's client, described by the SSL TLVs


def ssl_tlv(client: int, verify: int, version: str, cn: bytes | None) -> bytes:
    """PP2_TYPE_SSL as the spec's section 2.2.6 lays it out, written out here by hand."""
    inner = struct.pack("!BI", client, verify) + b"\x21" + struct.pack("!H", len(version)) + version.encode()
    if cn is not None:
        inner += b"\x22" + struct.pack("!H", len(cn)) + cn
    return b"\x20" + struct.pack("!H", len(inner)) + inner


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_verified_client_certificates_cn_and_the_tls_version_reach_the_upstream(
    start_sockd: Launcher, certs: Certificates, model: str, version: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        tls = {"client_auth": "required", "client_ca": str(certs.ca), "alpn": ["h2", "http/1.1"]}
        daemon = start_sockd([tls_listener(model, server.url, certs, tls=tls, upstream_proxy_protocol="v2")])
        address = daemon.address("r")
        context = client_context(certs.ca, version, certs.client)
        context.set_alpn_protocols(["http/1.1"])
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME) as client:
            assert recv_exactly(client, len(GREETING)) == GREETING
            client.sendall(b"verified")
            name = VERSIONS[version][2]
            # PP2_CLIENT_SSL | CERT_CONN | CERT_SESS, verify 0; the chosen ALPN after the SSL TLV.
            tlvs = ssl_tlv(0x07, 0, name, b"relay-client") + b"\x01\x00\x08http/1.1"
            assert heard.header() == expected_v2(client, address, tlvs)


@pytest.mark.parametrize("model", DRIVERS)
def test_a_client_without_a_certificate_is_said_to_be_unverified(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        tls = {"client_auth": "optional", "client_ca": str(certs.ca)}
        daemon = start_sockd([tls_listener(model, server.url, certs, tls=tls, upstream_proxy_protocol="v2")])
        address = daemon.address("r")
        with client_context(certs.ca, "1.3").wrap_socket(connect(address), server_hostname=SERVER_NAME) as client:
            assert recv_exactly(client, len(GREETING)) == GREETING
            client.sendall(b"anonymous")
            assert heard.header() == expected_v2(client, address, ssl_tlv(0x01, 1, "TLSv1.3", None))


@pytest.mark.parametrize("model", DRIVERS)
def test_a_resumed_session_says_the_certificate_came_with_the_session_not_the_connection(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    heard = Heard()
    with upstream(heard.serve) as server:
        tls = {"client_auth": "required", "client_ca": str(certs.ca)}
        daemon = start_sockd([tls_listener(model, server.url, certs, tls=tls, upstream_proxy_protocol="v2")])
        address = daemon.address("r")
        context = client_context(certs.ca, "1.3", certs.client)
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME) as first:
            assert recv_exactly(first, len(GREETING)) == GREETING  # TLS 1.3's tickets came before it
            session = first.session
        heard.header()
        with context.wrap_socket(connect(address), server_hostname=SERVER_NAME, session=session) as client:
            assert recv_exactly(client, len(GREETING)) == GREETING
            assert client.session_reused
            assert heard.header() == expected_v2(client, address, ssl_tlv(0x05, 0, "TLSv1.3", b"relay-client"))


# -- the real HAProxy as the upstream


@contextlib.contextmanager
def haproxy_accepting_proxy(directory: Path, backend: str) -> Iterator[tuple[int, queue.Queue[str]]]:
    """HAProxy in the foreground, its frontend reading a PROXY header (v1 or v2, `accept-proxy`)
    on a loopback socket the test made and hands it (`bind fd@N`: no port to race other tests
    for), in front of `backend` (host:port): its port, and each connection's log line as it ends,
    naming the client and the address it reached as HAProxy learnt them."""
    with socket.create_server(("127.0.0.1", 0)) as front:
        port = front.getsockname()[1]
        config = directory / "haproxy.cfg"
        config.write_text(
            "global\n    log stdout format raw local0\n    nbthread 1\n"
            "defaults\n    mode tcp\n    log global\n"
            "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
            f"frontend in\n    bind fd@{front.fileno()} accept-proxy\n"
            '    log-format "client=%ci:%cp reached=%fi:%fp"\n    default_backend out\n'
            f"backend out\n    server s {backend}\n"
        )
        with (directory / "haproxy.err").open("w") as errors:
            process = subprocess.Popen(
                [require("haproxy"), "-db", "-f", str(config)],
                pass_fds=(front.fileno(),),
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in process.stdout or ():
                lines.put(line.strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield port, lines
        finally:
            process.terminate()
            process.wait(TIMEOUT)
            reader.join(TIMEOUT)
            if process.stdout is not None:
                process.stdout.close()


def echo_once(conn: socket.socket) -> None:
    conn.sendall(read_to_eof(conn))


@pytest.mark.parametrize("model", DRIVERS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_behind_the_relay_learns_the_client_and_the_address_it_reached(
    start_sockd: Launcher, tmp_path: Path, model: str, version: str
) -> None:
    with upstream(echo_once) as echo, haproxy_accepting_proxy(tmp_path, echo.url.removeprefix("tcp://")) as (port, log):
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
    with upstream(echo_once) as echo, haproxy_accepting_proxy(tmp_path, echo.url.removeprefix("tcp://")) as (port, log):
        daemon = start_sockd([relay_to(model, f"tcp://127.0.0.1:{port}", version, sockdir / "r")])
        with connect(daemon.address("r")) as client:
            client.sendall(b"from a unix client")
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == b"from a unix client"
        line = log.get(timeout=TIMEOUT)
    # The relay's own connection: from loopback, to HAProxy's own port.
    assert line.startswith("client=127.0.0.1:"), line
    assert line.endswith(f" reached=127.0.0.1:{port}"), line

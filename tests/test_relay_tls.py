"""handler: relay with TLS on either side, against real peers: a `tls` listener in front of a
plaintext upstream (socat's and openssl's TLS clients), a plaintext listener in front of a tls://
upstream (socat's TLS server), each in the two relay drivers. Half-close passes through TLS: a
client that ends its output still gets every byte back, as the far side saw the end (a
close_notify, or the TCP stream's end) and went on answering."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_relay import DRIVERS, digest, hash_to_eof, listening, send_then_shut, stream, unused_port, upstream

from support import (
    CA,
    SERVER_NAME,
    TIMEOUT,
    Daemon,
    Files,
    Launcher,
    connect,
    eventually,
    read_to_eof,
    recv_exactly,
    require,
    samples,
    value,
)
from support import listener as entry

SIZE = 8 << 20
# busy_poll runs the selector's driver, spinning a core meanwhile: it is tested where that is short.
CHEAP = [*DRIVERS, "busy_poll"]


@dataclass(frozen=True)
class Certificates:
    """The tests' CA, a server certificate it issued (for SERVER_NAME and the loopback addresses),
    and a client certificate it issued (CN relay-client)."""

    ca: Path
    server: Files
    client: Files


@pytest.fixture(scope="module")
def certs(tls_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("certs")
    return Certificates(
        tls_ca.write(directory),
        tls_ca.server().write(directory, "server"),
        tls_ca.client("relay-client").write(directory, "client"),
    )


@contextlib.contextmanager
def tls_echo(certs: Certificates, *, require_client_certificate: bool = False) -> Iterator[int]:
    """socat's TLS server echoing what it reads (through a pipe), until the end of its input, then
    ending its own; on a port of its own. Its blocks are at most PIPE_BUF (-b 4096), or a write
    into its own full pipe would block it for good; -t gives the other way time to drain."""
    port = unused_port()
    verify = f"verify=1,cafile={certs.ca}" if require_client_certificate else "verify=0"
    listen = (
        f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={certs.server.cert},key={certs.server.key},{verify}"
    )
    process = subprocess.Popen([require("socat"), "-b", "4096", "-t", str(TIMEOUT), listen, "PIPE"])
    try:
        eventually(lambda: listening(port), "socat listening", timeout=TIMEOUT)
        yield port
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def echo_to_eof(conn: socket.socket) -> None:
    """A plaintext upstream: it echoes until the client's end reaches it, then ends too."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def counted(daemon: Daemon, name: str, **labels: str) -> float:
    return value(samples(daemon), name, listener="r", **labels)


def relays_to_tls(start_sockd: Launcher, model: str, port: int, **options: Any) -> Daemon:
    return start_sockd([entry("r", "tcp", "relay", model, upstream=f"tls://127.0.0.1:{port}", **options)])


# -- a plaintext listener in front of a tls:// upstream


@pytest.mark.parametrize("model", DRIVERS)
def test_eight_mebibytes_reach_a_tls_upstream_and_come_back_after_a_half_close(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    with tls_echo(certs) as port:
        daemon = relays_to_tls(start_sockd, model, port, upstream_ca=str(certs.ca), upstream_server_name=SERVER_NAME)
        with connect(daemon.address("r"), timeout=TIMEOUT * 3) as client:
            sender = threading.Thread(target=send_then_shut, args=(client, 1, SIZE))
            sender.start()
            # The upstream ends only once our end reached it, as a close_notify: it went on
            # answering after it, to the last byte.
            back = hash_to_eof(client)
            sender.join(TIMEOUT)
    assert back == (SIZE, digest(1, SIZE))
    eventually(lambda: counted(daemon, "sockd_sent_bytes_total") == SIZE, "the bytes back counted")
    assert counted(daemon, "sockd_errors_total", kind="upstream") == 0


@pytest.mark.parametrize("model", CHEAP)
@pytest.mark.parametrize("failing", ["wrong-name", "unknown-ca"])
def test_an_upstream_that_fails_verification_refuses_the_client_as_a_refused_upstream(
    start_sockd: Launcher, certs: Certificates, model: str, failing: str
) -> None:
    if failing == "wrong-name":
        options = {"upstream_ca": str(certs.ca), "upstream_server_name": "wrong.example"}
        why = "Hostname mismatch, certificate is not valid for 'wrong.example'"
    else:  # no upstream_ca: the system's CAs, which know nothing of the tests' CA
        options, why = {}, "unable to get local issuer certificate"
    with tls_echo(certs) as port:
        daemon = relays_to_tls(start_sockd, model, port, **options)
        with connect(daemon.address("r")) as client, contextlib.suppress(ConnectionResetError):
            client.sendall(b"never relayed")
            assert client.recv(1) == b""
        warning = daemon.wait_for("upstream failed")
    assert why in warning["error"], warning
    assert warning["error"].startswith("TLS handshake failed: ")
    eventually(lambda: counted(daemon, "sockd_errors_total", kind="upstream") == 1, "counted as the upstream's")


@pytest.mark.parametrize("model", CHEAP)
@pytest.mark.parametrize("presented", [True, False], ids=["with-certificate", "without"])
def test_the_relay_shows_its_client_certificate_to_an_upstream_that_requires_one(
    start_sockd: Launcher, certs: Certificates, model: str, presented: bool
) -> None:
    mine = {"upstream_cert": str(certs.client.cert), "upstream_key": str(certs.client.key)} if presented else {}
    with tls_echo(certs, require_client_certificate=True) as port:
        daemon = relays_to_tls(start_sockd, model, port, upstream_ca=str(certs.ca), **mine)
        with connect(daemon.address("r")) as client:
            client.sendall(b"who goes there")
            client.shutdown(socket.SHUT_WR)
            answer = b""
            with contextlib.suppress(ConnectionResetError):  # its upstream failed as it was relaying
                answer = read_to_eof(client)
    if presented:
        assert answer == b"who goes there"
        return
    # TLS 1.3: the upstream refuses the certificate it did not get after the relay's handshake is
    # done; its alert ends the connection before any answer.
    assert answer == b""
    eventually(lambda: counted(daemon, "sockd_errors_total", kind="upstream") == 1, "counted as the upstream's")


# -- a `tls` listener in front of a plaintext upstream


def tls_listener(model: str, target: str, certs: Certificates, **options: Any) -> dict[str, Any]:
    tls = {"cert": str(certs.server.cert), "key": str(certs.server.key), **options.pop("tls", {})}
    return entry("r", "tcp", "relay", model, upstream=target, tls=tls, **options)


@pytest.mark.parametrize("model", DRIVERS)
def test_socat_through_a_tls_listener_gets_eight_mebibytes_back_after_a_half_close(
    start_sockd: Launcher, certs: Certificates, tmp_path: Path, model: str
) -> None:
    sent = tmp_path / "sent"
    with sent.open("wb") as out:
        for chunk in stream(3, SIZE):
            out.write(chunk)
    with upstream(echo_to_eof) as server:
        daemon = start_sockd([tls_listener(model, server.url, certs, log_connections=True)])
        port = daemon.address("r").rsplit(":", 1)[1]
        # At the end of its input, socat ends its output (a close_notify) and reads on (-t).
        client = f"OPENSSL:127.0.0.1:{port},cafile={certs.ca},commonname={SERVER_NAME}"
        with sent.open("rb") as stdin:
            done = subprocess.run(
                [require("socat"), "-t", str(TIMEOUT), "-", client],
                stdin=stdin,
                capture_output=True,
                timeout=TIMEOUT * 3,
                check=False,
            )
    assert done.returncode == 0, done.stderr
    assert (len(done.stdout), hashlib.sha256(done.stdout).hexdigest()) == (SIZE, digest(3, SIZE))
    line = daemon.wait_for("connection closed")
    assert (line["tls"], line["bytes_in"], line["bytes_out"], line["requests"]) == ("TLSv1.3", SIZE, SIZE, 1)
    eventually(lambda: counted(daemon, "sockd_tls_handshakes_total", result="ok") == 1, "the handshake counted")
    assert counted(daemon, "sockd_tls_sessions_total", version="TLSv1.3") == 1


@pytest.mark.parametrize("model", CHEAP)
def test_openssl_s_client_through_a_tls_listener_gets_the_upstreams_answer(
    start_sockd: Launcher, certs: Certificates, model: str
) -> None:
    question = bytes(range(256)) * 64  # 16 KiB, a whole TLS record's worth

    def answer(conn: socket.socket) -> None:
        conn.sendall(recv_exactly(conn, len(question))[::-1])  # then it closes

    with upstream(answer) as server:
        daemon = start_sockd([tls_listener(model, server.url, certs)])
        host, port = daemon.address("r").rsplit(":", 1)
        # -quiet reads on after the end of its input, until the relay passes the upstream's end on.
        command = [require("openssl"), "s_client", "-quiet", "-connect", f"{host}:{port}", "-CAfile", str(certs.ca)]
        done = subprocess.run(command, input=question, capture_output=True, timeout=TIMEOUT, check=False)
    assert done.stdout == question[::-1], done.stderr


@pytest.mark.parametrize("model", CHEAP)
@pytest.mark.parametrize("client", ["plaintext", "silent", "not-allowed"])
def test_a_client_its_handshake_does_not_let_in_never_reaches_the_upstream(
    start_sockd: Launcher, certs: Certificates, model: str, client: str
) -> None:
    reached: list[socket.socket] = []
    options: dict[str, Any] = {"handshake_timeout": 0.5}
    if client == "not-allowed":  # a certificate the CA signed, whose names `allow` does not list
        options.update(client_ca=str(certs.ca), client_auth="required", allow={"cn": ["someone-else"]})
    with upstream(reached.append) as server:
        daemon = start_sockd([tls_listener(model, server.url, certs, tls=options, log_connections=True)])
        host, port = daemon.address("r").rsplit(":", 1)
        if client == "not-allowed":
            s_client = [require("openssl"), "s_client", "-connect", f"{host}:{port}", "-CAfile", str(certs.ca)]
            s_client += ["-cert", str(certs.client.cert), "-key", str(certs.client.key)]
            subprocess.run(s_client, input=b"let me in", capture_output=True, timeout=TIMEOUT, check=False)
        else:
            with connect(daemon.address("r")) as sock, contextlib.suppress(ConnectionResetError):
                if client == "plaintext":
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                read_to_eof(sock)  # an alert at most, then the end: after handshake_timeout, if silent
        result = {"plaintext": "failed", "silent": "timeout", "not-allowed": "client_cert_rejected"}[client]
        eventually(lambda: counted(daemon, "sockd_tls_handshakes_total", result=result) == 1, f"counted {result}")
        line = daemon.wait_for("connection closed")
    assert reached == []
    assert line["requests"] == 0
    found = samples(daemon)
    assert value(found, "sockd_requests_total", listener="r") == 0
    assert value(found, "sockd_errors_total", listener="r", kind="upstream") == 0

"""TLS listeners with real peers, under every model: `openssl s_client` and `socat OPENSSL:` get
their bytes back byte-exact over TLS 1.2 and 1.3, clients hold a connection for many requests, the
timestamp and daytime handlers answer over TLS, a client that sends far more than it reads gets it
all back, a stop ends a session with a close_notify; SNI picks the certificate, min_version refuses
an older client; and handshakes that stall half-way are ended after handshake_timeout while others
are served. (Client certificates, `allow`, CRLs and what a handshake logs: test_tls_stage.py; the
layer in-process: test_tls_layer.py.)"""

from __future__ import annotations

import datetime
import os
import select
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_peers import STREAM_SIZES, assert_echoes, run_peer

from support import (
    CA,
    MODELS,
    SERVER_NAME,
    STDLIB_LOOP,
    TIMEOUT,
    VERSIONS,
    Daemon,
    Files,
    Launcher,
    StartSockd,
    TLSSession,
    client_context,
    client_hello,
    connect,
    eventually,
    handshakes,
    inet,
    model_options,
    options_for,
    presented,
    require,
    s_client,
    s_client_session,
    short_directory,
    tls_request,
    tls_sessions,
    verifying,
)
from support import listener as entry

# What one s_client connection carries, request after request: a byte, sizes around a TLS
# record's 16 KiB, and one of several records (under a pipe's 64 KiB: see SClient.exchange).
S_CLIENT_SIZES = [1, 100, 4096, 16383, 16384, 16385, 60000] * 3


# Socket buffers of the flooding client and of the listener it floods (the kernel doubles them).
SMALL_BUFFER = 1 << 16
# More than those buffers and the server's HIGH_WATER hold: the server's replies back up until it
# stops reading, and the client's sending blocks until it reads.
FLOOD = 8 << 20


def tls_of(files: Files, **options: Any) -> dict[str, Any]:
    """A listener's `tls` block for a certificate's files."""
    return {"cert": str(files.cert), "key": str(files.key), **options}


@pytest.fixture(scope="module")
def pki(tls_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The CA file a client trusts, and a listener's `tls` block for a server certificate it issued."""
    directory = tmp_path_factory.mktemp("pki")
    return tls_ca.write(directory), tls_of(tls_ca.server().write(directory, "server"))


@pytest.fixture(scope="module", params=[*MODELS, STDLIB_LOOP])
def served(
    request: pytest.FixtureRequest, start_module_sockd: Launcher, pki: tuple[Path, dict[str, Any]]
) -> Iterator[Daemon]:
    """One daemon per model, serving echo over TCP and Unix, timestamp and daytime, and echo with
    small socket buffers, all over TLS."""
    model, options = model_options(request.param)
    _, tls = pki
    options = options_for(model, tls=tls, **options)
    with short_directory() as directory:
        daemon = start_module_sockd(
            [
                entry("echo", "tcp", "echo", model, **options),
                entry("unix-echo", "unix", "echo", model, directory / "e.sock", **options),
                entry("stamp", "tcp", "timestamp", model, **options),
                entry("daytime", "tcp", "daytime", model, **options),
                entry(
                    "small-buffers", "tcp", "echo", model, recv_buffer=SMALL_BUFFER, send_buffer=SMALL_BUFFER, **options
                ),
            ]
        )
        yield daemon
        assert daemon.stop() == 0


def counted_session(daemon: Daemon, name: str, version: str, before: float) -> None:
    """One more session of `version` counted than `before`: the handshake agreed on it."""
    metric = VERSIONS[version][2]
    eventually(lambda: tls_sessions(daemon, name, metric) == before + 1, f"one more {metric} session on {name}")


@pytest.mark.parametrize("version", VERSIONS)
def test_s_client_holds_one_connection_for_many_requests_each_echoed_byte_exact(
    served: Daemon, pki: tuple[Path, dict[str, Any]], version: str
) -> None:
    ca, _ = pki
    before = tls_sessions(served, "echo", VERSIONS[version][2])
    with s_client_session(served.address("echo"), *verifying(ca), VERSIONS[version][0]) as client:
        for number, size in enumerate(S_CLIENT_SIZES):
            payload = os.urandom(size)
            assert client.exchange(payload) == payload, f"request {number} ({size} bytes)"
        code, said = client.close()
    assert code == 0, said
    counted_session(served, "echo", version, before)


@pytest.mark.parametrize("version", VERSIONS)
def test_socat_gets_its_bytes_back_byte_exact_and_its_half_close_ends_the_session(
    served: Daemon, pki: tuple[Path, dict[str, Any]], version: str
) -> None:
    ca, _ = pki
    socat = require("socat")
    name = VERSIONS[version][2].replace("v", "")  # socat's TLS1.2
    before = tls_sessions(served, "echo", VERSIONS[version][2])
    # At the end of its input socat ends its side of the TLS session (a close_notify) and waits
    # for the rest of the echo; sockd closes once it has echoed all, and socat exits 0.
    address = (
        f"OPENSSL:{served.address('echo')},cafile={ca},commonname={SERVER_NAME},"
        f"openssl-min-proto-version={name},openssl-max-proto-version={name}"
    )
    command = [socat, "-t", "10", "-T", "20", "-", address]
    assert_echoes(lambda payload: run_peer(command, input=payload), STREAM_SIZES)
    eventually(
        lambda: tls_sessions(served, "echo", VERSIONS[version][2]) == before + len(STREAM_SIZES),
        f"a {version} session per socat run",
    )


@pytest.mark.parametrize("name", ["echo", "unix-echo"])
def test_clients_at_once_each_hold_a_connection_for_many_requests(
    served: Daemon, pki: tuple[Path, dict[str, Any]], name: str
) -> None:
    ca, _ = pki
    address, failures = served.address(name), []

    def client(number: int) -> None:
        version = list(VERSIONS)[number % len(VERSIONS)]
        try:
            session = TLSSession(address, f"client {number}", client_context(ca, version))
            try:
                for turn in range(50):
                    session.exchange(1 + (number * 997 + turn * 331) % 20000)
            finally:
                session.close()
        except (OSError, AssertionError) as exc:
            failures.append(f"client {number} over TLS {version}: {exc!r}")

    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    assert failures == []


def flood(address: str, context: ssl.SSLContext, payload: bytes) -> tuple[bytes, bool]:
    """Send `payload`, reading nothing back while the server takes it, then read what has come
    whenever it takes no more: what came back, and whether sending ever blocked."""
    raw = socket.socket()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # before connecting, for the TCP window
        raw.setsockopt(socket.SOL_SOCKET, option, SMALL_BUFFER)
    raw.settimeout(TIMEOUT)
    raw.connect(inet(address))
    with context.wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
        sock.setblocking(False)
        unsent, received, blocked = memoryview(payload), bytearray(), False
        deadline = time.monotonic() + 60
        while len(received) < len(payload) and time.monotonic() < deadline:
            if unsent:
                try:
                    # A retry after a blocked send is of the same bytes, as OpenSSL requires.
                    unsent = unsent[sock.send(unsent[:65536]) :]
                    continue
                except (ssl.SSLWantWriteError, BlockingIOError):
                    blocked = True
            try:
                chunk = sock.recv(1 << 20)
            except (ssl.SSLWantReadError, BlockingIOError):
                select.select([sock], [sock] if unsent else [], [], 1)
                continue
            if not chunk:
                break
            received += chunk
    return bytes(received), blocked


@pytest.mark.parametrize("version", VERSIONS)
def test_a_client_sending_far_more_than_it_reads_gets_every_byte_back_once_it_reads(
    served: Daemon, pki: tuple[Path, dict[str, Any]], version: str
) -> None:
    ca, _ = pki
    payload = os.urandom(FLOOD)
    echoed, blocked = flood(served.address("small-buffers"), client_context(ca, version), payload)
    assert blocked  # the server stopped reading while its replies waited
    assert len(echoed) == len(payload)
    assert echoed == payload


def test_the_timestamp_handler_answers_over_tls_and_closes(served: Daemon, pki: tuple[Path, dict[str, Any]]) -> None:
    ca, _ = pki
    # -quiet: s_client ignores the end of its input, and ends with the server's close.
    done = s_client(served.address("stamp"), *verifying(ca), "-quiet", input=b"what time is it?\n")
    assert done.returncode == 0, done.stderr
    stamp = datetime.datetime.strptime(done.stdout.decode(), "%Y-%m-%d %H:%M:%S.%f")
    assert abs(stamp - datetime.datetime.now()) < datetime.timedelta(minutes=1)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_daytime_handler_greets_over_tls_and_closes(
    served: Daemon, pki: tuple[Path, dict[str, Any]], version: str
) -> None:
    ca, _ = pki
    said = tls_request(served.address("daytime"), client_context(ca, version), b"").decode()
    assert said.endswith("\r\n"), said
    day = datetime.datetime.strptime(said.rsplit("-", 1)[0], "%A, %B %d, %Y %H:%M:%S")
    assert abs(day - datetime.datetime.now()) < datetime.timedelta(minutes=1)


def test_sni_picks_the_certificate_of_the_name_asked_for(start_sockd: StartSockd, tls_ca: CA, tmp_path: Path) -> None:
    default, other = tls_ca.server(), tls_ca.server("other.example", common_name="other")
    sni = {"other.example": tls_of(other.write(tmp_path, "other"))}
    daemon = start_sockd(
        [entry("echo", "tcp", "echo", "asyncio", tls=tls_of(default.write(tmp_path, "default"), sni=sni))]
    )
    ca = tls_ca.write(tmp_path)

    def serial(*options: str) -> int:
        done = s_client(daemon.address("echo"), "-CAfile", str(ca), "-verify_return_error", *options)
        assert done.returncode == 0, done.stderr
        return int(presented(done.stdout).serial_number)

    assert serial("-servername", "other.example") == other.serial
    assert serial("-servername", "OTHER.example.") == other.serial  # names compare as DNS does
    assert serial("-servername", SERVER_NAME) == default.serial
    assert serial("-servername", "unknown.example") == default.serial
    assert serial("-noservername") == default.serial


def test_min_version_1_3_refuses_a_tls_1_2_client_and_counts_it_failed(
    start_sockd: StartSockd, tls_ca: CA, tmp_path: Path
) -> None:
    files = tls_ca.server().write(tmp_path, "server")
    daemon = start_sockd([entry("echo", "tcp", "echo", "selector", tls=tls_of(files, min_version="1.3"))])
    ca, address = tls_ca.write(tmp_path), daemon.address("echo")
    refused = s_client(address, *verifying(ca), "-tls1_2", input=b"hello")
    assert refused.returncode != 0
    assert b"protocol version" in refused.stderr, refused.stderr
    eventually(lambda: handshakes(daemon, "echo", "failed") == 1, "the TLS 1.2 handshake counted failed")
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        tls_request(address, client_context(ca, "1.2"), b"hello")
    session = TLSSession(address, "1.3", client_context(ca, "1.3"))
    session.exchange()
    session.close()
    eventually(lambda: handshakes(daemon, "echo", "ok") == 1, "the TLS 1.3 handshake counted ok")
    assert (handshakes(daemon, "echo", "failed"), tls_sessions(daemon, "echo", "TLSv1.2")) == (2, 0)


# Handshakes begun and left half-way at once: with the worker's other descriptors they fit under
# the default descriptor limit, which the daemon is run under (`prlimit --nofile=1024`). Their
# timeout is what opening them all and serving a good client take with room to spare on a busy
# machine (nearly 2 s, with busy_poll's spinning workers on both cores), so that they are all
# still held once it is served.
STALLED = 500
STALL_TIMEOUT = 5.0


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset a non-blocking connection (nothing is sent
    to a handshake left half-way: a byte would be a TLS alert, which means it ended). Python
    waits out a socket's timeout before any recv, MSG_DONTWAIT or not: hence non-blocking."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# The models whose every connection waits on its own, so that a stalled handshake holds up no other.
STALLING = [
    "asyncio",
    "selector",
    "busy_poll",
    "threaded",
    pytest.param(
        "iterative",
        marks=pytest.mark.skip(
            reason="iterative serves one connection at a time by design: a stalled handshake holds up "
            "the next client, as a silent plaintext one does"
        ),
    ),
    pytest.param(
        "thread_pool",
        marks=pytest.mark.skip(
            reason="thread_pool serves as many connections at once as it has threads: stalled "
            "handshakes hold them all until their timeout"
        ),
    ),
]


@pytest.mark.parametrize("model", STALLING)
def test_handshakes_stalled_half_way_are_ended_after_handshake_timeout_while_others_are_served(
    start_sockd: StartSockd, tls_ca: CA, tmp_path: Path, model: str
) -> None:
    files = tls_ca.server().write(tmp_path, "server")
    tls = tls_of(files, handshake_timeout=STALL_TIMEOUT)
    daemon = start_sockd([entry("echo", "tcp", "echo", model, tls=tls)], prefix=("prlimit", "--nofile=1024", "--"))
    ca, address, hello = tls_ca.write(tmp_path), daemon.address("echo"), client_hello()
    half = hello[: len(hello) // 2]  # a handshake begun that will not go on
    stalled = []
    try:
        for _ in range(STALLED):
            sock = connect(address)
            sock.sendall(half)
            sock.setblocking(False)
            stalled.append(sock)
        good = TLSSession(address, "good", client_context(ca))
        for _ in range(10):
            good.exchange(100)
        # Served while every stalled handshake is held: none of them held the good client up.
        assert all(still_open(sock) for sock in stalled)
        good.close()
        eventually(lambda: not any(still_open(sock) for sock in stalled), "every stalled handshake ended", 30)
        eventually(lambda: handshakes(daemon, "echo", "timeout") == STALLED, f"{STALLED} handshakes timed out")
        assert (handshakes(daemon, "echo", "ok"), handshakes(daemon, "echo", "failed")) == (1, 0)
        after = TLSSession(address, "after", client_context(ca))
        after.exchange(100)
        after.close()
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("model", MODELS)
def test_a_stop_ends_an_idle_tls_session_with_a_close_notify(
    start_sockd: StartSockd, tls_ca: CA, tmp_path: Path, model: str
) -> None:
    files = tls_ca.server().write(tmp_path, "server")
    daemon = start_sockd([entry("echo", "tcp", "echo", model, tls=tls_of(files))], shutdown_timeout=60)
    context = client_context(tls_ca.write(tmp_path))
    # A TCP end without a close_notify first would raise (SSLEOFError), not read as the end.
    with context.wrap_socket(
        connect(daemon.address("echo"), timeout=30), server_hostname=SERVER_NAME, suppress_ragged_eofs=False
    ) as idle:
        idle.sendall(b"ping")
        assert idle.recv(16) == b"ping"
        daemon.process.send_signal(signal.SIGTERM)
        assert idle.recv(16) == b""  # the drain ends the session; it does not hang
    assert daemon.process.wait(30) == 0


# A handshake_timeout short enough to wait out a few times over in a test.
SHORT = 0.5


@pytest.mark.parametrize("model", MODELS)
def test_a_handshake_trickled_a_byte_at_a_time_is_ended_after_handshake_timeout(
    start_sockd: StartSockd, tls_ca: CA, tmp_path: Path, model: str
) -> None:
    files = tls_ca.server().write(tmp_path, "server")
    daemon = start_sockd([entry("echo", "tcp", "echo", model, tls=tls_of(files, handshake_timeout=SHORT))])
    hello, sent = client_hello(), 0
    with connect(daemon.address("echo")) as sock:
        sock.setblocking(False)  # see still_open
        # Each byte comes well within the timeout, but the whole hello would take many times it:
        # the timeout bounds the handshake, not each read, so the server ends it first.
        while sent < len(hello) and still_open(sock):
            sock.sendall(hello[sent : sent + 1])
            sent += 1
            time.sleep(SHORT / 5)
    assert sent < len(hello)
    eventually(lambda: handshakes(daemon, "echo", "timeout") == 1, "the trickled handshake counted timeout")


@pytest.mark.parametrize("model", MODELS)
def test_after_its_handshake_a_client_waits_for_first_byte_timeout_not_handshake_timeout(
    start_sockd: StartSockd, tls_ca: CA, tmp_path: Path, model: str
) -> None:
    files = tls_ca.server().write(tmp_path, "server")
    daemon = start_sockd([entry("echo", "tcp", "echo", model, tls=tls_of(files, handshake_timeout=SHORT))])
    session = TLSSession(daemon.address("echo"), "slow to ask", client_context(tls_ca.write(tmp_path)))
    time.sleep(4 * SHORT)  # no first_byte_timeout: it may wait as long as it likes
    session.exchange()
    session.close()

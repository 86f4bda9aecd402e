"""handler: relay, in every model that can relay, held to socat's behaviour: the same tests run
against `socat TCP-LISTEN,fork TCP:upstream` as the reference."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import (
    MODELS,
    RELAY_MODELS,
    TIMEOUT,
    Daemon,
    Launcher,
    alive,
    connect,
    eventually,
    inet,
    read_to_eof,
    require,
    rss_bytes,
    run_sockd,
    samples,
    server_inode,
    value,
)
from support import listener as entry

NON_RELAY_MODELS = [model for model in MODELS if model not in RELAY_MODELS]
# The two relay drivers (busy_poll runs the selector's, spinning a core meanwhile).
DRIVERS = ["selector", "asyncio"]
EX_CONFIG = 78
CHUNK = 1 << 16


class Upstream:
    """A TCP or Unix server run by the test, playing the far side: each connection is handed to
    `serve` in a thread of its own."""

    def __init__(self, serve: Callable[[socket.socket], None], path: Path | None = None) -> None:
        if path is None:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(str(path))
            self.url = f"unix://{path}"
        self.sock.listen(64)
        self.serve = serve
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        # Until the test closes the socket (see close), however long the relay takes to start and
        # connect: a timeout here once stopped the accepting while a busy machine still started the
        # daemon, and the relay's connection waited in the backlog, never served.
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            with conn:
                self.serve(conn)
        except BaseException as exc:  # reported by the test through `errors`
            self.errors.append(exc)

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the thread (close() alone would leave it there,
        # holding the listening socket open), which then ends with an OSError.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(TIMEOUT)


@contextlib.contextmanager
def upstream(serve: Callable[[socket.socket], None], path: Path | None = None) -> Iterator[Upstream]:
    server = Upstream(serve, path)
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, server.errors


@contextlib.contextmanager
def relay(
    kind: str, start_sockd: Launcher, target: str, half_close_timeout: float = 6 * TIMEOUT
) -> Iterator[tuple[str, Daemon | None]]:
    """A relay to `target` (an upstream URL), listening on loopback TCP: sockd in a model, or socat
    (whose -t is half_close_timeout). By default the half-close timeout is longer than any wait of
    a test: a test that does not time it must not depend on how soon a busy machine lets its
    upstream answer (a busy_poll relay once gave up on an upstream quiet for 5 s in CI)."""
    if kind != "socat":
        daemon = start_sockd([entry("r", "tcp", "relay", kind, upstream=target, half_close_timeout=half_close_timeout)])
        yield daemon.address("r"), daemon
        return
    port = unused_port()
    far = target.replace("tcp://", "TCP:").replace("unix://", "UNIX-CONNECT:")
    process = subprocess.Popen(
        [require("socat"), "-t", str(half_close_timeout), f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", far]
    )
    try:
        eventually(lambda: listening(port), "socat listening", timeout=TIMEOUT)
        yield f"127.0.0.1:{port}", None
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def unused_port() -> int:
    """A loopback TCP port free a moment ago, for a config that must name it before it starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    # Asked of the kernel, not by connecting: socat would relay a probe to the upstream.
    shown = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return bool(shown.stdout.strip())


def stream(seed: int, size: int) -> Iterator[bytes]:
    """`size` pseudo-random bytes in chunks, the same for the same seed."""
    generator = random.Random(seed)
    for start in range(0, size, CHUNK):
        yield generator.randbytes(min(CHUNK, size - start))


def digest(seed: int, size: int) -> str:
    hashed = hashlib.sha256()
    for chunk in stream(seed, size):
        hashed.update(chunk)
    return hashed.hexdigest()


def send_then_shut(sock: socket.socket, seed: int, size: int) -> None:
    for chunk in stream(seed, size):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)


def hash_to_eof(sock: socket.socket) -> tuple[int, str]:
    hashed, size = hashlib.sha256(), 0
    while chunk := sock.recv(CHUNK):
        hashed.update(chunk)
        size += len(chunk)
    return size, hashed.hexdigest()


KINDS = [*RELAY_MODELS, "socat"]
SIZE = 100 << 20


@pytest.mark.parametrize("kind", KINDS)
def test_a_hundred_mebibytes_each_way_at_once_arrive_intact(start_sockd: Launcher, kind: str) -> None:
    far: list[tuple[int, str]] = []

    def serve(conn: socket.socket) -> None:
        sender = threading.Thread(target=send_then_shut, args=(conn, 2, SIZE))
        sender.start()
        far.append(hash_to_eof(conn))
        sender.join(TIMEOUT * 6)

    with (
        upstream(serve) as server,
        relay(kind, start_sockd, server.url) as (address, daemon),
        connect(address, timeout=TIMEOUT * 6) as client,
    ):
        sender = threading.Thread(target=send_then_shut, args=(client, 1, SIZE))
        sender.start()
        near = hash_to_eof(client)
        sender.join(TIMEOUT * 6)
    assert near == (SIZE, digest(2, SIZE))
    eventually(lambda: bool(far), "the upstream read to its end")
    assert far == [(SIZE, digest(1, SIZE))]
    if daemon is not None:  # both directions counted
        eventually(lambda: value(samples(daemon), "sockd_received_bytes_total", listener="r") == SIZE, "bytes in")
        assert value(samples(daemon), "sockd_sent_bytes_total", listener="r") == SIZE


@pytest.mark.parametrize("kind", KINDS)
def test_the_client_ends_first_and_still_gets_the_answer(start_sockd: Launcher, kind: str) -> None:
    def serve(conn: socket.socket) -> None:
        question = read_to_eof(conn)  # the client's end reached the upstream as EOF
        conn.sendall(b"answer to " + question)

    with upstream(serve) as server, relay(kind, start_sockd, server.url) as (address, _), connect(address) as client:
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b"answer to question"


@pytest.mark.parametrize("kind", KINDS)
def test_the_upstream_ends_first_and_still_gets_the_clients_words(start_sockd: Launcher, kind: str) -> None:
    heard: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"hello, then nothing more")
        conn.shutdown(socket.SHUT_WR)
        heard.append(read_to_eof(conn))

    with upstream(serve) as server, relay(kind, start_sockd, server.url) as (address, _), connect(address) as client:
        assert read_to_eof(client) == b"hello, then nothing more"  # the upstream's end passed on
        client.sendall(b"still talking")  # the other way is still open
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b""
    eventually(lambda: heard == [b"still talking"], "the client's words reached the upstream")


@pytest.mark.parametrize("model", DRIVERS)
def test_a_relayed_connection_is_one_request_timed_over_its_life(start_sockd: Launcher, model: str) -> None:
    def serve(conn: socket.socket) -> None:
        while data := conn.recv(CHUNK):
            conn.sendall(data)

    with upstream(serve) as server:
        daemon = start_sockd([entry("r", "tcp", "relay", model, upstream=server.url)])
        for _ in range(3):
            with connect(daemon.address("r")) as client:
                for word in (b"one", b"two"):  # two exchanges, one connection: one request
                    client.sendall(word)
                    assert client.recv(10) == word
                time.sleep(0.2)  # its life, which its duration measures
                client.shutdown(socket.SHUT_WR)
                assert read_to_eof(client) == b""

        def counted() -> bool:
            return value(samples(daemon), "sockd_connections_active", listener="r") == 0 and (
                value(samples(daemon), "sockd_requests_total", listener="r") == 3
            )

        eventually(counted, "three relayed connections, three requests")
        found = samples(daemon)
        assert value(found, "sockd_request_duration_seconds_count", listener="r") == 3
        assert value(found, "sockd_request_duration_seconds_sum", listener="r") >= 0.6
        assert value(found, "sockd_received_bytes_total", listener="r") == 18
        assert value(found, "sockd_sent_bytes_total", listener="r") == 18


@pytest.mark.parametrize("model", DRIVERS)
def test_each_reply_a_udp_relay_passes_back_is_a_request(start_sockd: Launcher, model: str) -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as far, socket.socket(type=socket.SOCK_DGRAM) as client:
        far.bind(("127.0.0.1", 0))
        far.settimeout(TIMEOUT)
        client.settimeout(TIMEOUT)
        daemon = start_sockd([entry("u", "udp", "relay", model, upstream=f"udp://127.0.0.1:{far.getsockname()[1]}")])
        relay_address = inet(daemon.address("u"))
        for word in (b"one", b"two"):
            client.sendto(word, relay_address)
            data, sender = far.recvfrom(100)
            far.sendto(b"re: " + data, sender)
            assert client.recvfrom(100) == (b"re: " + word, relay_address)
        client.sendto(b"unanswered", relay_address)
        assert far.recvfrom(100)[0] == b"unanswered"

        def counted() -> bool:
            found = samples(daemon)
            return value(found, "sockd_received_bytes_total", listener="u") == 16

        eventually(counted, "the three datagrams counted")
        found = samples(daemon)
        assert value(found, "sockd_requests_total", listener="u") == 2  # the replies, not the datagrams
        assert value(found, "sockd_request_duration_seconds_count", listener="u") == 2
        assert value(found, "sockd_sent_bytes_total", listener="u") == 14


@pytest.mark.parametrize("kind", KINDS)
def test_half_close_timeout_ends_a_side_that_goes_quiet(start_sockd: Launcher, kind: str) -> None:
    def serve(conn: socket.socket) -> None:
        conn.shutdown(socket.SHUT_WR)  # the upstream ends at once
        read_to_eof(conn)  # and waits for the relay to end its side

    with (
        upstream(serve) as server,
        relay(kind, start_sockd, server.url, half_close_timeout=0.5) as (address, _),
        connect(address) as client,
    ):
        assert read_to_eof(client) == b""
        ends = client.getsockname()[:2], client.getpeername()[:2]
        for _ in range(15):  # talking the other way, for three times half_close_timeout: kept open
            client.sendall(b"still here")
            time.sleep(0.1)
        # Then quiet: the relay gives up on it. Watched, not probed: a word now would be talk.
        eventually(lambda: server_inode(*ends) in (None, "0"), "the relay let go of its end")

        def closed() -> bool:
            try:
                client.sendall(b"are you there?")
            except (BrokenPipeError, ConnectionResetError):
                return True
            return False

        eventually(closed, "the relay closed the connection")


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_upstream_closes_the_client_at_once(start_sockd: Launcher, kind: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        target = f"tcp://127.0.0.1:{closed.getsockname()[1]}"
        with (
            relay(kind, start_sockd, target) as (address, daemon),
            connect(address) as client,
            contextlib.suppress(ConnectionResetError),
        ):
            assert client.recv(1) == b""
    if daemon is not None:
        eventually(lambda: value(samples(daemon), "sockd_errors_total", listener="r", kind="upstream") == 1, "counted")


@pytest.mark.parametrize("kind", KINDS)
def test_an_upstream_that_closes_mid_stream_ends_the_client(start_sockd: Launcher, kind: str) -> None:
    def serve(conn: socket.socket) -> None:
        conn.recv(10)
        conn.sendall(b"partial")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset

    with upstream(serve) as server, relay(kind, start_sockd, server.url) as (address, _), connect(address) as client:
        client.sendall(b"0123456789" * 100)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            received = read_to_eof(client)
        assert b"partial".startswith(received) or received == b"partial"


@pytest.mark.parametrize("model", RELAY_MODELS)
def test_unix_to_tcp_and_tcp_to_unix(start_sockd: Launcher, sockdir: Path, model: str) -> None:
    def serve(conn: socket.socket) -> None:
        conn.sendall(read_to_eof(conn)[::-1])

    with upstream(serve) as tcp_server, upstream(serve, sockdir / "up.sock") as unix_server:
        daemon = start_sockd(
            [
                entry("from-unix", "unix", "relay", model, sockdir / "r.sock", upstream=tcp_server.url),
                entry("to-unix", "tcp", "relay", model, upstream=unix_server.url),
            ]
        )
        for name in ("from-unix", "to-unix"):
            with connect(daemon.address(name)) as client:
                client.sendall(b"stressed")
                client.shutdown(socket.SHUT_WR)
                assert read_to_eof(client) == b"desserts", name


@pytest.mark.parametrize("model", NON_RELAY_MODELS)
def test_models_that_cannot_relay_are_refused(tmp_path: Path, model: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: r, protocol: tcp, host: 127.0.0.1, port: 0, handler: relay, concurrency: {model},\n"
        "     upstream: 'tcp://127.0.0.1:9'}\n"
    )
    result = run_sockd("--check", "-c", str(config))
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        f"{config}:2: listeners[0].concurrency: handler: relay needs concurrency: selector, busy_poll or asyncio"
        f" (not {model})\n"
    )


@pytest.mark.parametrize("model", RELAY_MODELS)
@pytest.mark.parametrize("slow", ["client", "upstream"])
def test_a_side_that_never_reads_stops_the_other_not_the_memory(start_sockd: Launcher, model: str, slow: str) -> None:
    sent: list[int] = []
    held_back = threading.Event()

    def flood(sock: socket.socket) -> None:
        total = 0
        sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            for _ in range(4096):  # at most 256 MiB: far more than any buffer on the way
                total += sock.send(bytes(CHUNK))
        sent.append(total)
        held_back.set()

    def serve(conn: socket.socket) -> None:
        if slow == "client":
            flood(conn)
        else:  # reads nothing while the client floods it, however long a busy machine takes
            held_back.wait(6 * TIMEOUT)

    with upstream(serve) as server:
        daemon = start_sockd([entry("r", "tcp", "relay", model, upstream=server.url)])
        pid = daemon.worker_pid("r")
        before = rss_bytes(pid)
        with connect(daemon.address("r")) as client:
            if slow == "upstream":
                flood(client)
            else:
                # As long as the flood takes to fill every buffer on the way (tens of MiB through
                # a relay that a busy machine may run slowly): held back is what is asserted below.
                eventually(lambda: bool(sent), "the upstream was stopped", timeout=6 * TIMEOUT)
            grown = rss_bytes(pid) - before
    assert sent[0] < 64 << 20, sent  # the flood was held back: nobody took it all in
    assert grown < 16 << 20, grown


@pytest.mark.parametrize("model", DRIVERS)
def test_relays_looping_into_each_other_are_capped_and_unwind(start_sockd: Launcher, model: str) -> None:
    """a relays to b and b to a (what --check cannot see): one client's connection would go round
    until the workers' descriptors ran out. The cap refuses a hop first, the loop unwinds back to
    the client, and once it has left nothing stays open."""
    port_a, port_b = unused_port(), unused_port()
    daemon = start_sockd(
        [
            {**entry("a", "tcp", "relay", model, upstream=f"tcp://127.0.0.1:{port_b}"), "port": port_a},
            {**entry("b", "tcp", "relay", model, upstream=f"tcp://127.0.0.1:{port_a}"), "port": port_b},
        ],
        prefix=("prlimit", "--nofile=1024"),
    )
    workers = {name: daemon.worker_pid(name) for name in "ab"}

    def refused() -> float:
        found = samples(daemon)
        return sum(
            value(found, "sockd_connections_rejected_total", listener=name, reason="relay_connections") for name in "ab"
        )

    def active() -> float:
        found = samples(daemon)
        return sum(value(found, "sockd_connections_active", listener=name) for name in "ab")

    def counted(done: int) -> bool:
        return refused() >= done

    for round_ in range(1, 3):  # the second: the workers serve on, undamaged, as they did the first
        with connect(daemon.address("a")) as client:
            client.sendall(b"round and round")
            with contextlib.suppress(ConnectionResetError):
                read_to_eof(client)  # the refused hop's end, passed back along the loop
        # Both as published (every PUBLISH_INTERVAL): a read right after the client's EOF may
        # still show the counts of before this round.
        eventually(functools.partial(counted, round_), "the refused hop counted")
        eventually(lambda: active() == 0, "every relayed connection closed")
    assert {name: daemon.worker_pid(name) for name in "ab"} == workers
    assert all(alive(pid) for pid in workers.values())
    daemon.wait_for("rejected", reason="relay_connections")

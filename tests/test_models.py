"""Every model serves every protocol and handler correctly, through the running daemon."""

from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import itertools
import os
import random
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_handlers import rfc864_lines

from sockd.config import ConfigError, ModelName, parse
from sockd.models.registry import MODELS as MODEL_REGISTRY
from sockd.models.registry import load as load_model

from support import (
    MODELS,
    STDLIB_LOOP,
    TIMEOUT,
    Daemon,
    Launcher,
    active_connections,
    becomes,
    connect,
    datagram,
    errors,
    eventually,
    inet,
    listen_backlog,
    model_options,
    read_to_eof,
    request,
    rss_bytes,
    samples,
    short_directory,
    value,
)
from support import listener as entry

STREAMS = ["tcp-echo", "tcp6-echo", "unix-echo"]


def listeners_for(model: str, directory: Path, **options: Any) -> list[dict[str, object]]:
    return [
        entry("tcp-echo", "tcp", "echo", model, **options),
        entry("tcp6-echo", "tcp", "echo", model, "::1", **options),
        entry("unix-echo", "unix", "echo", model, directory / "e.sock", **options),
        entry("tcp-time", "tcp", "timestamp", model, **options),
        entry("unix-time", "unix", "timestamp", model, directory / "t.sock", **options),
        entry("tcp-iso", "tcp", "timestamp", model, timestamp_format="iso8601", **options),
        entry("udp-echo", "udp", "echo", model, **options),
        entry("udp6-echo", "udp", "echo", model, "::1", **options),
        entry("udp-time", "udp", "timestamp", model, **options),
        entry("udp-unix", "udp", "timestamp", model, timestamp_format="unix", **options),
    ]


@pytest.fixture(scope="module", params=[*MODELS, STDLIB_LOOP])
def served(request: pytest.FixtureRequest, start_module_sockd: Launcher) -> Iterator[Daemon]:
    """One daemon per model, serving every protocol and handler pair."""
    model, options = model_options(request.param)
    with short_directory() as directory:
        daemon = start_module_sockd(listeners_for(model, directory, **options))
        yield daemon
        assert daemon.stop() == 0


@pytest.mark.parametrize("name", STREAMS)
def test_stream_echo_answers_each_chunk_then_closes_after_the_client(served: Daemon, name: str) -> None:
    with connect(served.address(name)) as sock:
        for message in (b"a", b"hello world", bytes(range(256)) * 16):
            sock.sendall(message)
            received = b""
            while len(received) < len(message):
                received += sock.recv(65536)
            assert received == message
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""


@pytest.mark.parametrize("name", ["tcp-time", "unix-time"])
def test_stream_timestamp_replies_once_in_the_seed_format_and_closes(served: Daemon, name: str) -> None:
    with connect(served.address(name)) as sock:
        sock.sendall(b"hello world")
        reply = read_to_eof(sock).decode()
    stamp = datetime.datetime.strptime(reply, "%Y-%m-%d %H:%M:%S.%f")
    assert abs(stamp - datetime.datetime.now()) < datetime.timedelta(minutes=1)


def test_stream_timestamp_in_iso8601_is_utc_with_offset(served: Daemon) -> None:
    stamp = datetime.datetime.fromisoformat(request(served.address("tcp-iso"), b"x").decode())
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs(stamp - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=1)


@pytest.mark.parametrize("name", ["udp-echo", "udp6-echo"])
@pytest.mark.parametrize("size", [1, 1400, 65507])
def test_datagram_echo_returns_each_datagram_to_its_sender(served: Daemon, name: str, size: int) -> None:
    if name == "udp6-echo" and size == 65507:
        size = 65527  # IPv6 carries 20 bytes more per datagram than IPv4
    payload = os.urandom(size)
    assert datagram(served.address(name), payload) == payload


def test_datagram_timestamp_formats(served: Daemon) -> None:
    seed = datagram(served.address("udp-time"), b"hello world").decode()
    assert datetime.datetime.strptime(seed, "%Y-%m-%d %H:%M:%S.%f")
    unix = float(datagram(served.address("udp-unix"), b"").decode())
    assert abs(unix - time.time()) < 60


@pytest.mark.parametrize("name", ["tcp-echo", "unix-echo"])
def test_many_clients_at_once_each_get_their_own_bytes(served: Daemon, name: str) -> None:
    address, failures = served.address(name), []

    def client(number: int) -> None:
        try:
            with connect(address) as sock:
                for turn in range(10):
                    message = f"client {number} turn {turn}".encode()
                    sock.sendall(message)
                    received = b""
                    while len(received) < len(message):
                        received += sock.recv(1024)
                    assert received == message
        except (OSError, AssertionError) as exc:
            failures.append(f"client {number}: {exc!r}")

    clients = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(30)
    assert failures == []
    assert not any(thread.is_alive() for thread in clients)


@pytest.mark.parametrize("name", STREAMS)
def test_large_transfer_survives_partial_writes(served: Daemon, name: str) -> None:
    """4 MiB sent while reading: far more than the socket buffers, so the server's writes are
    partial and it must keep the bytes in order."""
    payload = os.urandom(4 << 20)
    with connect(served.address(name), timeout=30) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = read_to_eof(sock)
        sender.join(30)
    assert received == payload


@pytest.mark.parametrize("name", ["tcp-echo", "unix-echo"])
def test_a_client_reset_does_not_hurt_the_worker(served: Daemon, name: str) -> None:
    address = served.address(name)
    pid = served.worker_pid(name)
    for _ in range(5):
        sock = connect(address)
        sock.sendall(b"x" * 100_000)  # unread echo piles up server-side, then the reset hits it
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert request(address, b"still here") == b"still here"
    assert served.worker_pid(name) == pid
    assert not [e for e in served.events if e.get("event") == "worker died; restarting"]


def _open_fds_and_threads(pid: int) -> tuple[int, int]:
    threads = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Threads:")
    )
    return len(os.listdir(f"/proc/{pid}/fd")), threads


@pytest.mark.parametrize("name", ["tcp-echo", "tcp-time"])
def test_no_socket_or_thread_outlives_its_connection(served: Daemon, name: str) -> None:
    address = served.address(name)
    pid = served.worker_pid(name)
    request(address, b"warm up")  # lazily created things (e.g. an executor) are not leaks
    before = _settled(pid)
    for _ in range(50):
        request(address, b"x")
    assert _settled(pid) == before


def _settled(pid: int) -> tuple[int, int]:
    """The worker's descriptors and threads once they stop changing: a client has its reply a
    moment before the server's thread for it has ended."""
    last, deadline = None, time.monotonic() + 10
    while time.monotonic() < deadline:
        now = _open_fds_and_threads(pid)
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    raise AssertionError(f"still changing after 10 s: {last}")


# Neither the kernel's default, nor systemd's, nor an event loop's (100): a backlog only the
# listener's own listen() gives.
BACKLOG = 1234


@pytest.mark.parametrize("protocol", ["tcp", "unix"])
@pytest.mark.parametrize("model", ["asyncio", STDLIB_LOOP, "selector"])
def test_the_backlog_stays_the_listeners_through_a_reload_and_a_restart(
    start_sockd: Launcher, model: str, protocol: str
) -> None:
    """A model that accepts through an event loop's server must not let it listen() again with
    the loop's default: the backlog is the socket's, shared by every worker and the supervisor."""
    name, options = model_options(model)
    with short_directory() as directory:
        where = directory / "b.sock" if protocol == "unix" else "127.0.0.1"

        def config(**changed: object) -> list[dict[str, object]]:
            return [entry("b", protocol, "echo", name, where, backlog=BACKLOG, workers=1, **options, **changed)]

        daemon = start_sockd(config())
        address = daemon.address("b")
        assert request(address, b"started") == b"started"  # the worker listens, and accepts
        assert listen_backlog(address) == BACKLOG
        assert daemon.reload(config(idle_timeout=60))["restarted"] == ["b"]
        assert request(address, b"reloaded") == b"reloaded"
        assert listen_backlog(address) == BACKLOG
        mark = len(daemon.events)
        os.kill(daemon.worker_pids("b")[-1], signal.SIGKILL)
        daemon.worker_pid("b", after=mark)
        assert request(address, b"restarted") == b"restarted"
        assert listen_backlog(address) == BACKLOG
        assert daemon.stop() == 0  # while its socket file's directory is there


@pytest.mark.parametrize("model", [*MODELS, STDLIB_LOOP])
def test_reloads_under_a_connection_per_request_load_refuse_and_reset_no_client(
    start_sockd: Launcher, model: str
) -> None:
    """A retiring worker serves every connection it accepted, those its loop's server took in
    the very turn it stopped included (the standard loop makes their protocols a turn later)."""
    name, options = model_options(model)

    def config(idle_timeout: int) -> list[dict[str, object]]:
        return [entry("e", "tcp", "echo", name, idle_timeout=idle_timeout, **options)]

    daemon = start_sockd(config(100))
    address = daemon.address("e")
    answers: list[bool | str] = []
    done = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 120
        for n in range(100_000):
            if done.is_set() or time.monotonic() > deadline:
                return
            payload = b"%d" % n
            try:
                answers.append(request(address, payload) == payload or f"wrong answer to {n}")
            except OSError as exc:
                answers.append(f"{n}: {exc!r}")

    def answered(wanted: int) -> bool:
        return len(answers) >= wanted

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for reload in range(1, 6):
            eventually(functools.partial(answered, 20 * reload), "the load runs", timeout=TIMEOUT)
            assert daemon.reload(config(100 + reload))["restarted"] == ["e"]
    finally:
        done.set()
        for client in clients:
            client.join(TIMEOUT)
    assert [answer for answer in answers if answer is not True] == []
    assert daemon.stop() == 0


# The seed's experiment, scaled down: 6 clients at once against a 0.5 s delay. Clients answered
# together finish together, so the finishing times fall into "waves" 0.5 s apart.
WAVES = {"iterative": 6, "threaded": 1, "thread_pool": 2, "busy_poll": 1, "selector": 1, "asyncio": 1}
DELAY, CLIENTS = 0.5, 6


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("model", MODELS)
def test_concurrency_experiment_groups_clients_as_the_seed_shows(
    start_sockd: Launcher, model: str, protocol: str
) -> None:
    options: dict[str, Any] = {"threads": 3} if model == "thread_pool" else {}
    daemon = start_sockd([entry("stamp", protocol, "timestamp", model, delay=DELAY, **options)])
    address = daemon.address("stamp")
    connected = threading.Barrier(CLIENTS + 1)
    finished: list[float] = []

    def client(number: int) -> None:
        message = f"Hello from client {number}".encode()
        if protocol == "udp":
            connected.wait()
            assert datagram(address, message)
        else:
            with connect(address) as sock:
                connected.wait()
                sock.sendall(message)
                assert read_to_eof(sock)
        finished.append(time.monotonic())

    clients = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in clients:
        thread.start()
    connected.wait(timeout=10)
    start = time.monotonic()
    for thread in clients:
        thread.join(CLIENTS * DELAY * 4)
    assert len(finished) == CLIENTS
    times = sorted(t - start for t in finished)
    # A new wave starts where two finishing times are more than half a delay apart.
    waves = 1 + sum(1 for a, b in itertools.pairwise(times) if b - a > DELAY / 2)
    print(f"{model} {protocol}: {CLIENTS} clients done in {times[-1]:.2f}s, waves at {[round(t, 2) for t in times]}")
    assert waves == WAVES[model], times


@pytest.mark.parametrize("model", MODELS)
def test_the_inetd_services(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd(
        [
            entry(f"{protocol}-{name}", protocol, name, model)
            for protocol in ("tcp", "udp")
            for name in ("discard", "daytime", "time")
        ]
    )

    def told(name: str) -> bytes:
        """What a stream service says unasked before it closes; a datagram service's answer."""
        if name.startswith("udp"):
            return datagram(daemon.address(name), b"?")
        with connect(daemon.address(name)) as sock:
            return read_to_eof(sock)

    now_since_1900 = time.time() + 2_208_988_800
    for protocol in ("tcp", "udp"):
        said = told(f"{protocol}-time")
        assert len(said) == 4
        assert abs(int.from_bytes(said, "big") - now_since_1900) < 5
        line = told(f"{protocol}-daytime")
        assert line.endswith(b"\r\n")
        assert str(time.localtime().tm_year).encode() in line
    assert request(daemon.address("tcp-discard"), os.urandom(256 << 10)) == b""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(b"into the void", inet(daemon.address("udp-discard")))
        with pytest.raises(TimeoutError):
            sock.recv(1)


CHARGEN_LINES = 10_000


@pytest.mark.parametrize("model", MODELS)
def test_chargen_streams_the_rfc_pattern_over_tcp_and_unix_and_answers_udp(
    start_sockd: Launcher, model: str, sockdir: Path
) -> None:
    streams = [entry("tcp", "tcp", "chargen", model), entry("unix", "unix", "chargen", model, sockdir / "cg")]
    daemon = start_sockd([*streams, entry("udp", "udp", "chargen", model)])
    expected = rfc864_lines(CHARGEN_LINES)
    for stream in streams:
        with connect(daemon.address(stream["name"])) as sock:
            got = bytearray()
            while len(got) < len(expected):
                chunk = sock.recv(1 << 16)
                assert chunk, "chargen closed the stream"
                got += chunk
            assert bytes(got[: len(expected)]) == expected
    pattern = rfc864_lines(7)
    for _ in range(50):
        reply = datagram(daemon.address("udp"), b"?")
        assert len(reply) <= 512
        assert reply == pattern[: len(reply)]


# What may stand between the chargen server and a client that does not read, besides what the
# client's kernel holds for it: the server's socket buffer (Linux's tcp_wmem grows it to 4 MiB at
# most), a transport's write buffer (up to HIGH_WATER, 1 MiB, and a turn past it) and a margin.
IN_FLIGHT = 8 << 20


@pytest.mark.parametrize("model", MODELS)
def test_a_chargen_client_that_does_not_read_is_not_buffered_for(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("cg", "tcp", "chargen", model)])
    worker = daemon.worker_pid("cg")
    with connect(daemon.address("cg")) as idle:
        got = bytearray(idle.recv(1))  # it has begun
        before = rss_bytes(worker)
        # Back-pressure reached: once the client's receive queue is full, it stays so (sampled,
        # never timed; busy_poll spins by design, so its CPU time cannot tell).
        eventually(lambda: _queue_still(idle), "the client's queue fills and stays full")
        # And the server's count of what it wrote stops too: a bounded amount past what reached
        # the client, not a buffer that grows for as long as the client does not read.
        eventually(lambda: _sent_still(daemon), "sockd_sent_bytes stops growing")
        assert 0 < _sent(daemon) - (len(got) + _queued(idle)) < IN_FLIGHT
        # Without back-pressure it would have buffered without end by now; with it, its memory
        # grew by at most its write buffer and a margin.
        assert rss_bytes(worker) - before < 16 << 20
        for _ in range(200):  # it reads on: the lines go on, unbroken, from the first byte
            got += idle.recv(1 << 16)
        period = rfc864_lines(95)
        assert bytes(got) == (period * (len(got) // len(period) + 1))[: len(got)]


@pytest.mark.parametrize("model", MODELS)
def test_a_chargen_stream_ends_when_its_client_closes_and_when_the_daemon_stops(
    start_sockd: Launcher, model: str
) -> None:
    # One thread for the iterative model and a pool of one: the second client is served only
    # once the first one's close has ended its stream.
    pool: dict[str, Any] = {"threads": 1} if model == "thread_pool" else {}
    daemon = start_sockd([entry("cg", "tcp", "chargen", model, **pool)], shutdown_timeout=60)
    with connect(daemon.address("cg")) as first:
        assert first.recv(1 << 16)
    with connect(daemon.address("cg"), timeout=30) as reading:
        got = bytearray()
        while len(got) < 1 << 20:  # it streams: the first client's close ended its session
            chunk = reading.recv(1 << 16)
            assert chunk, "chargen closed the stream"
            got += chunk
        daemon.process.send_signal(signal.SIGTERM)
        while chunk := reading.recv(1 << 16):  # the drain ends the stream: EOF, not a hang
            got += chunk
        period = rfc864_lines(95)
        assert bytes(got) == (period * (len(got) // len(period) + 1))[: len(got)]
    assert daemon.process.wait(30) == 0
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


@pytest.mark.parametrize("model", MODELS)
def test_a_chargen_client_that_stops_reading_is_ended_by_idle_timeout(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("cg", "tcp", "chargen", model, idle_timeout=1)])
    with connect(daemon.address("cg")) as idle:
        assert idle.recv(1)
        becomes(lambda: errors(daemon, "cg", "timeout"), 1, "the client that reads nothing timed out")
        becomes(lambda: active_connections(daemon, "cg"), 0, "its connection closed")


def _queue_still(sock: socket.socket) -> bool:
    first = _queued(sock)
    time.sleep(0.5)
    return first > 0 and _queued(sock) == first


def _sent(daemon: Daemon) -> float:
    return value(samples(daemon), "sockd_sent_bytes_total", listener="cg")


def _sent_still(daemon: Daemon) -> bool:
    first = _sent(daemon)
    time.sleep(0.5)
    return first > 0 and _sent(daemon) == first


def _queued(sock: socket.socket) -> int:
    """The bytes waiting in a socket's receive queue (FIONREAD)."""
    queued: int = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]
    return queued


# ---------------------------------------------------------------------------------------------
# Property: random byte streams and datagrams through every model come back exactly, and no
# worker dies of them.

# Sizes at the edges: an empty write, one byte, a read's worth (65,536) and either side of it,
# the largest UDP payload over IPv4 (65,507) and the IPv4 Ethernet MTU's (1,472).
EDGE_SIZES = [0, 1, 1472, 1473, 65507, 65535, 65536, 65537]


def _seeded_bytes(size_and_seed: tuple[int, int]) -> bytes:
    """Random bytes of a given size, cheap to draw however large (Hypothesis draws the seed)."""
    size, seed = size_and_seed
    return random.Random(seed).randbytes(size)


def blobs(max_size: int) -> st.SearchStrategy[bytes]:
    sizes = st.one_of(st.sampled_from([s for s in EDGE_SIZES if s <= max_size]), st.integers(0, max_size))
    return st.one_of(st.binary(max_size=64), st.tuples(sizes, st.integers(0, 2**32 - 1)).map(_seeded_bytes))


# A stream as the writes a client makes (so the server meets every split of it), each one
# perhaps after a short pause, so that writes also arrive as reads of their own.
writes = st.lists(st.tuples(blobs(1 << 17), st.sampled_from([0.0, 0.0, 0.0, 0.002])), max_size=8)
datagrams = st.lists(blobs(65507), min_size=1, max_size=4)
PROPERTY = settings(max_examples=25, deadline=None)


def send_and_read(address: str, chunks: list[tuple[bytes, float]], reset_ok: bool = False) -> bytes:
    """Write `chunks` (each after its pause) and half-close, while reading everything the server
    sends until it closes: a thread writes, so neither side can block the other on full buffers.
    With `reset_ok`, a server that closes before reading everything (a reset) is fine."""
    # A reset shows as EPIPE or ECONNRESET on a write, ENOTCONN on the half-close after it.
    tolerated = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN} if reset_ok else set()
    failures: list[OSError] = []
    with connect(address) as sock:

        def write() -> None:
            try:
                for chunk, pause in chunks:
                    if pause:
                        time.sleep(pause)
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno not in tolerated:
                    failures.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            if exc.errno not in tolerated:
                raise
        finally:
            writer.join(TIMEOUT)
    assert not writer.is_alive(), "the writer is still blocked"
    assert failures == []
    return bytes(received)


def assert_unharmed(daemon: Daemon, name: str, pid: int) -> None:
    """The listener's one worker is still `pid`, alive, never replaced, and nothing printed a
    traceback."""
    started = [
        e["pid"] for e in list(daemon.events) if e.get("event") == "worker started" and e.get("listener") == name
    ]
    died = [e for e in list(daemon.events) if e.get("event") == "worker died; restarting" and e.get("listener") == name]
    assert started == [pid], started
    assert died == []
    os.kill(pid, 0)  # still there
    assert not any("Traceback" in line for line in daemon.other_lines), "".join(daemon.other_lines)


@pytest.mark.parametrize("name", ["tcp-echo", "unix-echo"])
def test_random_byte_streams_echo_back_exactly(served: Daemon, name: str) -> None:
    address, pid = served.address(name), served.worker_pid(name)

    @PROPERTY
    @given(chunks=writes)
    def round_trip(chunks: list[tuple[bytes, float]]) -> None:
        sent = b"".join(chunk for chunk, _ in chunks)
        received = send_and_read(address, chunks)
        assert len(received) == len(sent)
        assert received == sent

    round_trip()
    assert_unharmed(served, name, pid)
    assert request(address, b"still here") == b"still here"


def test_random_datagrams_echo_back_exactly(served: Daemon) -> None:
    name = "udp-echo"
    address, pid = served.address(name), served.worker_pid(name)
    host, port = inet(address)

    @PROPERTY
    @given(payloads=datagrams)
    def round_trip(payloads: list[bytes]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT)
            for payload in payloads:
                sock.sendto(payload, (host, port))
                reply, sender = sock.recvfrom(65536)
                assert sender == (host, port)
                assert len(reply) == len(payload)
                assert reply == payload

    round_trip()
    assert_unharmed(served, name, pid)
    assert datagram(address, b"still here") == b"still here"


def test_random_datagrams_get_a_timestamp_each(served: Daemon) -> None:
    name = "udp-time"
    address, pid = served.address(name), served.worker_pid(name)

    @PROPERTY
    @given(payloads=datagrams)
    def round_trip(payloads: list[bytes]) -> None:
        for payload in payloads:
            reply = datagram(address, payload).decode()
            assert str(datetime.datetime.fromisoformat(reply)) == reply  # the seed's str(datetime.now())

    round_trip()
    assert_unharmed(served, name, pid)


def test_an_empty_datagram_is_echoed(served: Daemon) -> None:
    # (asyncio's and uvloop's DatagramTransport.sendto() drop empty data: the model goes around it.)
    assert datagram(served.address("udp-echo"), b"") == b""


def test_random_byte_streams_get_one_timestamp_and_a_close(served: Daemon) -> None:
    name = "tcp-time"
    address, pid = served.address(name), served.worker_pid(name)

    @PROPERTY
    @given(chunks=writes)
    def round_trip(chunks: list[tuple[bytes, float]]) -> None:
        # The server answers its first read and closes, so the rest of a long stream may meet a reset.
        reply = send_and_read(address, chunks, reset_ok=True)
        if not any(chunk for chunk, _ in chunks):
            assert reply == b""  # no request, no answer: the server closes at the client's EOF
            return
        stamp = datetime.datetime.fromisoformat(reply.decode())  # the seed's str(datetime.now())
        assert str(stamp) == reply.decode()
        assert abs(stamp - datetime.datetime.now()) < datetime.timedelta(minutes=1)

    round_trip()
    assert_unharmed(served, name, pid)
    assert request(address, b"x")


def test_every_model_name_has_a_model_and_every_model_a_name() -> None:
    assert set(get_args(ModelName)) == set(MODEL_REGISTRY)
    for name in MODEL_REGISTRY:
        model = load_model(name)
        assert callable(model.serve), name


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_a_relay_is_accepted_exactly_by_the_models_declared_to_relay(name: ModelName) -> None:
    text = f"""
listeners:
  - {{name: r, protocol: tcp, host: 127.0.0.1, port: 0, handler: relay, concurrency: {name},
     upstream: "tcp://127.0.0.1:1"}}
"""
    if MODEL_REGISTRY[name].relays:
        assert parse(text, "c.yaml").listeners[0].concurrency == name
    else:
        with pytest.raises(ConfigError, match=f"handler: relay needs concurrency: .*not {name}"):
            parse(text, "c.yaml")

"""What a hostile client can make a worker hold, bounded, in every model, through the running
daemon: message sizes, replies held under back-pressure and datagram floods, descriptors (paused
accepting that recovers), memory back at its baseline after a flood, the select backend's cap,
and the threads a threaded UDP listener starts."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sockd.lifecycle import DATAGRAMS_HELD

from support import (
    CONCURRENT,
    MODELS,
    TIMEOUT,
    Launcher,
    connect,
    cpu_seconds,
    echo,
    errors,
    eventually,
    inet,
    options_for,
    read_to_eof,
    receive,
    request,
    rss_bytes,
    samples,
    served,
    tcp_owner,
    value,
)
from support import listener as entry

# -- message sizes and back-pressure


@pytest.mark.parametrize("model", MODELS)
def test_max_message_size(start_sockd: Launcher, model: str) -> None:
    limit: dict[str, Any] = {"max_message_size": 100}
    daemon = start_sockd(
        [
            entry("udp", "udp", "echo", model, **limit),
            entry("stamp", "tcp", "timestamp", model, **options_for(model, **limit)),
            entry("echo", "tcp", "echo", model, **options_for(model, **limit)),
        ]
    )
    udp = daemon.address("udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(b"x" * 101, inet(udp))
        sock.sendto(b"y" * 100, inet(udp))
        assert sock.recv(65536) == b"y" * 100  # the one over the limit was dropped
    assert request(daemon.address("stamp"), b"z" * 200) == b""  # closed without an answer
    assert request(daemon.address("stamp"), b"z" * 100) != b""
    # A stream's chunks are not messages: echo passes a megabyte through.
    with connect(daemon.address("echo")) as sock:
        assert echo(sock, os.urandom(1 << 20)) != b""
    eventually(lambda: errors(daemon, "udp", "too_large") == 1, "the datagram counted")
    eventually(lambda: errors(daemon, "stamp", "too_large") == 1, "the request counted")


# What a client of the back-pressure test offers: far more than all the buffers on the way hold.
FLOOD = 64 << 20


# The kernel's buffers on both sides of its connections: small, so that what is in flight when the
# clients read at last is soon echoed by a blocking model (one read of at most 64 KiB per `delay`).
FLOOD_BUFFERS = 1 << 16


def flood(sock: socket.socket, payload: bytes) -> tuple[int, bool]:
    """Send `payload` until the server stops taking it, or it is all sent, or TIMEOUT is over:
    how much went, and whether the server stopped taking it (a send blocked for a second, longer
    than any `delay` between a blocking model's reads)."""
    view, sent = memoryview(payload), 0
    deadline = time.monotonic() + TIMEOUT
    sock.settimeout(1.0)
    try:
        while sent < len(payload) and time.monotonic() < deadline:
            sent += sock.send(view[sent : sent + 65536])
    except TimeoutError:
        return sent, True
    return sent, False


def drained(sock: socket.socket) -> bytes:
    """What comes back once the client ends its output and reads at last."""
    sock.settimeout(TIMEOUT)
    sock.shutdown(socket.SHUT_WR)
    return read_to_eof(sock)


@pytest.mark.parametrize("delay", [0.0, 0.25])
@pytest.mark.parametrize("model", MODELS)
def test_clients_that_never_read_get_back_pressure(start_sockd: Launcher, model: str, delay: float) -> None:
    buffers: dict[str, Any] = {"recv_buffer": FLOOD_BUFFERS, "send_buffer": FLOOD_BUFFERS}
    daemon = start_sockd([entry("e", "tcp", "echo", model, delay=delay, **buffers)])
    pid = daemon.worker_pid("e")
    before = rss_bytes(pid)
    payload = os.urandom(FLOOD)
    clients = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FLOOD_BUFFERS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FLOOD_BUFFERS)
        sock.connect(inet(daemon.address("e")))
        clients.append(sock)
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            sent, stopped = zip(*pool.map(lambda sock: flood(sock, payload), clients), strict=True)
            grown = rss_bytes(pid) - before
            # Everything taken in comes back, in order, once the clients read (an iterative
            # worker serves the second client after the first has ended).
            echoed = list(pool.map(drained, clients))
    finally:
        for sock in clients:
            sock.close()
    assert all(stopped), sent  # the server stopped reading each client: nobody took it all in
    assert grown < 16 << 20, grown
    assert [len(reply) for reply in echoed] == list(sent)
    assert all(reply == payload[:size] for reply, size in zip(echoed, sent, strict=True))


# The models whose `delay` is a timer on a loop: replies wait in memory, not in a sleeping thread.
TIMED = ["selector", "busy_poll", "asyncio"]


@pytest.mark.parametrize("model", TIMED)
def test_a_datagram_flood_against_a_delayed_listener_holds_a_bounded_amount_of_replies(
    start_sockd: Launcher, model: str
) -> None:
    daemon = start_sockd([entry("u", "udp", "echo", model, delay=3.0)])
    pid = daemon.worker_pid("u")
    before = rss_bytes(pid)
    payload = bytes(60000)
    deadline = time.monotonic() + TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # 12 MB a round, all due back after the delay, until the worker holds no more of them.
        while not errors(daemon, "u", "send") and time.monotonic() < deadline:
            for _ in range(200):
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(payload, inet(daemon.address("u")))
        grown = rss_bytes(pid) - before
    assert errors(daemon, "u", "send"), "the replies past the bound dropped and counted"
    assert grown < DATAGRAMS_HELD + (16 << 20), grown  # what it may hold, and room for the allocator


# -- resource exhaustion


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# asyncio under 256 descriptors first accepts through uvloop's server, then by itself near the
# limit, then through a server again (see models/aio.Acceptor); under 72 (what the supervisor
# needs for one listener and the metrics endpoint, with room), by itself almost throughout.
@pytest.mark.parametrize(("model", "limit"), [*((model, 72) for model in CONCURRENT), ("asyncio", 256)])
def test_out_of_descriptors_pauses_accepting_and_recovers(start_sockd: Launcher, model: str, limit: int) -> None:
    threads: dict[str, Any] = {"threads": 100} if model == "thread_pool" else {}
    daemon = start_sockd(
        [entry("e", "tcp", "echo", model, **threads)],
        prefix=("prlimit", f"--nofile={limit}"),
    )
    pid = daemon.worker_pid("e")
    clients = [socket.create_connection(inet(daemon.address("e")), timeout=TIMEOUT) for _ in range(limit + 16)]
    try:
        eventually(lambda: errors(daemon, "e", "resources") > 0, "accept() ran out of descriptors")
        eventually(lambda: open_descriptors(pid) >= limit - 2, "the worker holds all it may")
        for sock in clients:
            sock.sendall(b"ping")
        # The ones it accepted (however slowly it answers them), not those left in the backlog.
        served = [sock for sock in clients if tcp_owner(sock, [pid]) == pid]
        assert served
        for sock in served:
            assert receive(sock, 4) == b"ping"  # the connections it accepted are served
        if model != "busy_poll":  # which spins by design, whatever happens
            spent = cpu_seconds(pid)
            time.sleep(1.0)
            assert cpu_seconds(pid) - spent < 0.5  # paused, not spinning on accept()
        for sock in served:
            sock.close()
        waiting = [sock for sock in clients if sock not in served]
        assert len(waiting) <= len(served)  # so all fit once the others are gone
        for sock in waiting:
            assert receive(sock, 4) == b"ping"  # what it sent while it waited
        if limit > 72:
            daemon.wait_for("accepting by sockd: near the descriptor limit")
            for sock in clients:
                sock.close()

            def accepting() -> str:
                return [str(e["event"]) for e in daemon.events if str(e.get("event")).startswith("accepting")][-1]

            eventually(lambda: accepting() == "accepting through the loop's server", "a server accepts again")
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.parametrize("model", MODELS)
def test_a_flood_leaves_memory_and_descriptors_at_their_baseline(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("tcp", "tcp", "echo", model, max_connections=50), entry("udp", "udp", "echo", model)])
    pids = [daemon.worker_pid("tcp"), daemon.worker_pid("udp")]

    def flood() -> None:
        for _ in range(3):
            batch = [socket.create_connection(inet(daemon.address("tcp")), timeout=TIMEOUT) for _ in range(200)]
            for sock in batch:
                sock.sendall(b"garbage\x00\xff" * 10)
            for sock in batch:
                sock.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for size in range(0, 60000, 30):
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(os.urandom(size % 1400), inet(daemon.address("udp")))
        # Served again once the flood's connections are gone (max_connections turns it away till then).
        eventually(lambda: served(daemon.address("tcp")), "served after the flood")

    # The first flood sets the baseline: a library may open a descriptor once, lazily (libuv
    # keeps one spare for its own out-of-descriptors trick).
    flood()
    # Taken once the worker has closed every connection of the flood, however long that takes.
    eventually(lambda: value(samples(daemon), "sockd_connections_active", listener="tcp") == 0, "the flood closed")
    fds_before = [open_descriptors(pid) for pid in pids]
    rss_before = sum(rss_bytes(pid) for pid in pids)
    flood()
    eventually(
        lambda: [open_descriptors(pid) for pid in pids] == fds_before,
        "descriptors back to the baseline",
        timeout=30,
    )
    assert sum(rss_bytes(pid) for pid in pids) < rss_before + (8 << 20)


def test_the_select_backend_at_its_cap_refuses_the_rest_and_never_crashes(start_sockd: Launcher) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # this test process holds every client (CI runs as root, so may raise it)
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(hard, 4096)))
    listener = entry("sel", "tcp", "echo", "selector", selector_backend="select", max_connections=1000)
    # Descriptors to spare, as on a host that raised the limit: select's 1,024 is then the bound.
    daemon = start_sockd([listener], prefix=("prlimit", "--nofile=8192"))
    address, worker = daemon.address("sel"), daemon.worker_pid("sel")
    established = [connect(address) for _ in range(50)]
    flood: list[socket.socket] = []
    try:
        for sock in established:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        flood = [connect(address) for _ in range(1100)]
        eventually(
            lambda: (
                value(samples(daemon), "sockd_connections_rejected_total", listener="sel", reason="max_connections")
                >= 150
            ),
            "the connections past max_connections refused",
        )
        for sock in established:  # the worker still serves them: nothing crashed
            sock.sendall(b"y")
            assert sock.recv(1) == b"y"
        assert daemon.worker_pid("sel") == worker
        assert not [e for e in daemon.events if e.get("event") == "worker died; restarting"]
    finally:
        for sock in established + flood:
            sock.close()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_datagram_flood_on_threaded_udp_starts_a_bounded_number_of_threads(start_sockd: Launcher) -> None:
    # Each datagram's thread sleeps through `delay`, so a flood would pile threads up.
    daemon = start_sockd([entry("u", "udp", "echo", "threaded", delay=3.0)])
    worker = daemon.worker_pid("u")
    most = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        # Paced over 3 s rather than at once, so that the kernel's buffer does not drop the flood
        # before the worker sees it: well over 256 reach it within one `delay`.
        for number in range(3000):
            client.sendto(b"flood", inet(daemon.address("u")))
            if number % 100 == 0:
                most = max(most, _threads(worker))
                time.sleep(0.1)
    most = max(most, _threads(worker))
    # DATAGRAM_THREADS, the worker's own few, and some that gave their place back but have not
    # quite exited yet (a busy machine lets them linger).
    assert most <= 256 + 40, most
    eventually(
        lambda: value(samples(daemon), "sockd_errors_total", listener="u", kind="resources") > 0,
        "the dropped datagrams counted",
    )
    assert not [e for e in daemon.events if e.get("event") == "worker died; restarting"]

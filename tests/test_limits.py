"""Limits, timeouts, access rules and hostile clients, in every model, through the running daemon."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from sockd.config import InetListener
from sockd.lifecycle import DATAGRAMS_HELD
from sockd.limits import MEMORY, AccessList, Admission

from support import (
    MODELS,
    TIMEOUT,
    Daemon,
    Launcher,
    connect,
    cpu_seconds,
    datagram,
    eventually,
    forge_datagram,
    inet,
    listen_backlog,
    read_to_eof,
    rejected,
    request,
    requests,
    rss_bytes,
    run_sockd,
    samples,
    tcp_owner,
    value,
)
from support import listener as entry

EX_UNAVAILABLE = 71
# The models that serve many connections at once (iterative serves one: the rest wait in the
# backlog, unaccepted, so connection limits never see them).
CONCURRENT = [model for model in MODELS if model != "iterative"]


def options_for(model: str, **options: object) -> dict[str, object]:
    return {"threads": 16, **options} if model == "thread_pool" else options


def echo(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return receive(sock, len(payload))


def receive(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer if the server closes first."""
    received = b""
    while len(received) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def served(address: str) -> bool:
    """Whether a new connection is served (not closed at once by a limit)."""
    try:
        return request(address, b"again") == b"again"
    except OSError as exc:
        # Closed at once: reset while sending, or before the half-close (ENOTCONN).
        if isinstance(exc, ConnectionError) or exc.errno == errno.ENOTCONN:
            return False
        raise


def closed_at_once(sock: socket.socket) -> bool:
    """The server closed the connection without a word (EOF or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def connect_from(address: str, source: str) -> socket.socket:
    """A TCP connection from a chosen loopback address (all of 127.0.0.0/8 is this host)."""
    return socket.create_connection(inet(address), timeout=TIMEOUT, source_address=(source, 0))


def errors(daemon: Daemon, name: str, kind: str) -> float:
    return value(samples(daemon), "sockd_errors_total", listener=name, kind=kind)


# -- connection limits


@pytest.mark.parametrize("model", CONCURRENT)
def test_max_connections_closes_the_one_too_many_at_once(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", model, **options_for(model, max_connections=2))])
    address = daemon.address("e")
    with connect(address) as first, connect(address) as second:
        assert echo(first) == echo(second) == b"ping"
        with connect(address) as third:
            assert closed_at_once(third)
        eventually(lambda: rejected(daemon, "e", "max_connections") == 1, "one rejection counted")
    # Once the two are gone, there is room again.
    eventually(lambda: served(address), "served again after the others closed")


@pytest.mark.parametrize("model", CONCURRENT)
def test_max_connections_per_source_counts_each_address_apart(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", model, **options_for(model, max_connections_per_source=1))])
    address = daemon.address("e")
    with connect_from(address, "127.0.0.1") as first:
        assert echo(first) == b"ping"
        with connect_from(address, "127.0.0.1") as again:
            assert closed_at_once(again)
        with connect_from(address, "127.0.0.2") as other:
            assert echo(other) == b"ping"
    eventually(lambda: rejected(daemon, "e", "max_connections_per_source") == 1, "one rejection counted")


@pytest.mark.parametrize("model", MODELS)
def test_connection_rate_refuses_past_the_burst_per_source(start_sockd: Launcher, model: str) -> None:
    # One new connection a day after a burst of two: the third in a row is refused.
    limits = {"connection_rate": 1 / 86400, "connection_burst": 2}
    daemon = start_sockd([entry("e", "tcp", "echo", model, **options_for(model, **limits))])
    address = daemon.address("e")
    for _ in range(2):
        with connect_from(address, "127.0.0.1") as sock:
            assert echo(sock) == b"ping"
    with connect_from(address, "127.0.0.1") as sock:
        assert closed_at_once(sock)
    with connect_from(address, "127.0.0.3") as sock:  # its own bucket
        assert echo(sock) == b"ping"
    eventually(lambda: rejected(daemon, "e", "connection_rate") == 1, "one rejection counted")


# -- access rules


@pytest.mark.parametrize("model", MODELS)
def test_allow_and_deny_by_longest_prefix(start_sockd: Launcher, model: str) -> None:
    rules = {"allow": ["127.0.0.0/8", "127.0.0.9/32"], "deny": ["127.0.0.8/29"]}
    daemon = start_sockd(
        [
            entry("tcp", "tcp", "echo", model, **options_for(model, **rules)),
            entry("udp", "udp", "echo", model, **rules),
            entry("v6", "tcp", "echo", model, "::1", **options_for(model, deny=["::1/128"])),
        ]
    )
    tcp, udp = daemon.address("tcp"), daemon.address("udp")
    for source, allowed in [("127.0.0.1", True), ("127.0.0.10", False), ("127.0.0.9", True)]:
        with connect_from(tcp, source) as sock:
            assert (echo(sock) == b"ping") if allowed else closed_at_once(sock), source
    with connect(daemon.address("v6")) as sock:
        assert closed_at_once(sock)

    # A denied datagram is dropped: the allowed one sent after it is answered, it never is.
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ok,
    ):
        denied.bind(("127.0.0.10", 0))
        ok.bind(("127.0.0.1", 0))
        ok.settimeout(TIMEOUT)
        denied.sendto(b"denied", inet(udp))
        ok.sendto(b"allowed", inet(udp))
        assert ok.recv(100) == b"allowed"
        denied.setblocking(False)
        with pytest.raises(BlockingIOError):
            denied.recv(100)
    eventually(lambda: rejected(daemon, "tcp", "acl") == 1, "the denied connection counted")
    eventually(lambda: rejected(daemon, "udp", "acl") == 1, "the denied datagram counted")
    eventually(lambda: rejected(daemon, "v6", "acl") == 1, "the denied IPv6 connection counted")


@pytest.mark.parametrize("model", MODELS)
def test_unix_peer_credentials(start_sockd: Launcher, sockdir: Path, model: str) -> None:
    me, group = os.getuid(), os.getgid()
    daemon = start_sockd(
        [
            entry("uid", "unix", "echo", model, sockdir / "u.sock", allow_uids=[me]),
            entry("gid", "unix", "echo", model, sockdir / "g.sock", allow_gids=[group]),
            entry("other", "unix", "echo", model, sockdir / "o.sock", allow_uids=[me + 1], allow_gids=[group + 1]),
        ]
    )
    assert request(daemon.address("uid"), b"u") == b"u"
    assert request(daemon.address("gid"), b"g") == b"g"
    with connect(daemon.address("other")) as sock:
        assert closed_at_once(sock)
    eventually(lambda: rejected(daemon, "other", "acl") == 1, "the stranger counted")


# -- reflection (CVE-1999-0103): a datagram whose forged source is a service that answers anything


@pytest.mark.parametrize("model", MODELS)
def test_a_datagram_forged_from_a_udp_service_of_the_daemon_starts_no_endless_exchange(
    start_sockd: Launcher, model: str
) -> None:
    daemon = start_sockd([entry("echo", "udp", "echo", model), entry("daytime", "udp", "daytime", model)])
    echo, daytime = inet(daemon.address("echo")), inet(daemon.address("daytime"))
    # Echo told by itself, echo told by daytime, daytime told by echo: answered, each would set
    # the two answering each other for as long as the daemon runs.
    for source, destination in [(echo, echo), (daytime, echo), (echo, daytime)]:
        forge_datagram(source, destination, b"loop")
    assert datagram(daemon.address("echo"), b"ping") == b"ping"  # an ordinary client is answered
    assert datagram(daemon.address("daytime"), b"?").endswith(b"\r\n")
    eventually(lambda: requests(daemon, "echo") == requests(daemon, "daytime") == 1, "the two clients counted")
    time.sleep(1.0)  # an exchange, had one begun, would have run up thousands of requests by now
    assert (requests(daemon, "echo"), requests(daemon, "daytime")) == (1, 1)
    assert (rejected(daemon, "echo", "reflection"), rejected(daemon, "daytime", "reflection")) == (2, 1)
    assert daemon.wait_for("rejected", listener="echo")["reason"] == "reflection"


def test_a_listener_added_by_a_reload_ends_an_exchange_with_a_kept_one(start_sockd: Launcher) -> None:
    # The kept echo worker does not know the new listener's port, so it answers once; the new
    # listener knows every current port, and drops that answer.
    echo = entry("echo", "udp", "echo", "selector")
    daemon = start_sockd([echo])
    assert daemon.reload([echo, entry("daytime", "udp", "daytime", "selector")])["added"] == ["daytime"]
    forge_datagram(inet(daemon.address("daytime")), inet(daemon.address("echo")), b"loop")
    eventually(lambda: requests(daemon, "echo") >= 1, "the kept worker's answer")
    time.sleep(1.0)  # an exchange, had one begun, would have run up thousands of requests by now
    assert (requests(daemon, "echo"), requests(daemon, "daytime")) == (1, 0)
    assert (rejected(daemon, "echo", "reflection"), rejected(daemon, "daytime", "reflection")) == (0, 1)


@pytest.mark.parametrize("model", MODELS)
def test_datagrams_from_port_0_and_the_ports_of_echo_daytime_chargen_and_time_go_unanswered(
    start_sockd: Launcher, model: str
) -> None:
    daemon = start_sockd([entry("echo", "udp", "echo", model)])
    echo = inet(daemon.address("echo"))
    # A loopback address of this test's own: another test binding port 7 cannot be in the way.
    host = f"127.0.7.{MODELS.index(model) + 1}"
    forge_datagram((host, 0), echo, b"from port 0")  # no socket can be bound to port 0
    with contextlib.ExitStack() as stack:
        senders = []
        for port in (7, 13, 19, 37):
            sender = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sender.bind((host, port))
            sender.settimeout(0.5)
            sender.sendto(b"from %d" % port, echo)
            senders.append(sender)
        assert datagram(daemon.address("echo"), b"ping") == b"ping"
        for sender in senders:
            with pytest.raises(TimeoutError):
                sender.recv(100)
    eventually(lambda: rejected(daemon, "echo", "reflection") == 5, "the five datagrams counted")
    assert requests(daemon, "echo") == 1


# -- timeouts


@pytest.mark.parametrize("model", MODELS)
def test_first_byte_timeout_ends_a_silent_client_and_spares_a_talking_one(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", model, **options_for(model, first_byte_timeout=0.5))])
    address = daemon.address("e")
    with connect(address) as silent:
        assert closed_at_once(silent)  # within TIMEOUT, or recv raises
    with connect(address) as talking:
        assert echo(talking) == b"ping"
        time.sleep(1.0)  # past first_byte_timeout: it applies only before the first byte
        assert echo(talking) == b"ping"
    eventually(lambda: errors(daemon, "e", "timeout") == 1, "one timeout counted")


@pytest.mark.parametrize("model", MODELS)
def test_idle_timeout_ends_a_quiet_connection_and_spares_a_busy_one(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", model, **options_for(model, idle_timeout=1.0))])
    address = daemon.address("e")
    with connect(address) as busy:
        for _ in range(15):  # 3 s of traffic, each gap well inside the timeout
            assert echo(busy) == b"ping"
            time.sleep(0.2)
    with connect(address) as quiet:
        assert echo(quiet) == b"ping"
        assert closed_at_once(quiet)
    eventually(lambda: errors(daemon, "e", "timeout") == 1, "one timeout counted")


def raise_descriptor_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# Not iterative nor thread_pool: they serve a fixed few clients at a time (one, or `threads`), so
# a thousand silent ones would wait out their timeouts a few at a time, for minutes.
@pytest.mark.parametrize("model", [model for model in CONCURRENT if model != "thread_pool"])
def test_a_thousand_silent_clients_are_closed_on_time_while_others_are_served(
    start_sockd: Launcher, model: str
) -> None:
    raise_descriptor_limit(4096)  # the daemon inherits it
    daemon = start_sockd([entry("e", "tcp", "echo", model, first_byte_timeout=1.0)])
    address = daemon.address("e")
    opened = time.monotonic()
    silent = [socket.create_connection(inet(address), timeout=TIMEOUT) for _ in range(1000)]
    try:
        # Meanwhile, clients that talk are served.
        for _ in range(20):
            with connect(address) as sock:
                assert echo(sock) == b"ping"
        for sock in silent:
            assert closed_at_once(sock)
        took = time.monotonic() - opened
    finally:
        for sock in silent:
            sock.close()
    assert took < 1.0 + TIMEOUT, took  # all closed, none waited for a full test timeout
    eventually(lambda: errors(daemon, "e", "timeout") == 1000, "every silent client counted")


# -- message sizes and back-pressure


@pytest.mark.parametrize("model", MODELS)
def test_max_message_size(start_sockd: Launcher, model: str) -> None:
    limit = {"max_message_size": 100}
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
    buffers = {"recv_buffer": FLOOD_BUFFERS, "send_buffer": FLOOD_BUFFERS}
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
# limit, then through a server again (see models/aio.Acceptor); under 64, by itself throughout.
@pytest.mark.parametrize(("model", "limit"), [*((model, 64) for model in CONCURRENT), ("asyncio", 256)])
def test_out_of_descriptors_pauses_accepting_and_recovers(start_sockd: Launcher, model: str, limit: int) -> None:
    daemon = start_sockd(
        [entry("e", "tcp", "echo", model, **({"threads": 100} if model == "thread_pool" else {}))],
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
        if limit > 64:
            daemon.wait_for("accepting by sockd: near the descriptor limit")
            for sock in clients:
                sock.close()

            def accepting() -> str:
                return [e["event"] for e in daemon.events if str(e.get("event")).startswith("accepting")][-1]

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


# -- socket options


def server_side(pid: int, client: socket.socket) -> socket.socket:
    """The worker's own socket for `client`'s connection, taken with pidfd_getfd(2), so its options
    can be read as the kernel holds them."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd on x86_64 and aarch64
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            sock = socket.socket(fileno=fd)
            with contextlib.suppress(OSError):
                if sock.type == socket.SOCK_STREAM and sock.getpeername() == client.getsockname():
                    return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("no worker socket for this connection")


@pytest.mark.parametrize("model", MODELS)
def test_connection_socket_options(start_sockd: Launcher, model: str) -> None:
    tuned = {"nodelay": False, "keepalive": True, "recv_buffer": 65536, "send_buffer": 65536}
    daemon = start_sockd(
        [
            entry("default", "tcp", "echo", model, **options_for(model)),
            entry("tuned", "tcp", "echo", model, **options_for(model, **tuned)),
        ]
    )
    for name, nodelay, keepalive in [("default", 1, 0), ("tuned", 0, 1)]:
        with connect(daemon.address(name)) as client:
            assert echo(client) == b"ping"
            with server_side(daemon.worker_pid(name), client) as server:
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == nodelay, name
                assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == keepalive, name
                if name == "tuned":  # Linux reports double what was asked (its bookkeeping share)
                    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
                    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536


def test_backlog_and_reuse_port(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector", backlog=17, reuse_port=True)])
    address = daemon.address("e")
    host, port = inet(address)
    assert listen_backlog(address) == 17
    # SO_REUSEPORT lets another process (another sockd, say) listen on the same port beside it.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind((host, port))
        other.listen()


def test_a_busy_port_without_reuse_port_is_refused(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector")])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="Address already in use"):
            other.bind(inet(daemon.address("e")))


def test_ipv6_only(start_sockd: Launcher) -> None:
    daemon = start_sockd(
        [
            entry("dual", "tcp", "echo", "selector", "::", ipv6_only=False),
            entry("only", "tcp", "echo", "selector", "::", ipv6_only=True),
        ]
    )
    dual, only = (inet(daemon.address(name))[1] for name in ("dual", "only"))
    assert request(f"127.0.0.1:{dual}", b"v4") == b"v4"  # IPv4 clients reach a dual-stack socket
    assert request(f"[::1]:{only}", b"v6") == b"v6"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", only), timeout=TIMEOUT)


def test_freebind_binds_an_address_this_host_does_not_have(start_sockd: Launcher, tmp_path: Path) -> None:
    # 192.0.2.1 is TEST-NET-1: never on this host. Nothing is sent to it.
    daemon = start_sockd([entry("e", "tcp", "echo", "selector", "192.0.2.1", freebind=True)])
    assert daemon.address("e").startswith("192.0.2.1:")
    config = tmp_path / "no-freebind.yaml"
    config.write_text(
        "listeners:\n- {name: e, protocol: tcp, host: 192.0.2.1, port: 0, handler: echo, concurrency: selector}\n"
    )
    result = run_sockd("-c", str(config))
    assert result.returncode == EX_UNAVAILABLE
    assert "cannot bind listener 'e' to tcp 192.0.2.1:0: cannot assign requested address" in result.stderr


# -- the rules on their own (sans-IO)


def _networks(*blocks: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(block) for block in blocks]


@pytest.mark.parametrize(
    ("allow", "deny", "host", "allowed"),
    [
        ([], [], "10.1.2.3", True),  # no rules: everyone
        (["10.0.0.0/8"], [], "10.1.2.3", True),
        (["10.0.0.0/8"], [], "11.1.2.3", False),  # an allow list shuts out the rest
        ([], ["10.0.0.0/8"], "11.1.2.3", True),
        (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3", False),  # the longer prefix decides
        (["10.1.2.3/32"], ["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], ["10.0.0.0/8"], "10.1.2.3", False),  # a tie: deny
        (["10.0.0.0/8"], [], "::ffff:10.1.2.3", True),  # IPv4 through a dual-stack socket
        (["2001:db8::/32"], [], "2001:db8::1", True),
        (["2001:db8::/32"], [], "fe80::1%lo", False),
    ],
)
def test_access_list(allow: list[str], deny: list[str], host: str, allowed: bool) -> None:
    assert AccessList(_networks(*allow), _networks(*deny)).allows(host) is allowed


def test_the_token_bucket_refills_at_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bucket's clock is the test's: at this rate, a pause of a millisecond between two takes
    # (a busy machine's scheduler gives that) would refill a token.
    now = [1000.0]
    monkeypatch.setattr("sockd.limits.time", SimpleNamespace(monotonic=lambda: now[0]))
    listener = InetListener.model_validate(
        {"name": "x", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "echo"}
        | {"concurrency": "selector", "connection_rate": 1000.0, "connection_burst": 3}
    )
    admission = Admission(listener)
    assert [admission._take_token("a") for _ in range(4)] == [True, True, True, False]
    now[0] += 0.01  # ten tokens' worth, capped at the burst
    assert [admission._take_token("a") for _ in range(4)] == [True, True, True, False]


def test_the_token_buckets_forget_sources_beyond_a_bound() -> None:
    listener = InetListener.model_validate(
        {"name": "x", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "echo"}
        | {"concurrency": "selector", "connection_rate": 0.001, "connection_burst": 1}
    )
    admission = Admission(listener)
    for number in range(3 * MEMORY):
        admission._take_token(f"10.0.{number // 256}.{number % 256}")
    assert len(admission.buckets) <= MEMORY


def test_a_reload_applies_new_limits_and_the_backlog_to_the_same_socket(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector", backlog=17, max_connections=1)])
    address = daemon.address("e")
    with connect(address) as first:
        assert echo(first) == b"ping"
        with connect(address) as second:
            assert closed_at_once(second)
        assert daemon.reload([entry("e", "tcp", "echo", "selector", backlog=33, max_connections=2)])["restarted"] == [
            "e"
        ]
    assert daemon.address("e") == address
    assert listen_backlog(address) == 33
    with connect(address) as first, connect(address) as second:
        assert echo(first) == echo(second) == b"ping"


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

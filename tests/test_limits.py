"""Connection limits, access rules, reflection and timeouts (sockd.limits), in every model, through
the running daemon, and the rules on their own. Bounds on what a client can make a worker hold are
test_resource_bounds.py's, socket options test_socket_options.py's."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from sockd.config import InetListener
from sockd.config.rules import AMPLIFIERS
from sockd.counters import Recorder
from sockd.limits import (
    ACL,
    DATAGRAM_RATE,
    MAX_CONNECTIONS,
    MEMORY,
    PER_SOURCE,
    PROXY_PROTOCOL,
    AccessList,
    Admission,
    TokenBuckets,
    admission_for,
)

from support import (
    CONCURRENT,
    MODELS,
    TIMEOUT,
    Daemon,
    Launcher,
    connect,
    datagram,
    echo,
    errors,
    eventually,
    forge_datagram,
    inet,
    listen_backlog,
    options_for,
    rejected,
    request,
    requests,
    rss_bytes,
    samples,
    served,
    value,
)
from support import listener as entry


def closed_at_once(sock: socket.socket) -> bool:
    """The server closed the connection without a word (EOF or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def connect_from(address: str, source: str) -> socket.socket:
    """A TCP connection from a chosen loopback address (all of 127.0.0.0/8 is this host)."""
    return socket.create_connection(inet(address), timeout=TIMEOUT, source_address=(source, 0))


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
    rules: dict[str, Any] = {"allow": ["127.0.0.0/8", "127.0.0.9/32"], "deny": ["127.0.0.8/29"]}
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


# -- amplification: what a datagram gets back, and datagram_rate, which bounds it per source

# The amplifiers measured, a datagram each: (listener name, handler, options). README's table
# (Security) is this test's output; chargen (0 to 512 bytes for any datagram, RFC 864) has its own.
MEASURED = [
    ("echo", "echo", {}),
    ("daytime", "daytime", {}),
    ("time", "time", {}),
    ("timestamp-seed", "timestamp", {}),
    ("timestamp-iso8601", "timestamp", {"timestamp_format": "iso8601"}),
    ("timestamp-unix", "timestamp", {"timestamp_format": "unix"}),
]
IP_UDP_HEADERS = 28  # an IPv4 header (no options) and a UDP header: what a datagram costs on the wire


def test_each_handlers_bytes_out_per_byte_in_over_udp_and_which_amplify(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry(name, "udp", handler, "selector", **options) for name, handler, options in MEASURED])
    print("\nhandler | in | out | out/in | on the wire, empty datagram")
    for name, handler, _ in MEASURED:
        address = daemon.address(name)
        outs = {size: len(datagram(address, b"x" * size)) for size in (0, 1, 64)}
        for size in (1, 64):
            print(f"{name} | {size} | {outs[size]} | {outs[size] / size:.2f} |", end=" ")
            print(f"{(outs[0] + IP_UDP_HEADERS) / IP_UDP_HEADERS:.2f}")
        if handler == "echo":
            assert outs == {0: 0, 1: 1, 64: 64}  # as much as it gets: a reflector, not an amplifier
        else:  # the reply does not depend on what came: the smaller the datagram, the more it gains
            assert outs[0] == outs[1] == outs[64] or handler == "timestamp"  # its length follows the clock
            assert outs[1] > 1
        assert (handler in AMPLIFIERS) == (outs[1] > 1), handler
    assert AMPLIFIERS - {handler for _, handler, _ in MEASURED} == {"chargen"}


# Sources of the flood, each its own loopback address (all of 127.0.0.0/8 is this host).
FLOOD_SOURCES = 64
FLOOD_ROUNDS = 20


# The models and handlers flooded: the event loops and a blocking model, and chargen, the
# amplifier with the largest answer (up to 512 bytes for an empty datagram).
FLOODED = [("selector", "daytime"), ("asyncio", "daytime"), ("threaded", "daytime"), ("iterative", "chargen")]


@pytest.mark.parametrize(("model", "handler"), FLOODED)
def test_datagram_rate_bounds_the_replies_to_each_source_and_counts_the_drops(
    start_sockd: Launcher, model: str, handler: str
) -> None:
    rate, burst = 1.0, 3
    daemon = start_sockd([entry("d", "udp", handler, model, datagram_rate=rate, datagram_burst=burst)])
    address = inet(daemon.address("d"))
    offset = FLOODED.index((model, handler))  # sources of the test's own
    with contextlib.ExitStack() as stack:
        senders = []
        for number in range(FLOOD_SOURCES):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((f"127.{40 + offset}.{number}.1", 0))
            sock.setblocking(False)
            senders.append(sock)
        began = time.monotonic()
        for round_ in range(1, FLOOD_ROUNDS + 1):
            for sock in senders:
                sock.sendto(b"?", address)
            # Each round seen by the worker before the next: none lost in its socket's buffer.
            _all_seen(daemon, round_ * FLOOD_SOURCES)
        elapsed = time.monotonic() - began
        replies = [_drain(sock) for sock in senders]
    allowed = burst + rate * elapsed + 1  # + 1: the clock of the worker's bucket is not the test's
    assert max(replies) <= allowed, (replies, elapsed)
    assert min(replies) >= burst  # each source had its burst, whatever the others sent
    answered, limited, reflected = _fates(daemon)
    assert (answered, limited) == (sum(replies), FLOOD_SOURCES * FLOOD_ROUNDS - sum(replies) - reflected)
    assert daemon.wait_for("rejected", listener="d")["reason"] == "datagram_rate"


def _all_seen(daemon: Daemon, sent: int) -> None:
    """Wait until the worker has answered or dropped every datagram sent to "d"."""
    eventually(lambda: sum(_fates(daemon)) == sent, f"{sent} datagrams answered or dropped")


def _fates(daemon: Daemon) -> tuple[float, float, float]:
    """The datagrams listener "d" answered, dropped by datagram_rate, and dropped because their
    source port happened to be the listener's own (see lifecycle.REFLECTORS: one of the many
    ephemeral ports a flood's sockets are given may be it)."""
    found = samples(daemon)
    return (
        value(found, "sockd_requests_total", listener="d"),
        value(found, "sockd_connections_rejected_total", listener="d", reason="datagram_rate"),
        value(found, "sockd_connections_rejected_total", listener="d", reason="reflection"),
    )


def _drain(sock: socket.socket) -> int:
    """How many replies wait at a non-blocking socket (each sent before its count was published)."""
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.recv(100)
            count += 1
    return count


def test_a_flood_from_more_sources_than_are_remembered_leaves_the_worker_s_memory_bounded(
    start_sockd: Launcher,
) -> None:
    """Sources beyond limits.MEMORY, each its own 127.x.y.z as forged sources would be, are
    forgotten: the worker's memory grows by no more than a bound, however many come."""
    # A receive buffer that holds a whole batch: none is lost before the worker counts it.
    rules: dict[str, Any] = {"datagram_rate": 0.01, "datagram_burst": 1, "recv_buffer": 1 << 20}
    daemon = start_sockd([entry("d", "udp", "daytime", "selector", **rules)])
    address, pid = inet(daemon.address("d")), daemon.worker_pid("d")
    before = rss_bytes(pid)
    batch = 512
    for first in range(0, 3 * MEMORY, batch):
        for number in range(first, first + batch):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((f"127.{100 + (number >> 16)}.{(number >> 8) & 255}.{number & 255}", 0))
                sock.sendto(b"?", address)
        _all_seen(daemon, first + batch)
    answered, limited, reflected = _fates(daemon)
    assert (answered, limited) == (3 * MEMORY - reflected, 0)  # each a new source, with its burst's reply
    assert rss_bytes(pid) < before + (8 << 20)


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
        (["10.0.0.0/8"], [], "", False),  # no address: matches no block
        ([], ["10.0.0.0/8"], "/run/balancer.sock", True),  # a client a PROXY header names by its path
    ],
)
def test_access_list(allow: list[str], deny: list[str], host: str, allowed: bool) -> None:
    assert AccessList(_networks(*allow), _networks(*deny)).allows(host) is allowed


def test_the_token_bucket_refills_at_the_rate() -> None:
    # The bucket's clock is the test's: at this rate, a pause of a millisecond between two takes
    # (a busy machine's scheduler gives that) would refill a token.
    now = [1000.0]
    buckets = TokenBuckets(1000.0, 3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    now[0] += 0.01  # ten tokens' worth, capped at the burst
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]


def test_the_token_buckets_forget_sources_beyond_a_bound() -> None:
    buckets = TokenBuckets(0.001, 1, clock=time.monotonic)
    for number in range(3 * MEMORY):
        buckets.take(f"10.0.{number // 256}.{number % 256}")
    assert len(buckets.buckets) <= MEMORY


@pytest.mark.parametrize(
    ("options", "connections", "datagrams"),
    [
        ({"protocol": "tcp", "connection_rate": 2.5}, (2.5, 3), None),
        ({"protocol": "tcp", "connection_rate": 0.1}, (0.1, 1), None),  # at least one
        ({"protocol": "udp", "datagram_rate": 10.0}, None, (10.0, 10)),
        ({"protocol": "udp", "datagram_rate": 10.0, "datagram_burst": 40}, None, (10.0, 40)),
    ],
)
def test_each_rate_has_its_buckets_and_burst(
    options: dict[str, Any], connections: tuple[float, int] | None, datagrams: tuple[float, int] | None
) -> None:
    listener = InetListener.model_validate(
        {"name": "x", "host": "127.0.0.1", "port": 0, "handler": "echo", "concurrency": "selector"} | options
    )
    admission = admission_for(listener)
    assert isinstance(admission, Admission)
    for made, expected in ((admission.connections, connections), (admission.datagrams, datagrams)):
        assert (None if made is None else (made.rate, made.burst)) == expected


def test_a_datagram_past_its_sources_bucket_is_dropped_and_counted() -> None:
    now = [1000.0]
    listener = InetListener.model_validate(
        {"name": "x", "protocol": "udp", "host": "127.0.0.1", "port": 0, "handler": "daytime"}
        | {"concurrency": "selector", "datagram_rate": 1.0, "datagram_burst": 2}
    )
    admission, recorder = Admission(listener, clock=lambda: now[0]), Recorder([1.0])
    answered = [admission.allows_datagram(("127.0.0.1", 5000 + n), recorder) for n in range(3)]
    assert answered == [True, True, False]  # by address, whatever the port
    assert admission.allows_datagram(("127.0.0.2", 5000), recorder)  # another source's own bucket
    now[0] += 1.0
    assert admission.allows_datagram(("127.0.0.1", 5000), recorder)
    assert recorder.rejected[DATAGRAM_RATE] == 1


def test_behind_a_balancer_its_peer_is_trusted_at_accept_and_its_clients_judged_by_their_headers() -> None:
    listener = InetListener.model_validate(
        {"name": "x", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "handler": "echo"}
        | {"concurrency": "selector", "proxy_protocol": "v2", "proxy_trusted": ["10.0.0.0/8"]}
        | {"deny": ["10.0.0.0/8", "192.0.2.66/32"], "max_connections": 3, "max_connections_per_source": 1}
    )
    admission, recorder = Admission(listener), Recorder([1.0])
    assert admission.admit(("192.0.2.1", 1), None, recorder) is None  # not a balancer
    assert recorder.rejected[PROXY_PROTOCOL] == 1
    # The balancer's own block is denied: `deny` is for its clients, and it is not one.
    tickets = [admission.admit(("10.0.0.1", port), None, recorder) for port in range(3)]
    assert [ticket is not None and ticket.source is None for ticket in tickets] == [True] * 3
    assert admission.admit(("10.0.0.1", 9), None, recorder) is None  # max_connections counts at accept
    assert recorder.rejected[MAX_CONNECTIONS] == 1
    first, second, third = (ticket for ticket in tickets if ticket is not None)
    assert admission.admit_client(first, ("192.0.2.7", 1), recorder)
    assert first.source == "192.0.2.7"
    assert not admission.admit_client(second, ("192.0.2.7", 2), recorder)  # its one connection is taken
    assert not admission.admit_client(third, ("192.0.2.66", 3), recorder)
    assert (recorder.rejected[PER_SOURCE], recorder.rejected[ACL]) == (1, 1)
    for ticket in (first, second, third):
        ticket.release()
    assert (admission.open, admission.by_source) == (0, {})


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

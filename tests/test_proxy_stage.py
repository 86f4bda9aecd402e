"""A `proxy_protocol` listener's stage in the real daemon, under every model and both relays, with
headers made by hand: whole or split across reads, with the client's data in the same packet;
a peer `proxy_trusted` does not name, garbage, and a header too slow, each closed and counted;
the header's client as the source of the access rules, the per-source limits and the log line;
a balancer's own LOCAL connection served as itself; TLS after the header; a Unix listener; and
a worker that takes random garbage and survives it. (HAProxy in front: test_proxy_balancer.py.)"""

from __future__ import annotations

import random
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from test_lifecycle import BOUNDS, Recording, actions, connection, service
from test_tls import tls_of

from sockd.counters import RESET, Recorder
from sockd.lifecycle import Stream
from sockd.limits import ACL, PROXY_PROTOCOL, Admission
from sockd.proxy.reading import Header
from sockd.proxy.stage import HeaderStage, ProxyStage
from sockd.proxy.wire import AF_UNIX, PROXY

from support import (
    CA,
    CONCURRENT,
    MODELS,
    RELAY_MODELS,
    SERVER_NAME,
    Daemon,
    Launcher,
    active_connections,
    client_context,
    connect,
    echo,
    eventually,
    read_to_eof,
    receive,
    rejected,
    samples,
    short_directory,
    value,
)
from support import listener as entry
from support.proxy import LOCAL_HEADER, SERVER, header, v2

TRUSTED = ["127.0.0.1/32"]  # the balancer is the test itself; a client from 127.0.0.2 is not one
CLIENT = ("192.0.2.7", 40000)  # who the headers say the client is
DENIED = "192.0.2.66"
SLOW = 0.5  # the `slow` listener's proxy_timeout (the others have the default, 3 s)


@dataclass
class Served:
    daemon: Daemon
    model: str
    ca: Path  # what a TLS client trusts


@pytest.fixture(scope="module", params=MODELS)
def served(request: pytest.FixtureRequest, start_module_sockd: Launcher, tls_ca: CA) -> Iterator[Served]:
    """One daemon per model: echo listeners taking each version of the header (v2's with a
    `deny`), one with a short proxy_timeout, one with a per-source limit, one with TLS after the header, a Unix one; and
    for a relaying model, relays (plain and TLS) to a Unix echo listener of the same daemon."""
    model: str = request.param
    with short_directory() as directory:
        ca = tls_ca.write(directory)
        tls = tls_of(tls_ca.server().write(directory, "server"))
        proxied: dict[str, Any] = {"proxy_trusted": TRUSTED, "log_connections": True}
        listeners = [
            entry("v1", "tcp", "echo", model, proxy_protocol="v1", **proxied),
            entry("v2", "tcp", "echo", model, proxy_protocol="v2", deny=[f"{DENIED}/32"], **proxied),
            entry("any", "tcp", "echo", model, proxy_protocol="any", **proxied),
            entry("slow", "tcp", "echo", model, proxy_protocol="any", proxy_timeout=SLOW, **proxied),
            entry("limited", "tcp", "echo", model, proxy_protocol="v2", max_connections_per_source=1, **proxied),
            entry("tls", "tcp", "echo", model, proxy_protocol="v2", tls=tls, **proxied),
            entry("unix", "unix", "echo", model, directory / "u.sock", proxy_protocol="v1", log_connections=True),
        ]
        if model in RELAY_MODELS:
            upstream = f"unix://{directory / 'up.sock'}"
            listeners += [
                entry("upstream", "unix", "echo", "selector", directory / "up.sock"),
                entry("relay", "tcp", "relay", model, proxy_protocol="v2", upstream=upstream, **proxied),
                entry("relay-tls", "tcp", "relay", model, proxy_protocol="v1", upstream=upstream, tls=tls, **proxied),
            ]
        daemon = start_module_sockd(listeners)
        yield Served(daemon, model, ca)
        assert daemon.stop() == 0


def refused(address: str, payload: bytes, source: str | None = None) -> bool:
    """Whether the server closes a connection that sent `payload` without a byte in answer."""
    try:
        with connect(address, source=source) as sock:
            sock.sendall(payload)
            return sock.recv(1) == b""
    except ConnectionError:  # closed with what we sent unread: a reset
        return True


def counted(daemon: Daemon, name: str, reason: str, before: float) -> None:
    eventually(lambda: rejected(daemon, name, reason) == before + 1, f"one more {reason} rejected on {name}")


def exchange(address: str, payload: bytes, data: bytes = b"hello") -> bytes:
    """What comes back for `payload` then `data`, once the client has ended its output (nothing,
    if the server closes it first, even by a reset)."""
    try:
        with connect(address) as sock:
            sock.sendall(payload + data)
            sock.shutdown(socket.SHUT_WR)
            return read_to_eof(sock)
    except ConnectionError:
        return b""


# -- in-process: the stage driven as a model drives it, its transport recording what it is asked


def staging(**options: Any) -> tuple[Stream, Recording, HeaderStage]:
    """A connection from the balancer 127.0.0.1 to a listener taking either version, opened:
    its transport drives the stage."""
    shared = service(stage=ProxyStage("any", 3.0), proxy_protocol="any", proxy_trusted=["127.0.0.1/32"], **options)
    ticket = shared.admission.admit(("127.0.0.1", 5555), None, Recorder(BOUNDS))
    assert ticket is not None
    conn = connection(shared, ticket)
    conn.opened()
    transport = cast(Recording, conn.transport)
    stage = transport.get_protocol()
    assert isinstance(stage, HeaderStage)
    return conn, transport, stage


def test_the_client_a_header_names_is_kept_on_the_connection_and_one_named_by_none_is_not() -> None:
    conn, transport, stage = staging()
    stage.data_received(header("v2", CLIENT) + b"hi")
    assert conn.proxied == Header(2, CLIENT, SERVER)
    assert transport.get_protocol() is conn
    assert actions(conn) == [("write", b"hi")]
    local, _, stage = staging()
    stage.data_received(LOCAL_HEADER)
    assert local.proxied is None  # the connection's own addresses are the client's


def test_only_a_header_cut_short_is_refused_at_the_peers_end_not_a_peer_that_only_connected() -> None:
    quiet, transport, stage = staging()
    stage.eof_received()
    assert (transport.actions, quiet.recorder.rejected[PROXY_PROTOCOL]) == (["close"], 0)
    cut, transport, stage = staging()
    stage.data_received(b"PROXY TCP4 ")
    stage.eof_received()
    assert (transport.actions, cut.recorder.rejected[PROXY_PROTOCOL]) == (["close"], 1)


def test_a_stage_this_side_cut_short_is_refused_and_a_reset_is_only_a_reset() -> None:
    timed_out, _, stage = staging()
    stage.connection_lost(None)  # aborted: its proxy_timeout passed
    assert (timed_out.recorder.rejected[PROXY_PROTOCOL], timed_out.recorder.closed) == (1, 1)
    reset, _, stage = staging()
    stage.data_received(b"\r\n\r\n")
    stage.connection_lost(ConnectionResetError())
    assert (reset.recorder.rejected[PROXY_PROTOCOL], reset.recorder.errors[RESET], reset.recorder.closed) == (0, 1, 1)


def test_a_client_the_source_rules_refuse_is_closed_and_its_place_given_back() -> None:
    conn, transport, stage = staging(deny=["192.0.2.0/24"], max_connections=1)
    admission = conn.service.admission
    assert isinstance(admission, Admission)
    stage.data_received(header("v1", CLIENT) + b"never seen")
    assert transport.actions == ["close"]
    assert (conn.recorder.rejected[ACL], conn.proxied, conn.ticket.source) == (1, None, None)
    conn.connection_lost(None)
    assert (admission.open, admission.by_source) == (0, {})


# -- the real daemon


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_and_the_clients_data_in_one_packet_are_served_as_the_client_it_names(
    served: Served, version: str
) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    assert exchange(daemon.address(version), header(version, CLIENT)) == b"hello"
    # Found by its client: an earlier test's connection may be said closed after `mark` too.
    line = daemon.wait_for("connection closed", listener=version, after=mark, source=CLIENT[0], port=CLIENT[1])
    assert (line["source"], line["port"]) == CLIENT
    assert line["via"].startswith("127.0.0.1:")  # the balancer's address
    assert (line["bytes_in"], line["ended"]) == (5, "client closed")  # the header is not the client's


def test_a_header_split_across_reads_is_whole_before_a_byte_reaches_the_handler(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    wire = header("v1", CLIENT)
    with connect(daemon.address("v1")) as sock:
        for piece in (wire[:3], wire[3:20], wire[20:-1], wire[-1:] + b"hel", b"lo"):
            sock.sendall(piece)
            time.sleep(0.02)  # most likely a read of its own; never a reason to fail
        sock.sendall(b"!")
        assert receive(sock, 6) == b"hello!"
    line = daemon.wait_for("connection closed", listener="v1", after=mark, bytes_in=6)  # this one's, not an earlier
    assert line["source"] == CLIENT[0]


def test_a_peer_proxy_trusted_does_not_name_is_closed_at_once_and_counted(served: Served) -> None:
    daemon = served.daemon
    before = rejected(daemon, "v1", "proxy_protocol")
    assert refused(daemon.address("v1"), header("v1", CLIENT) + b"hello", source="127.0.0.2")
    counted(daemon, "v1", "proxy_protocol", before)


@pytest.mark.parametrize(
    ("name", "garbage"),
    [
        ("v1", b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"),
        ("v1", LOCAL_HEADER),  # version 2 where version 1 is expected
        ("v2", header("v1", CLIENT)),  # and the other way
        ("any", b"PROXY TCP4 192.0.2.007 192.0.2.1 1 2\r\n"),
    ],
)
def test_garbage_from_a_trusted_peer_is_closed_and_counted_and_the_worker_serves_on(
    served: Served, name: str, garbage: bytes
) -> None:
    daemon = served.daemon
    before = rejected(daemon, name, "proxy_protocol")
    assert refused(daemon.address(name), garbage)
    counted(daemon, name, "proxy_protocol", before)
    assert exchange(daemon.address(name), header("v1" if name != "v2" else "v2", CLIENT)) == b"hello"


def test_a_header_not_whole_within_proxy_timeout_closes_the_connection(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    before = rejected(daemon, "slow", "proxy_protocol")
    with connect(daemon.address("slow")) as sock:
        sock.sendall(header("v1", CLIENT)[:20])  # and then nothing: the server is the one to end it
        assert sock.recv(1) == b""
    counted(daemon, "slow", "proxy_protocol", before)
    assert daemon.wait_for("connection closed", listener="slow", after=mark)["ended"] == "timeout"


def test_a_balancers_own_local_connection_is_served_as_itself(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    with connect(daemon.address("v2")) as sock:
        port = sock.getsockname()[1]
        sock.sendall(LOCAL_HEADER + b"health?")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"health?"
    # Its own line, by the port only this connection had: an earlier test's connection (from the
    # header's client) may be said closed after `mark` too.
    line = daemon.wait_for("connection closed", listener="v2", after=mark, port=port)
    assert line["source"] == "127.0.0.1"
    assert "via" not in line


def test_a_client_named_by_a_unix_path_matches_no_address_block(served: Served) -> None:
    daemon = served.daemon
    paths = b"/run/balancer.sock".ljust(108, b"\0") + b"/run/sockd.sock".ljust(108, b"\0")
    mark = len(daemon.events)
    assert exchange(daemon.address("v2"), v2(PROXY, AF_UNIX, paths)) == b"hello"  # v2 has a deny list only
    assert daemon.wait_for("connection closed", listener="v2", after=mark, source="/run/balancer.sock")


def test_deny_is_decided_by_the_headers_client_not_by_the_balancer(served: Served) -> None:
    daemon, address = served.daemon, served.daemon.address("v2")
    before = rejected(daemon, "v2", "acl")
    assert refused(address, header("v2", (DENIED, 1234)) + b"hello")
    counted(daemon, "v2", "acl", before)
    assert exchange(address, header("v2", ("192.0.2.67", 1234))) == b"hello"


# iterative serves one connection at a time: the next would wait in the backlog, not be refused.
@pytest.mark.parametrize("served", CONCURRENT, indirect=True)
def test_max_connections_per_source_counts_by_the_headers_client(served: Served) -> None:
    daemon, address = served.daemon, served.daemon.address("limited")
    before = rejected(daemon, "limited", "max_connections_per_source")
    with connect(address) as held:
        held.sendall(header("v2", ("192.0.2.9", 1)))
        assert echo(held, b"held") == b"held"  # in, and counted by 192.0.2.9
        assert refused(address, header("v2", ("192.0.2.9", 2)) + b"hello")
        counted(daemon, "limited", "max_connections_per_source", before)
        # Another client through the same balancer, while the first is still held.
        assert exchange(address, header("v2", ("192.0.2.10", 3))) == b"hello"
    # Its place is given back by its client's count, not the balancer's.
    eventually(lambda: exchange(address, header("v2", ("192.0.2.9", 4))) == b"hello", "192.0.2.9 served again")


def test_tls_follows_the_header_on_the_same_connection(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    raw = connect(daemon.address("tls"))
    raw.sendall(header("v2", CLIENT))
    with client_context(served.ca).wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
        assert echo(sock, b"through TLS") == b"through TLS"
    line = daemon.wait_for("connection closed", listener="tls", after=mark)
    assert (line["source"], line["port"]) == CLIENT
    assert line["tls"].startswith("TLSv1.")


def test_a_handshake_that_fails_after_the_header_is_said_of_the_headers_client(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    assert exchange(daemon.address("tls"), header("v2", CLIENT), b"\x16\x03\x01\x00\x01\xff") == b""
    # Throttled: said at once, or at the end of the window another failure opened.
    daemon.wait_for("TLS handshake failed", after=mark, timeout=20, source=CLIENT[0], port=CLIENT[1])


def test_a_handshake_before_the_header_is_garbage(served: Served) -> None:
    daemon = served.daemon
    before = rejected(daemon, "tls", "proxy_protocol")
    with connect(daemon.address("tls")) as raw, pytest.raises((ssl.SSLError, ConnectionError)):
        client_context(served.ca).wrap_socket(raw, server_hostname=SERVER_NAME)
    counted(daemon, "tls", "proxy_protocol", before)


def test_a_unix_listener_takes_the_header_from_its_peers(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    assert exchange(daemon.address("unix"), header("v1", CLIENT)) == b"hello"
    line = daemon.wait_for("connection closed", listener="unix", after=mark)
    assert (line["source"], line["port"]) == CLIENT
    assert "peer_uid" in line  # the balancer, as a Unix peer is named


def upstream_connections(daemon: Daemon) -> float:
    return value(samples(daemon), "sockd_connections_total", listener="upstream")


@pytest.mark.parametrize("served", RELAY_MODELS, indirect=True)
def test_a_relay_passes_on_what_follows_the_header_and_logs_the_client(served: Served) -> None:
    daemon = served.daemon
    mark = len(daemon.events)
    assert exchange(daemon.address("relay"), header("v2", CLIENT), b"relayed") == b"relayed"
    line = daemon.wait_for("connection closed", listener="relay", after=mark)
    assert (line["source"], line["port"], line["bytes_in"]) == (*CLIENT, 7)


@pytest.mark.parametrize("served", RELAY_MODELS, indirect=True)
def test_a_relay_refuses_garbage_before_its_upstream_is_even_connected(served: Served) -> None:
    daemon = served.daemon
    # The daemon serves the whole module: an earlier test's relayed connections must be over (and
    # counted) before the count is taken, or one of theirs would pass for this test's.
    eventually(
        lambda: active_connections(daemon, "relay") == active_connections(daemon, "upstream") == 0,
        "the earlier tests' relayed connections closed",
    )
    before, connected = rejected(daemon, "relay", "proxy_protocol"), upstream_connections(daemon)
    assert refused(daemon.address("relay"), b"SSH-2.0-OpenSSH_9.2\r\n")
    counted(daemon, "relay", "proxy_protocol", before)
    assert exchange(daemon.address("relay"), header("v2", CLIENT)) == b"hello"  # one upstream connection
    eventually(lambda: upstream_connections(daemon) == connected + 1, "the served client's upstream connection")


@pytest.mark.parametrize("served", RELAY_MODELS, indirect=True)
def test_a_relay_with_tls_reads_the_header_then_the_handshake(served: Served) -> None:
    daemon = served.daemon
    raw = connect(daemon.address("relay-tls"))
    raw.sendall(header("v1", CLIENT))
    with client_context(served.ca).wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
        assert echo(sock, b"relayed through TLS") == b"relayed through TLS"


def mutated(rng: random.Random) -> bytes:
    """A header of either version, cut short or with bytes changed, inserted or removed (or
    left whole), then bytes of a client's."""
    wire = bytearray(rng.choice([header("v1", CLIENT), header("v2", CLIENT), header("v1", ("::1", 1)), LOCAL_HEADER]))
    for _ in range(rng.randrange(4)):
        at = rng.randrange(len(wire) + 1)
        how = rng.choice(["change", "insert", "remove", "cut"])
        if how == "change" and at < len(wire):
            wire[at] = rng.randrange(256)
        elif how == "insert":
            wire[at:at] = rng.randbytes(rng.randrange(1, 4))
        elif how == "remove":
            del wire[at : at + rng.randrange(1, 4)]
        elif how == "cut":
            del wire[at:]
    return bytes(wire)


def test_random_garbage_is_refused_and_counted_and_the_worker_survives_it(served: Served) -> None:
    daemon = served.daemon
    worker = daemon.worker_pid("any")
    before = rejected(daemon, "any", "proxy_protocol")
    rng = random.Random(23)
    refusals = 0
    for _ in range(60):
        wire = mutated(rng)
        answer = exchange(daemon.address("any"), wire, b"MARK")
        # Refused (nothing), or served as a client: what came after its header, echoed.
        assert (wire + b"MARK").endswith(answer)
        refusals += answer == b""
    assert refusals > 30  # most mutations break the header
    eventually(lambda: rejected(daemon, "any", "proxy_protocol") == before + refusals, "every refusal counted")
    assert daemon.worker_pids("any") == [worker]  # never replaced: it did not crash

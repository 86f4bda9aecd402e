"""The real HAProxy (Debian's 2.6, `mode tcp`) as the balancer in front of sockd, under every model
and both relays, sending the header of either version (`send-proxy`, `send-proxy-v2`): the
client's address crosses the balancer (a client from 127.0.0.2 denied by `deny`, one from
127.0.0.3 served, and named in the log line), HAProxy's unique ID and CRC32c come through, TLS
passes through HAProxy after its header, and its health checks are never taken for garbage."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_tls import tls_of

from support import (
    CA,
    MODELS,
    RELAY_MODELS,
    SEND_PROXY,
    SERVER_NAME,
    Daemon,
    Launcher,
    balancer,
    client_context,
    connect,
    echo,
    errors,
    eventually,
    read_to_eof,
    rejected,
    short_directory,
)
from support import listener as entry

DENIED, SERVED = "127.0.0.2", "127.0.0.3"  # two clients of the balancer, on this host's loopback


@dataclass
class Served:
    daemon: Daemon
    model: str
    ca: Path


@pytest.fixture(scope="module", params=MODELS)
def served(request: pytest.FixtureRequest, start_module_sockd: Launcher, tls_ca: CA) -> Iterator[Served]:
    """One daemon per model: an echo listener for each version of the header, one with TLS, and
    for a relaying model a relay for each (to a Unix echo listener of the same daemon); each
    trusts HAProxy on 127.0.0.1 and denies the client on 127.0.0.2."""
    model: str = request.param
    with short_directory() as directory:
        proxied: dict[str, Any] = {"proxy_trusted": ["127.0.0.1/32"], "deny": [f"{DENIED}/32"], "log_connections": True}
        tls = tls_of(tls_ca.server().write(directory, "server"))
        listeners = [
            entry(f"echo-{version}", "tcp", "echo", model, proxy_protocol=version, **proxied) for version in SEND_PROXY
        ]
        listeners.append(entry("tls", "tcp", "echo", model, proxy_protocol="any", tls=tls, **proxied))
        if model in RELAY_MODELS:
            upstream = f"unix://{directory / 'up.sock'}"
            listeners.append(entry("upstream", "unix", "echo", "selector", directory / "up.sock"))
            listeners += [
                entry(f"relay-{version}", "tcp", "relay", model, proxy_protocol=version, upstream=upstream, **proxied)
                for version in SEND_PROXY
            ]
        daemon = start_module_sockd(listeners)
        yield Served(daemon, model, tls_ca.write(directory))
        assert daemon.stop() == 0


def through(front: str, source: str, payload: bytes = b"hello") -> bytes:
    """What a client at `source` gets back through the balancer at `front` for `payload`, once it
    has ended its output: nothing if it is refused (sockd closes HAProxy's connection, and
    HAProxy its client's)."""
    with connect(front, source=source) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            return read_to_eof(sock)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize("version", list(SEND_PROXY))
def test_the_clients_address_crosses_haproxy(served: Served, tmp_path: Path, version: str) -> None:
    crosses(served.daemon, f"echo-{version}", tmp_path, version)


@pytest.mark.parametrize("version", list(SEND_PROXY))
@pytest.mark.parametrize("served", RELAY_MODELS, indirect=True)
def test_the_clients_address_crosses_haproxy_and_the_relay(served: Served, tmp_path: Path, version: str) -> None:
    crosses(served.daemon, f"relay-{version}", tmp_path, version)


def crosses(daemon: Daemon, name: str, directory: Path, version: str) -> None:
    """A client from SERVED is served through HAProxy and named in the log line; one from DENIED
    is refused by `deny`, judged by the address in HAProxy's header."""
    with balancer(directory, daemon.address(name), SEND_PROXY[version]) as front:
        mark = len(daemon.events)
        assert through(front, SERVED) == b"hello"
        # Found by its client: an earlier test's refused client may be said closed after `mark`.
        line = daemon.wait_for("connection closed", listener=name, after=mark, source=SERVED)
        assert line["via"].startswith("127.0.0.1:")  # HAProxy's own connection to sockd
        before = rejected(daemon, name, "acl")
        assert through(front, DENIED) == b""
        eventually(lambda: rejected(daemon, name, "acl") == before + 1, f"the client from {DENIED} denied")
        assert rejected(daemon, name, "proxy_protocol") == 0  # HAProxy's headers were all valid


def test_haproxys_unique_id_and_crc32c_come_through(served: Served, tmp_path: Path) -> None:
    daemon = served.daemon
    options = ("send-proxy-v2", "proxy-v2-options", "unique-id,crc32c")
    with balancer(tmp_path, daemon.address("echo-v2"), *options) as front:
        mark = len(daemon.events)
        assert through(front, SERVED) == b"hello"
    # Found by its client and its ID: an earlier test's client may be said closed after `mark`.
    eventually(
        lambda: any(
            str(event.get("unique_id", "")).startswith("7F000003:")  # HAProxy's format: the client's address in hex
            for event in daemon.events[mark:]
            if event.get("event") == "connection closed" and event.get("listener") == "echo-v2"
        ),
        "the connection's line with HAProxy's unique ID",
    )  # HAProxy's format: the client's address in hex


@pytest.mark.parametrize("version", list(SEND_PROXY))
def test_tls_passes_through_haproxy_after_its_header(served: Served, tmp_path: Path, version: str) -> None:
    daemon = served.daemon
    with balancer(tmp_path, daemon.address("tls"), SEND_PROXY[version]) as front:
        mark = len(daemon.events)
        raw = connect(front, source=SERVED)
        with client_context(served.ca).wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
            assert echo(sock, b"through HAProxy and TLS") == b"through HAProxy and TLS"
        line = daemon.wait_for("connection closed", listener="tls", after=mark, source=SERVED)
    assert line["tls"][:6] == "TLSv1."


@pytest.mark.parametrize("version", list(SEND_PROXY))
def test_haproxys_health_checks_are_never_taken_for_garbage(served: Served, tmp_path: Path, version: str) -> None:
    """HAProxy checks a server with the PROXY protocol it sends it (v2: a LOCAL header, which
    names no client), and resets each check's connection, sometimes before sockd has read it."""
    daemon, name = served.daemon, f"echo-{version}"
    worker = daemon.worker_pid(name)
    resets = errors(daemon, name, "reset")
    with balancer(tmp_path, daemon.address(name), SEND_PROXY[version], "check", "inter", "50ms"):
        # Each check ends in a reset, wherever it finds sockd: before the loop made its transport,
        # in its stage, or once its LOCAL header let it in.
        eventually(lambda: errors(daemon, name, "reset") >= resets + 5, "five of HAProxy's checks")
    assert rejected(daemon, name, "proxy_protocol") == 0
    assert daemon.worker_pids(name) == [worker]  # and the worker took every one in its stride

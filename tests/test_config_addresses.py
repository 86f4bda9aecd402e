"""The config's rules on where a listener listens: ports, hosts, Unix paths, and two listeners
that cannot both be bound, with the exact `FILE:LINE: FIELD: message` lines `sockd --check`
prints (checked in-process with sockd.tls.material.load_config, see support.check)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from sockd.config import ConfigError, InetListener, parse
from sockd.sockets import BindError, bind

from support import Expected, assert_rejected

# ---------------------------------------------------------------------------------------------
# Ports and addresses

PORTS_AND_ADDRESSES = [
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 70000
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].port", "input should be less than or equal to 65535")],
        id="port_above_65535",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: udp
            host: 127.0.0.1
            port: -1
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].port", "input should be greater than or equal to 0")],
        id="port_below_0",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: http
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].port", "input should be a valid integer")],
        id="port_that_is_not_a_number",
    ),
    # strict: YAML's `true` is not read as the port 1.
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: true
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].port", "input should be a valid integer")],
        id="port_true_is_rejected",
    ),
    pytest.param(
        """
        metrics:
          port: 99999
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(2, "metrics.port", "input should be less than or equal to 65535")],
        id="metrics_port_above_65535",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            path: /tmp/web.sock
            handler: echo
            concurrency: threaded
        """,
        [(6, "listeners[0].path", "only valid with protocol: unix")],
        id="tcp_listener_with_a_path",
    ),
    pytest.param(
        """
        listeners:
          - name: local
            protocol: unix
            path: /tmp/local.sock
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].port", "only valid with protocol: tcp or udp")],
        id="unix_listener_with_a_port",
    ),
    pytest.param(
        """
        listeners:
          - name: local
            protocol: unix
            host: 127.0.0.1
            path: /tmp/local.sock
            handler: echo
            concurrency: threaded
        """,
        [(4, "listeners[0].host", "only valid with protocol: tcp or udp")],
        id="unix_listener_with_a_host",
    ),
    pytest.param(
        """
        logging:
          level: info
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            handler: echo
            concurrency: threaded
        """,
        [(4, "listeners[0].port", "required")],
        id="tcp_listener_without_a_port",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
          - name: local
            protocol: unix
            handler: echo
            concurrency: threaded
        """,
        [(8, "listeners[1].path", "required")],
        id="unix_listener_without_a_path",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(2, "listeners[0].protocol", "required")],
        id="listener_without_a_protocol",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            host: 127.0.0.1
            port: 80
            protocol: sctp
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].protocol", "input should be 'tcp', 'udp' or 'unix', not 'sctp'")],
        id="protocol_sctp",
    ),
    pytest.param(
        """
        listeners:
          - name: one
            protocol: tcp
            host: 127.0.0.1
            port: 8080
            handler: echo
            concurrency: threaded
          - name: two
            protocol: tcp
            host: 127.0.0.1
            port: 8080
            handler: timestamp
            concurrency: selector
        """,
        [(11, "listeners[1].port", "tcp 127.0.0.1:8080 is already used by listener 'one' (listeners[0])")],
        id="two_listeners_on_the_same_tcp_address",
    ),
    pytest.param(
        """
        listeners:
          - name: one
            protocol: udp
            host: "::1"
            port: 53
            handler: echo
            concurrency: threaded
          - name: two
            protocol: udp
            host: "::1"
            port: 53
            handler: echo
            concurrency: threaded
        """,
        [(11, "listeners[1].port", "udp [::1]:53 is already used by listener 'one' (listeners[0])")],
        id="two_listeners_on_the_same_ipv6_address",
    ),
    pytest.param(
        """
        listeners:
          - name: one
            protocol: unix
            path: /tmp/shared.sock
            handler: echo
            concurrency: threaded
          - name: two
            protocol: unix
            path: /tmp/shared.sock
            handler: echo
            concurrency: asyncio
        """,
        [(9, "listeners[1].path", "unix /tmp/shared.sock is already used by listener 'one' (listeners[0])")],
        id="two_unix_listeners_on_the_same_path",
    ),
]


@pytest.mark.parametrize(("text", "expected"), PORTS_AND_ADDRESSES)
def test_ports_and_addresses(tmp_path: Path, text: str, expected: list[Expected]) -> None:
    assert_rejected(tmp_path, text, *expected)


# ---------------------------------------------------------------------------------------------
# Two listeners that cannot both be bound: --check says so exactly when Linux would refuse


@pytest.mark.parametrize(
    ("first", "second", "field", "clash"),
    [
        ("tcp 0.0.0.0", "tcp 127.0.0.1", "host", "0.0.0.0 takes the port on every IPv4 address"),
        ("udp 127.0.0.1", "udp 0.0.0.0", "host", "0.0.0.0 takes the port on every IPv4 address"),
        ("tcp 0.0.0.0 reuse_port", "tcp 127.0.0.1 reuse_port", None, None),
        ("tcp :: ", "tcp 0.0.0.0", "host", ":: takes the port over IPv4 too, unless it sets ipv6_only: true"),
        ("udp 0.0.0.0", "udp ::", "host", ":: takes the port over IPv4 too, unless it sets ipv6_only: true"),
        ("tcp :: ipv6_only", "tcp 0.0.0.0", None, None),
        ("tcp :: ipv6_only", "tcp 127.0.0.1", None, None),
        ("tcp ::", "tcp 127.0.0.1", "host", ":: takes the port over IPv4 too, unless it sets ipv6_only: true"),
        ("tcp ::", "tcp ::1", "host", ":: takes the port on every IPv6 address"),
        ("tcp ::1", "tcp 0.0.0.0", None, None),
        ("tcp 127.0.0.1", "tcp 127.0.0.2", None, None),
        ("tcp 0.0.0.0", "udp 0.0.0.0", None, None),
        ("tcp 127.0.0.1", "tcp 127.0.0.1", "port", None),
    ],
)
def test_listeners_that_cannot_both_be_bound_are_refused_as_linux_refuses_them(
    first: str, second: str, field: str | None, clash: str | None
) -> None:
    port = _free_port()
    entries = []
    for index, spec in enumerate((first, second)):
        protocol, host, *options = spec.split()
        entry: dict[str, object] = {"name": f"l{index}", "protocol": protocol, "host": host, "port": port}
        entry |= {"handler": "echo", "concurrency": "selector", **dict.fromkeys(options, True)}
        entries.append(entry)
    text = yaml.safe_dump({"listeners": entries}, sort_keys=False)
    try:
        parse(text, "c.yaml")
        problems = []
    except ConfigError as exc:
        problems = exc.problems
    bound = []
    try:
        for entry in entries:
            bound.append(bind(InetListener.model_validate(entry)))
    except BindError:
        pass
    finally:
        for each in bound:
            each.close()
    assert (len(bound) < 2) == bool(problems), (problems, len(bound))
    if field is not None:  # one line, on the second listener, naming the first
        [problem] = problems
        host = second.split()[1]
        shown = re.escape(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        assert re.fullmatch(
            rf"c\.yaml:\d+: listeners\[1\]\.{field}: \w+ {shown} .* listener 'l0' \(listeners\[0\]\).*", problem
        )
        assert clash is None or clash in problem, problem


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:  # dual-stack: free over IPv4 too
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])

"""A listener's PROXY protocol settings (`proxy_protocol`, `proxy_trusted`, `proxy_timeout`): what
the schema and its rules refuse, one `file:line: field: message` line each (checked in-process,
see support.check; test_cli.py pins that the command prints the same), and what they accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import Expected, assert_accepted, assert_rejected, yaml_text

LISTENER = """
listeners:
  - name: behind
    protocol: tcp
    host: 127.0.0.1
    port: 0
    handler: echo
    concurrency: asyncio
"""
UNIX = """
listeners:
  - name: behind
    protocol: unix
    path: /tmp/behind.sock
    handler: echo
    concurrency: asyncio
"""


def with_lines(text: str, *lines: str) -> str:
    """A listener's config with these lines added to it (the first is the line after its last)."""
    return yaml_text(text) + "".join(f"    {line}\n" for line in lines)


NEEDS_TRUSTED = (
    "needs proxy_trusted: the balancers' address blocks (as in [10.0.0.0/8]); a connection from any other"
    " source is refused, as a header from it could name any client"
)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(["proxy_protocol: v2"], [(8, "listeners[0].proxy_protocol", NEEDS_TRUSTED)], id="untrusted"),
        pytest.param(
            ["proxy_protocol: v1", "proxy_trusted: []"],
            [(8, "listeners[0].proxy_protocol", NEEDS_TRUSTED)],
            id="trusting_no_one",
        ),
        pytest.param(
            ["proxy_protocol: v3", "proxy_trusted: [10.0.0.0/8]"],
            [(8, "listeners[0].proxy_protocol", "input should be 'v1', 'v2' or 'any'")],
            id="no_such_version",
        ),
        pytest.param(
            ["proxy_protocol: any", "proxy_trusted: [10.0.0.300/32]"],
            [
                (
                    9,
                    "listeners[0].proxy_trusted[0]",
                    "not an address block: '10.0.0.300/32' does not appear to be an IPv4 or IPv6 network",
                )
            ],
            id="a_bad_block",
        ),
        pytest.param(
            ["proxy_trusted: [10.0.0.0/8]", "proxy_timeout: 1"],
            [
                (8, "listeners[0].proxy_trusted", "only valid with proxy_protocol"),
                (9, "listeners[0].proxy_timeout", "only valid with proxy_protocol"),
            ],
            id="without_proxy_protocol",
        ),
        pytest.param(
            ["proxy_protocol: v1", "proxy_trusted: [10.0.0.0/8]", "proxy_timeout: 0"],
            [(10, "listeners[0].proxy_timeout", "input should be greater than 0")],
            id="no_time_at_all",
        ),
    ],
)
def test_the_proxy_settings_are_checked(tmp_path: Path, lines: list[str], expected: list[Expected]) -> None:
    assert_rejected(tmp_path, with_lines(LISTENER, *lines), *expected)


def test_the_proxy_protocol_over_udp_is_out_of_scope(tmp_path: Path) -> None:
    text = with_lines(LISTENER.replace("protocol: tcp", "protocol: udp"), "proxy_protocol: v2")
    message = "only valid with protocol: tcp or unix (the PROXY protocol over UDP is out of scope)"
    assert_rejected(tmp_path, text, (8, "listeners[0].proxy_protocol", message))


def test_a_unix_listener_trusts_its_peers_by_their_credentials_or_its_file_not_by_address(tmp_path: Path) -> None:
    text = with_lines(UNIX, "proxy_protocol: v1", "proxy_trusted: [127.0.0.1/32]")
    message = (
        "not valid with protocol: unix: a Unix listener trusts its peers by allow_uids/allow_gids"
        " or its socket file's mode"
    )
    assert_rejected(tmp_path, text, (8, "listeners[0].proxy_trusted", message))


def test_a_listener_behind_a_balancer_is_accepted(tmp_path: Path) -> None:
    tcp = with_lines(LISTENER, "proxy_protocol: any", "proxy_trusted: [10.0.0.0/8, 2001:db8::/32]", "proxy_timeout: 5")
    relay = yaml_text(
        """
        listeners:
          - {name: relay, protocol: tcp, host: 127.0.0.1, port: 0, handler: relay, concurrency: selector,
             upstream: "tcp://127.0.0.1:5432", proxy_protocol: v2, proxy_trusted: [10.0.0.0/8]}
          - {name: local, protocol: unix, path: /tmp/l.sock, handler: echo, concurrency: threaded,
             proxy_protocol: v1, allow_uids: [0]}
        """
    )
    assert_accepted(tmp_path, tcp, 1)
    assert_accepted(tmp_path, relay, 2)

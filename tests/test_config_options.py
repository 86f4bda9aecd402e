"""The config's rules on what a listener runs: its handler, its concurrency model, and the options
that belong to one of them (limits, socket options, the relay), where each applies and how they
go together, with the exact `FILE:LINE: FIELD: message` lines `sockd --check` prints (checked
in-process with sockd.tls.material.load_config, see support.check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockd.config import ConfigError, InetListener, parse

from support import Expected, assert_rejected

# ---------------------------------------------------------------------------------------------
# Handler, concurrency model and the options that belong to one of them

HANDLERS_AND_MODELS = [
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: reverse
            concurrency: threaded
        """,
        [
            (
                6,
                "listeners[0].handler",
                "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time', 'chargen', 'relay',"
                " 'agent' or 'exec'",
            )
        ],
        id="unknown_handler",
    ),
    pytest.param(
        """
        listeners:
          - name: agent
            protocol: udp
            host: 127.0.0.1
            port: 5555
            handler: agent
            concurrency: asyncio
        """,
        [
            (
                6,
                "listeners[0].handler",
                "agent answers HAProxy's agent-check, over TCP: only valid with protocol: tcp or unix",
            )
        ],
        id="agent_over_udp",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: forking
        """,
        [
            (
                7,
                "listeners[0].concurrency",
                "input should be 'iterative', 'threaded', 'thread_pool', 'busy_poll', 'selector' or 'asyncio'",
            )
        ],
        id="unknown_concurrency_model",
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
            threads: 8
        """,
        [
            (
                8,
                "listeners[0].threads",
                "only valid with concurrency: thread_pool (this listener has concurrency: threaded)",
            )
        ],
        id="threads_without_thread_pool",
    ),
    pytest.param(
        """
        listeners:
          - threads: 8
            name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: busy_poll
        """,
        [
            (
                2,
                "listeners[0].threads",
                "only valid with concurrency: thread_pool (this listener has concurrency: busy_poll)",
            )
        ],
        id="threads_written_before_concurrency_is_still_checked",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: thread_pool
            threads: 0
        """,
        [(8, "listeners[0].threads", "input should be greater than or equal to 1")],
        id="threads_0",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: asyncio
            selector_backend: epoll
        """,
        [
            (
                8,
                "listeners[0].selector_backend",
                "only valid with concurrency: selector (this listener has concurrency: asyncio)",
            )
        ],
        id="selector_backend_with_asyncio",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: udp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: selector
            event_loop: uvloop
        """,
        [
            (
                8,
                "listeners[0].event_loop",
                "only valid with concurrency: asyncio (this listener has concurrency: selector)",
            )
        ],
        id="event_loop_with_selector",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            timestamp_format: iso8601
            concurrency: threaded
        """,
        [(7, "listeners[0].timestamp_format", "only valid with handler: timestamp (this listener has handler: echo)")],
        id="timestamp_format_with_echo",
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
            delay: -0.5
        """,
        [(8, "listeners[0].delay", "input should be greater than or equal to 0")],
        id="negative_delay",
    ),
]


@pytest.mark.parametrize(("text", "expected"), HANDLERS_AND_MODELS)
def test_handlers_models_and_their_options(tmp_path: Path, text: str, expected: list[Expected]) -> None:
    assert_rejected(tmp_path, text, *expected)


# ---------------------------------------------------------------------------------------------
# Limits, socket options and the relay: where each applies, and how they go together.

ONE = "listeners:\n  - {name: x, handler: %s, concurrency: %s, %s}\n"


TCP, UDP, UNIX = (
    "protocol: tcp, host: 127.0.0.1, port: 1",
    "protocol: udp, host: 127.0.0.1, port: 1",
    ("protocol: unix, path: /tmp/x.sock"),
)


@pytest.mark.parametrize(
    ("handler", "model", "keys", "field", "message"),
    [
        ("echo", "selector", f"{UDP}, max_connections: 5", "max_connections", "only valid with protocol: tcp or unix"),
        ("echo", "selector", f"{UNIX}, connection_rate: 5", "connection_rate", "only valid with protocol: tcp"),
        ("echo", "selector", f"{TCP}, connection_burst: 5", "connection_burst", "only valid with connection_rate"),
        (
            "daytime",
            "selector",
            f"{TCP}, datagram_rate: 5",
            "datagram_rate",
            "only valid with protocol: udp (this listener has protocol: tcp)",
        ),
        (
            "daytime",
            "selector",
            f"{UNIX}, datagram_burst: 5",
            "datagram_burst",
            "only valid with protocol: udp (this listener has protocol: unix)",
        ),
        ("daytime", "selector", f"{UDP}, datagram_burst: 5", "datagram_burst", "only valid with datagram_rate"),
        ("daytime", "selector", f"{UDP}, datagram_rate: 0", "datagram_rate", "input should be greater than 0"),
        ("daytime", "selector", f"{UDP}, datagram_rate: .inf", "datagram_rate", "input should be a finite number"),
        ("echo", "selector", f"{TCP}, allow_uids: [0]", "allow_uids", "only valid with protocol: unix"),
        ("echo", "selector", f"{UNIX}, allow: [10.0.0.0/8]", "allow", "only valid with protocol: tcp or udp"),
        (
            "echo",
            "selector",
            f"{TCP}, deny: [10.0.0.1/8]",
            "deny[0]",
            "not an address block: 10.0.0.1/8 has host bits set",
        ),
        (
            "echo",
            "selector",
            f"{TCP}, allow: [42]",
            "allow[0]",
            "should be an address block, as in 10.0.0.0/8 or 2001:db8::/32",
        ),
        (
            "echo",
            "selector",
            f"{UDP}, idle_timeout: 5",
            "idle_timeout",
            "only valid with protocol: tcp or unix, or handler: relay",
        ),
        ("echo", "selector", f"{TCP}, first_byte_timeout: 0", "first_byte_timeout", "input should be greater than 0"),
        (
            "echo",
            "selector",
            f"{TCP}, max_message_size: 70000",
            "max_message_size",
            "input should be less than or equal to 65536",
        ),
        ("echo", "selector", f"{UNIX}, keepalive: true", "keepalive", "only valid with protocol: tcp"),
        ("echo", "selector", f"{UNIX}, reuse_port: true", "reuse_port", "only valid with protocol: tcp or udp"),
        ("echo", "selector", f"{UDP}, backlog: 10", "backlog", "only valid with protocol: tcp or unix"),
        (
            "echo",
            "selector",
            f"{UDP}, log_connections: true",
            "log_connections",
            "only valid with protocol: tcp or unix",
        ),
        ("echo", "selector", f"{UNIX}, freebind: true", "freebind", "only valid with protocol: tcp or udp"),
        ("echo", "selector", f"{TCP}, upstream: 'tcp://h:1'", "upstream", "only valid with handler: relay"),
        (
            "echo",
            "selector",
            f"{TCP}, upstream_proxy_protocol: v2",
            "upstream_proxy_protocol",
            "only valid with handler: relay",
        ),
        (
            "relay",
            "asyncio",
            f"{UDP}, upstream: 'udp://h:1', upstream_proxy_protocol: v1",
            "upstream_proxy_protocol",
            "only valid with protocol: tcp or unix (its header begins a stream, and UDP has none)",
        ),
        (
            "relay",
            "asyncio",
            f"{TCP}, upstream: 'tcp://h:1', upstream_proxy_protocol: 2",
            "upstream_proxy_protocol",
            "input should be 'v1' or 'v2'",
        ),
        ("relay", "selector", TCP, "upstream", "required with handler: relay"),
        (
            "relay",
            "threaded",
            f"{TCP}, upstream: 'tcp://h:1'",
            "concurrency",
            "handler: relay needs concurrency: selector, busy_poll or asyncio (not threaded)",
        ),
        (
            "relay",
            "asyncio",
            f"{TCP}, upstream: 'udp://h:1'",
            "upstream",
            "a udp listener relays to a udp upstream, a stream listener to tcp, tls or unix",
        ),
        (
            "relay",
            "asyncio",
            f"{TCP}, upstream: 'http://h:1'",
            "upstream",
            "should be tcp://host:port, tls://host:port, udp://host:port or unix:///path",
        ),
        (
            "relay",
            "asyncio",
            f"{TCP}, upstream: 'tcp://h:65536'",
            "upstream",
            "should be tcp://host:port, tls://host:port, udp://host:port or unix:///path",
        ),
        (
            "relay",
            "asyncio",
            f"{UDP}, upstream: 'udp://h:1', max_message_size: 9",
            "max_message_size",
            "not valid with handler: relay (it passes bytes through)",
        ),
    ],
)
def test_where_limits_options_and_the_relay_apply(
    handler: str, model: str, keys: str, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(ONE % (handler, model, keys), "c.yaml")
    [problem] = caught.value.problems
    assert problem.startswith(f"c.yaml:2: listeners[0].{field}: {message}"), problem  # then which value it has


def test_every_limit_option_and_the_relay_together_are_valid() -> None:
    text = """
listeners:
  - {name: a, protocol: tcp, host: "::", port: 0, handler: echo, concurrency: asyncio,
     max_connections: 100, max_connections_per_source: 10, connection_rate: 5.5, connection_burst: 20,
     allow: [10.0.0.0/8, "2001:db8::/32"], deny: [10.9.0.0/16], idle_timeout: 300, first_byte_timeout: 5,
     max_message_size: 1024, backlog: 128, reuse_port: true, nodelay: false, keepalive: true,
     recv_buffer: 65536, send_buffer: 65536, ipv6_only: false, freebind: true, log_connections: true}
  - {name: b, protocol: unix, path: /tmp/b.sock, handler: relay, concurrency: selector,
     upstream: "tcp://[::1]:8080", connect_timeout: 2, half_close_timeout: 1, allow_uids: [0], allow_gids: [0],
     log_connections: true, upstream_proxy_protocol: v2}
  - {name: c, protocol: udp, host: 127.0.0.1, port: 0, handler: relay, concurrency: busy_poll,
     upstream: "udp://127.0.0.1:53", idle_timeout: 30, datagram_rate: 50, datagram_burst: 100}
"""
    a, b, c = parse(text, "c.yaml").listeners
    assert isinstance(a, InetListener)
    assert [str(block) for block in a.allow] == ["10.0.0.0/8", "2001:db8::/32"]
    assert b.upstream_endpoint == ("tcp", ("::1", 8080))
    assert b.log_connections
    assert b.upstream_proxy_protocol == "v2"
    assert c.upstream_endpoint == ("udp", ("127.0.0.1", 53))
    assert (c.datagram_rate, c.datagram_burst) == (50, 100)

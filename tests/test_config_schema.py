"""The config file's rules, as the pydantic models and the checks across fields state them: each
broken once, and the exact `FILE:LINE: FIELD: message` lines `sockd --check` prints for it.

Each case is a literal YAML text (line 1 is the first line of the string), written to a file and
checked in-process with sockd.config.load (see support.check); test_cli.py pins that the command
prints exactly these lines and exits 78. Reading the YAML itself is test_config_loader.py's."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from sockd.config import ConfigError, InetListener, parse
from sockd.sockets import BindError, bind

from support import Expected, assert_accepted, assert_rejected

# ---------------------------------------------------------------------------------------------
# The issue's own example, and valid files


def test_the_example_from_the_issue(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: a
            protocol: tcp
            host: 127.0.0.1
            port: 8000
            handler: echo
            concurrency: threaded
          - name: b
            protocol: unix
            path: /tmp/b.sock
            handler: echo
            concurrency: selector
          - name: c
            port: 65536
            protocol: udp
            host: 127.0.0.1
            handler: timestamp
            concurrency: asyncio
        """,
        (14, "listeners[2].port", "input should be less than or equal to 65535"),
    )


ACCEPTED = [
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 8080
            handler: echo
            concurrency: threaded
        """,
        1,
        id="a_valid_config_with_one_listener",
    ),
    pytest.param(
        """
        metrics:
          enabled: false
          host: "::1"
          port: 9100
        logging:
          level: warning
          format: console
        shutdown_timeout: 2.5
        listeners:
          - name: pool
            protocol: tcp
            host: 127.0.0.1
            port: 0
            handler: timestamp
            timestamp_format: unix
            concurrency: thread_pool
            threads: 16
            delay: 0.25
          - name: sel
            protocol: udp
            host: 127.0.0.1
            port: 0
            handler: echo
            concurrency: selector
            selector_backend: poll
          - name: aio.local
            protocol: unix
            path: /tmp/sockd-aio.sock
            mode: "0600"
            handler: echo
            concurrency: asyncio
            event_loop: asyncio
        """,
        3,
        id="a_valid_config_using_every_setting",
    ),
    pytest.param(
        """
        listeners:
          - name: stream
            protocol: tcp
            host: 127.0.0.1
            port: 5353
            handler: echo
            concurrency: threaded
          - name: dgram
            protocol: udp
            host: 127.0.0.1
            port: 5353
            handler: echo
            concurrency: threaded
        """,
        2,
        id="tcp_and_udp_on_the_same_port_is_fine",
    ),
    pytest.param(
        """
        listeners:
          - name: one
            protocol: tcp
            host: 127.0.0.1
            port: 0
            handler: echo
            concurrency: threaded
          - name: two
            protocol: tcp
            host: 127.0.0.1
            port: 0
            handler: echo
            concurrency: threaded
        """,
        2,
        id="port_0_never_clashes",
    ),
]


@pytest.mark.parametrize(("text", "listeners"), ACCEPTED)
def test_accepted(tmp_path: Path, text: str, listeners: int) -> None:
    assert_accepted(tmp_path, text, listeners)


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
        [(6, "listeners[0].handler", "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time' or 'relay'")],
        id="unknown_handler",
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
# Names, modes and unknown keys

NAMES_MODES_AND_KEYS = [
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 81
            handler: echo
            concurrency: threaded
        """,
        [(8, "listeners[1].name", "'web' is already the name of listeners[0]")],
        id="two_listeners_with_the_same_name",
    ),
    pytest.param(
        """
        listeners:
          - name: my web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(2, "listeners[0].name", "may hold only letters, digits, '_', '.' and '-'")],
        id="name_with_a_space",
    ),
    pytest.param(
        """
        listeners:
          - name: local
            protocol: unix
            path: /tmp/local.sock
            mode: "999"
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].mode", 'should be octal permission bits, as in "0660"')],
        id="unix_mode_999",
    ),
    # YAML 1.1 reads 0660 as the octal integer 432: still one line, on the line of `mode`.
    pytest.param(
        """
        listeners:
          - name: local
            protocol: unix
            path: /tmp/local.sock
            mode: 0660
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].mode", 'must be quoted, as in mode: "0660" (YAML read the bare number as 432)')],
        id="unix_mode_unquoted",
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
        verbose: true
        """,
        [(8, "verbose", "unknown key")],
        id="unknown_top_level_key",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            colour: blue
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(5, "listeners[0].colour", "unknown key")],
        id="unknown_listener_key",
    ),
]


@pytest.mark.parametrize(("text", "expected"), NAMES_MODES_AND_KEYS)
def test_names_modes_and_keys(tmp_path: Path, text: str, expected: list[Expected]) -> None:
    assert_rejected(tmp_path, text, *expected)


# ---------------------------------------------------------------------------------------------
# The top level: listeners, logging, shutdown_timeout

TOP_LEVEL = [
    pytest.param(
        """
        logging:
          level: info
        listeners: []
        """,
        [(3, "listeners", "needs at least one listener")],
        id="empty_listeners_list",
    ),
    pytest.param(
        """
        logging:
          level: info
        """,
        [(1, "listeners", "required")],
        id="missing_listeners",
    ),
    pytest.param(
        """
        logging:
          format: json
          level: verbose
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(3, "logging.level", "input should be 'debug', 'info', 'warning' or 'error'")],
        id="logging_level_verbose",
    ),
    pytest.param(
        """
        shutdown_timeout: -1
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        [(1, "shutdown_timeout", "input should be greater than or equal to 0")],
        id="negative_shutdown_timeout",
    ),
]


@pytest.mark.parametrize(("text", "expected"), TOP_LEVEL)
def test_top_level(tmp_path: Path, text: str, expected: list[Expected]) -> None:
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
            "a udp listener relays to a udp upstream, a stream listener to tcp or unix",
        ),
        (
            "relay",
            "asyncio",
            f"{TCP}, upstream: 'http://h:1'",
            "upstream",
            "should be tcp://host:port, udp://host:port or unix:///path",
        ),
        (
            "relay",
            "asyncio",
            f"{TCP}, upstream: 'tcp://h:65536'",
            "upstream",
            "should be tcp://host:port, udp://host:port or unix:///path",
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
     log_connections: true}
  - {name: c, protocol: udp, host: 127.0.0.1, port: 0, handler: relay, concurrency: busy_poll,
     upstream: "udp://127.0.0.1:53", idle_timeout: 30}
"""
    a, b, c = parse(text, "c.yaml").listeners
    assert isinstance(a, InetListener)
    assert [str(block) for block in a.allow] == ["10.0.0.0/8", "2001:db8::/32"]
    assert b.upstream_endpoint == ("tcp", ("::1", 8080))
    assert b.log_connections
    assert c.upstream_endpoint == ("udp", ("127.0.0.1", 53))


# ---------------------------------------------------------------------------------------------
# Every problem at once: none hides another


def test_a_protocol_in_the_wrong_case_hides_none_of_the_listeners_other_problems(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: TCP
            host: 127.0.0.1
            port: 70000
            handler: Echo
            concurrency: threads
        """,
        (3, "listeners[0].protocol", "input should be 'tcp', 'udp' or 'unix', not 'TCP'"),
        (5, "listeners[0].port", "input should be less than or equal to 65535"),
        (6, "listeners[0].handler", "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time' or 'relay'"),
        (
            7,
            "listeners[0].concurrency",
            "input should be 'iterative', 'threaded', 'thread_pool', 'busy_poll', 'selector' or 'asyncio'",
        ),
    )


def test_a_protocol_that_names_no_kind_still_checks_what_does_not_depend_on_it(tmp_path: Path) -> None:
    # sctp could have meant tcp or udp: `nodelay` (tcp only) is left alone, its wrong type is not.
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: sctp
            host: 127.0.0.1
            port: 70000
            handler: echo
            concurrency: threaded
            nodelay: 3
            keepalive: true
          - name: sock
            protocol: unixx
            path: /tmp/x.sock
            mode: "999"
            handler: echo
            concurrency: threaded
        """,
        (3, "listeners[0].protocol", "input should be 'tcp', 'udp' or 'unix', not 'sctp'"),
        (5, "listeners[0].port", "input should be less than or equal to 65535"),
        (8, "listeners[0].nodelay", "input should be a valid boolean"),
        (11, "listeners[1].protocol", "input should be 'tcp', 'udp' or 'unix', not 'unixx'"),
        (13, "listeners[1].mode", 'should be octal permission bits, as in "0660"'),
    )


def test_a_rule_across_fields_is_reported_beside_the_fields_own_errors(tmp_path: Path) -> None:
    # A relay under `threaded` and a name used twice are independent of the port's error; the
    # relay's `upstream` rule is not checked on a listener whose handler has an error of its own.
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 70000
            handler: relay
            upstream: tcp://127.0.0.1:80
            concurrency: threaded
          - name: web
            protocol: TCP
            host: 127.0.0.1
            port: 8080
            handler: relay-ish
            concurrency: threaded
            threads: 2
        """,
        (5, "listeners[0].port", "input should be less than or equal to 65535"),
        (
            8,
            "listeners[0].concurrency",
            "handler: relay needs concurrency: selector, busy_poll or asyncio (not threaded)",
        ),
        (9, "listeners[1].name", "'web' is already the name of listeners[0]"),
        (10, "listeners[1].protocol", "input should be 'tcp', 'udp' or 'unix', not 'TCP'"),
        (13, "listeners[1].handler", "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time' or 'relay'"),
        (
            15,
            "listeners[1].threads",
            "only valid with concurrency: thread_pool (this listener has concurrency: threaded)",
        ),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "listeners:\n  - {name: a, protocol: tcp, host: 127.0.0.1, port: 1, handler: echo, concurency: threaded}\n",
            [
                (2, "listeners[0].concurency", "unknown key; did you mean 'concurrency'?"),
                (2, "listeners[0].concurrency", "required"),
            ],
            id="listener",
        ),
        pytest.param(
            "listeners:\n  - {name: a, protocol: unix, path: /tmp/a.sock, mdoe: '0600', handler: echo,"
            " concurrency: threaded}\n",
            [(2, "listeners[0].mdoe", "unknown key; did you mean 'mode'?")],
            id="unix_listener",
        ),
        pytest.param(
            "metrics: {prot: 9000}\nlogging: {levle: info}\nshutdown_timout: 1\nlisteners: []\n",
            [
                (1, "metrics.prot", "unknown key; did you mean 'port'?"),
                (2, "logging.levle", "unknown key; did you mean 'level'?"),
                (3, "shutdown_timout", "unknown key; did you mean 'shutdown_timeout'?"),
                (4, "listeners", "needs at least one listener"),
            ],
            id="top_level_metrics_and_logging",
        ),
    ],
)
def test_an_unknown_key_suggests_the_nearest_known_one(tmp_path: Path, text: str, expected: list[Expected]) -> None:
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

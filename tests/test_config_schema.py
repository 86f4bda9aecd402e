"""The config file's rules, as the pydantic models and the checks across fields state them: each
broken once, and the exact `FILE:LINE: FIELD: message` lines `sockd --check` prints for it. This
file: valid files, names, modes and unknown keys, the top level, and every problem at once; the
addresses are test_config_addresses.py's, the handlers, models and their options
test_config_options.py's.

Each case is a literal YAML text (line 1 is the first line of the string), written to a file and
checked in-process with sockd.tls.material.load_config (see support.check); test_cli.py pins that the command
prints exactly these lines and exits 78. Reading the YAML itself is test_config_loader.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        (
            6,
            "listeners[0].handler",
            "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time', 'chargen', 'relay', 'agent' or 'exec'",
        ),
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
        (
            13,
            "listeners[1].handler",
            "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time', 'chargen', 'relay', 'agent' or 'exec'",
        ),
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

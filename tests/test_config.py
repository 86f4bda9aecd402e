"""`sockd --check`: every config rule, each broken once, reported as `FILE:LINE: FIELD: message`.

Each case is a literal YAML text (line 1 is the first line of the string), checked with the real
command line, so these tests pin exactly what a person sees on stderr, and the exit code 78."""

from __future__ import annotations

import re
import string
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import MODELS, run_sockd

from sockd.config import (
    Config,
    ConfigError,
    HandlerName,
    InetListener,
    LoggingConfig,
    MetricsConfig,
    ModelName,
    Protocol,
    UnixListener,
    parse,
)

EX_CONFIG = 78

Expected = tuple[int, str, str]  # (line, field, message)


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def check(tmp_path: Path, text: str, name: str = "config.yaml") -> tuple[Path, Any]:
    path = tmp_path / name
    path.write_text(yaml_text(text))
    return path, run_sockd("--check", "-c", str(path))


def assert_rejected(tmp_path: Path, text: str, *expected: Expected) -> None:
    """`--check` exits 78 and stderr is exactly the expected lines, in line-number order."""
    path, result = check(tmp_path, text)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stdout == ""
    want = [f"{path}:{line}: {field}: {message}" for line, field, message in sorted(expected)]
    assert result.stderr.splitlines() == want


def assert_rejected_raw(tmp_path: Path, text: str, *lines: str) -> None:
    """Like `assert_rejected`, for the lines with no field: `{path}` in `lines` is the file."""
    path, result = check(tmp_path, text)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line.format(path=path) for line in lines]


def assert_accepted(tmp_path: Path, text: str, listeners: int) -> None:
    path, result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    noun = "listener" if listeners == 1 else "listeners"
    assert result.stdout == f"{path}: OK, {listeners} {noun}\n"


# ---------------------------------------------------------------------------------------------
# The issue's own example, and a valid file


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


def test_a_valid_config_with_one_listener(tmp_path: Path) -> None:
    assert_accepted(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 8080
            handler: echo
            concurrency: threaded
        """,
        listeners=1,
    )


def test_a_valid_config_using_every_setting(tmp_path: Path) -> None:
    assert_accepted(
        tmp_path,
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
        listeners=3,
    )


# ---------------------------------------------------------------------------------------------
# Ports and addresses


def test_port_above_65535(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 70000
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].port", "input should be less than or equal to 65535"),
    )


def test_port_below_0(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: udp
            host: 127.0.0.1
            port: -1
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].port", "input should be greater than or equal to 0"),
    )


def test_port_that_is_not_a_number(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: http
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].port", "input should be a valid integer"),
    )


def test_metrics_port_above_65535(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (2, "metrics.port", "input should be less than or equal to 65535"),
    )


def test_tcp_listener_with_a_path(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (6, "listeners[0].path", "only valid with protocol: unix"),
    )


def test_unix_listener_with_a_port(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: local
            protocol: unix
            path: /tmp/local.sock
            port: 80
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].port", "only valid with protocol: tcp or udp"),
    )


def test_unix_listener_with_a_host(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: local
            protocol: unix
            host: 127.0.0.1
            path: /tmp/local.sock
            handler: echo
            concurrency: threaded
        """,
        (4, "listeners[0].host", "only valid with protocol: tcp or udp"),
    )


def test_tcp_listener_without_a_port(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (4, "listeners[0].port", "required"),
    )


def test_unix_listener_without_a_path(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (8, "listeners[1].path", "required"),
    )


def test_listener_without_a_protocol(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        (2, "listeners[0].protocol", "required"),
    )


def test_protocol_sctp(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            host: 127.0.0.1
            port: 80
            protocol: sctp
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].protocol", "input should be 'tcp', 'udp' or 'unix', not 'sctp'"),
    )


def test_two_listeners_on_the_same_tcp_address(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (11, "listeners[1].port", "tcp 127.0.0.1:8080 is already used by listeners[0]"),
    )


def test_two_listeners_on_the_same_ipv6_address(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (11, "listeners[1].port", "udp [::1]:53 is already used by listeners[0]"),
    )


def test_two_unix_listeners_on_the_same_path(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (9, "listeners[1].path", "unix /tmp/shared.sock is already used by listeners[0]"),
    )


def test_tcp_and_udp_on_the_same_port_is_fine(tmp_path: Path) -> None:
    assert_accepted(
        tmp_path,
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
        listeners=2,
    )


def test_port_0_never_clashes(tmp_path: Path) -> None:
    assert_accepted(
        tmp_path,
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
        listeners=2,
    )


# ---------------------------------------------------------------------------------------------
# Handler, concurrency model and the options that belong to one of them


def test_unknown_handler(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: reverse
            concurrency: threaded
        """,
        (6, "listeners[0].handler", "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time' or 'relay'"),
    )


def test_unknown_concurrency_model(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: forking
        """,
        (
            7,
            "listeners[0].concurrency",
            "input should be 'iterative', 'threaded', 'thread_pool', 'busy_poll', 'selector' or 'asyncio'",
        ),
    )


def test_threads_without_thread_pool(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (
            8,
            "listeners[0].threads",
            "only valid with concurrency: thread_pool (this listener has concurrency: threaded)",
        ),
    )


def test_threads_written_before_concurrency_is_still_checked(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (
            2,
            "listeners[0].threads",
            "only valid with concurrency: thread_pool (this listener has concurrency: busy_poll)",
        ),
    )


def test_threads_0(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (8, "listeners[0].threads", "input should be greater than or equal to 1"),
    )


def test_selector_backend_with_asyncio(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (
            8,
            "listeners[0].selector_backend",
            "only valid with concurrency: selector (this listener has concurrency: asyncio)",
        ),
    )


def test_event_loop_with_selector(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (
            8,
            "listeners[0].event_loop",
            "only valid with concurrency: asyncio (this listener has concurrency: selector)",
        ),
    )


def test_timestamp_format_with_echo(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (7, "listeners[0].timestamp_format", "only valid with handler: timestamp (this listener has handler: echo)"),
    )


def test_negative_delay(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (8, "listeners[0].delay", "input should be greater than or equal to 0"),
    )


# ---------------------------------------------------------------------------------------------
# Names, modes, unknown and duplicate keys


def test_two_listeners_with_the_same_name(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (8, "listeners[1].name", "'web' is already the name of listeners[0]"),
    )


def test_name_with_a_space(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: my web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        """,
        (2, "listeners[0].name", "may hold only letters, digits, '_', '.' and '-'"),
    )


def test_unix_mode_999(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: local
            protocol: unix
            path: /tmp/local.sock
            mode: "999"
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].mode", 'should be octal permission bits, as in "0660"'),
    )


def test_unix_mode_unquoted(tmp_path: Path) -> None:
    # YAML 1.1 reads 0660 as the octal integer 432: still one line, on the line of `mode`.
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: local
            protocol: unix
            path: /tmp/local.sock
            mode: 0660
            handler: echo
            concurrency: threaded
        """,
        (5, "listeners[0].mode", 'must be quoted, as in mode: "0660" (YAML read the bare number as 432)'),
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (8, "verbose", "unknown key"),
    )


def test_unknown_listener_key(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (5, "listeners[0].colour", "unknown key"),
    )


def test_duplicate_key(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
            port: 81
        """,
        (8, "listeners[0].port", "duplicate key"),
    )


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        shutdown_timeout: 5
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
        shutdown_timeout: 1
        """,
        (9, "shutdown_timeout", "duplicate key"),
    )


# ---------------------------------------------------------------------------------------------
# The top level: listeners, logging, shutdown_timeout


def test_empty_listeners_list(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        logging:
          level: info
        listeners: []
        """,
        (3, "listeners", "needs at least one listener"),
    )


def test_missing_listeners(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        logging:
          level: info
        """,
        (1, "listeners", "required"),
    )


def test_logging_level_verbose(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (3, "logging.level", "input should be 'debug', 'info', 'warning' or 'error'"),
    )


def test_negative_shutdown_timeout(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
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
        (1, "shutdown_timeout", "input should be greater than or equal to 0"),
    )


def test_every_problem_is_reported_in_line_order(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
          - name: dns
            protocol: udp
            port: 70000
            handler: reply
            concurrency: threaded
        logging:
          level: loud
        """,
        (8, "listeners[1].host", "required"),
        (10, "listeners[1].port", "input should be less than or equal to 65535"),
        (11, "listeners[1].handler", "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time' or 'relay'"),
        (14, "logging.level", "input should be 'debug', 'info', 'warning' or 'error'"),
    )


# ---------------------------------------------------------------------------------------------
# Files that are not a config at all


def test_malformed_yaml_bad_indentation(tmp_path: Path) -> None:
    assert_rejected_raw(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
           host: 127.0.0.1
            port: 80
        """,
        "{path}:4: invalid YAML: expected <block end>, but found '<block mapping start>'"
        " (while parsing a block collection started at line 2)",
    )


def test_malformed_yaml_unclosed_bracket(tmp_path: Path) -> None:
    # The file has 2 lines; PyYAML notices at the end of the stream, on line 3.
    assert_rejected_raw(
        tmp_path,
        """
        listeners: [
          {name: web, protocol: tcp,
        """,
        "{path}:3: invalid YAML: expected the node content, but found '<stream end>' (while parsing a flow node)",
    )


def test_malformed_yaml_tab_indentation(tmp_path: Path) -> None:
    assert_rejected_raw(
        tmp_path,
        "listeners:\n\t- name: web\n",
        "{path}:2: invalid YAML: found character '\\t' that cannot start any token (while scanning for the next token)",
    )


def test_yaml_with_a_python_tag_is_not_executed(tmp_path: Path) -> None:
    assert_rejected_raw(
        tmp_path,
        """
        listeners: !!python/object/apply:os.system ["true"]
        """,
        "{path}:1: invalid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    )


def test_file_that_is_a_list(tmp_path: Path) -> None:
    assert_rejected_raw(
        tmp_path,
        """
        - name: web
          protocol: tcp
        """,
        "{path}:1: (top level): the file must be a mapping with a `listeners` list",
    )


@pytest.mark.parametrize("text", ["", "# nothing here yet\n"], ids=["empty", "only-a-comment"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert_rejected_raw(tmp_path, text, "{path}:1: (top level): the file must be a mapping with a `listeners` list")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{path}: cannot read: no such file or directory"]


def test_file_that_is_a_directory(tmp_path: Path) -> None:
    result = run_sockd("--check", "-c", str(tmp_path))
    assert result.returncode == EX_CONFIG
    assert result.stderr.splitlines() == [f"{tmp_path}: cannot read: is a directory"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"listeners: \xff\n")
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"{path}: cannot read: ")


# ---------------------------------------------------------------------------------------------
# Hostile or odd files: each still gives one line per problem, in line order.


def test_duplicate_key_lines_are_sorted_with_the_others(tmp_path: Path) -> None:
    assert_rejected(
        tmp_path,
        """
        logging:
          level: verbose
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
            port: 81
        """,
        (2, "logging.level", "input should be 'debug', 'info', 'warning' or 'error'"),
        (10, "listeners[0].port", "duplicate key"),
    )


def test_nul_byte_is_one_line(tmp_path: Path) -> None:
    path, result = check(tmp_path, "listeners: []\nlogging: {}\n\x00\n")
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert re.fullmatch(rf"{re.escape(str(path))}:3: invalid YAML: [^\n]+\n", result.stderr), result.stderr


def test_recursive_alias_is_one_line(tmp_path: Path) -> None:
    _, result = check(tmp_path, "listeners: &loop [*loop]\n")
    assert "Traceback" not in result.stderr
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_unknown_key_with_a_newline_is_one_line(tmp_path: Path) -> None:
    _, result = check(
        tmp_path,
        """
        "bad\\nkey": 1
        listeners: []
        """,
    )
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.splitlines()) == 2, result.stderr  # the unknown key, the empty list


def test_port_true_is_rejected(tmp_path: Path) -> None:
    _, result = check(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: true
            handler: echo
            concurrency: threaded
        """,
    )
    assert result.returncode == EX_CONFIG


# ---------------------------------------------------------------------------------------------
# Property: whatever is broken in a valid config, the answer is a Config or one-line problems.

VALID: dict[str, Any] = {
    "metrics": {"enabled": True, "host": "127.0.0.1", "port": 9464},
    "logging": {"level": "info", "format": "json"},
    "shutdown_timeout": 5,
    "listeners": [
        {
            "name": "web",
            "protocol": "tcp",
            "host": "127.0.0.1",
            "port": 8080,
            "handler": "echo",
            "concurrency": "thread_pool",
            "threads": 8,
            "delay": 0.5,
        },
        {
            "name": "dns",
            "protocol": "udp",
            "host": "::1",
            "port": 5353,
            "handler": "timestamp",
            "timestamp_format": "iso8601",
            "concurrency": "selector",
            "selector_backend": "epoll",
        },
        {
            "name": "local",
            "protocol": "unix",
            "path": "/run/sockd/local.sock",
            "mode": "0600",
            "handler": "echo",
            "concurrency": "asyncio",
            "event_loop": "uvloop",
        },
    ],
}

KNOWN_KEYS = sorted(
    {"metrics", "logging", "shutdown_timeout", "listeners", "enabled", "level", "format", "mode"}
    | {key for entry in VALID["listeners"] for key in entry}
)

# Keys hold no line breaks here: PyYAML counts a line at each of these, the checks below at "\n"
# only (test_unknown_key_with_a_newline_is_one_line covers a key with one).
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
texts = st.text(alphabet=st.characters(blacklist_characters=LINE_BREAKS, blacklist_categories=["Cs"]), max_size=12)
scalars = st.one_of(
    texts,
    st.integers(),
    st.integers(min_value=-2, max_value=70000),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.sampled_from(["tcp", "udp", "unix", "echo", "timestamp", "threaded", "thread_pool", "selector", "asyncio"]),
    st.lists(st.integers(), max_size=2),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), texts, st.integers(min_value=-3, max_value=3))

Path_ = tuple[str | int, ...]

PROBLEM = re.compile(
    r"c\.yaml:(?P<line>\d+): (?:"
    r"[^\n]+: [^\n]+"  # field: message
    r"|invalid YAML: [^\n]+"
    r"|the file must be a mapping with a `listeners` list"
    r")"
)


def nodes(value: Any, at: Path_ = ()) -> list[tuple[Path_, Any]]:
    found = [(at, value)]
    if isinstance(value, dict):
        for key, item in value.items():
            found += nodes(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += nodes(item, (*at, index))
    return found


def container(root: Any, at: Path_) -> Any:
    for part in at:
        root = root[part]
    return root


def mutate(data: st.DataObject, config: dict[str, Any]) -> None:
    kind = data.draw(st.sampled_from(["replace", "delete", "add"]))
    every = nodes(config)
    if kind == "add":
        mappings = [at for at, value in every if isinstance(value, dict)]
        at = data.draw(st.sampled_from(mappings))
        container(config, at)[data.draw(keys)] = data.draw(scalars)
        return
    inner = [at for at, _ in every if at]  # everything but the root
    at = data.draw(st.sampled_from(inner))
    parent = container(config, at[:-1])
    if kind == "replace":
        parent[at[-1]] = data.draw(scalars)
    else:
        del parent[at[-1]]


def mutated(data: st.DataObject) -> str:
    config = yaml.safe_load(yaml.safe_dump(VALID))  # a deep copy
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        mutate(data, config)
    return yaml.safe_dump(config, sort_keys=False)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_mutated_config_is_valid_or_rejected_in_one_line_problems(data: st.DataObject) -> None:
    assert_config_or_one_line_problems(mutated(data))


def test_the_valid_config_of_the_property_is_valid() -> None:
    config = parse(yaml.safe_dump(VALID, sort_keys=False), "c.yaml")
    assert [listener.name for listener in config.listeners] == ["web", "dns", "local"]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_config_through_the_command_line(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    path = tmp_path_factory.mktemp("mutated") / "c.yaml"
    path.write_text(mutated(data))
    assert_checked_without_a_traceback(path)


def assert_checked_without_a_traceback(path: Path) -> None:
    """`sockd --check` says OK, or exits 78 with lines that each name the file."""
    result = run_sockd("--check", "-c", str(path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, EX_CONFIG), result.stderr
    if result.returncode == 0:
        assert re.fullmatch(rf"{re.escape(str(path))}: OK, \d+ listeners?\n", result.stdout)
        assert result.stderr == ""
    else:
        assert result.stdout == ""
        assert result.stderr
        for line in result.stderr.splitlines():
            assert line.startswith(f"{path}:"), line


# ---------------------------------------------------------------------------------------------
# Property: any YAML document at all, and any text at all, gives a Config or one-line problems.

# Every key the file format knows, at any level, so that documents often reach the validators.
FORMAT_KEYS = sorted(
    set(Config.model_fields)
    | set(MetricsConfig.model_fields)
    | set(LoggingConfig.model_fields)
    | set(InetListener.model_fields)
    | set(UnixListener.model_fields)
)
LISTENER_KEYS = sorted(set(InetListener.model_fields) | set(UnixListener.model_fields))
WORDS = [
    *("tcp", "udp", "unix", "sctp", "echo", "timestamp", "discard", "daytime", "time"),
    *MODELS,
    "forking",  # no such model
    *("auto", "select", "poll", "epoll", "uvloop", "seed", "iso8601", "debug", "info", "json", "console"),
    *("127.0.0.1", "::1", "::", "localhost", "", "/tmp/sockd-p.sock", "0660", "0600", "999"),
    *("10.0.0.0/8", "::/0", "1.2.3.4/99", "web", "dns", "a.b-c_d", "two words"),
]
words = st.sampled_from(WORDS)
leaves = st.one_of(scalars, words, st.integers(min_value=0, max_value=70000), st.floats(min_value=0, max_value=100))
# Keys a YAML mapping can have and a Python dict can hold; line breaks left out as in `texts`.
document_keys = st.one_of(
    st.sampled_from(FORMAT_KEYS), texts, st.integers(min_value=-3, max_value=3), st.booleans(), st.none(), st.floats()
)
documents = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(document_keys, children, max_size=6),
    ),
    max_leaves=25,
)
# Values that fit a key, so that some listeners are valid and the rules across them are reached.
FITTING: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["web", "dns", "a.b-c_d", "two words", ""]),
    "protocol": st.sampled_from(get_args(Protocol)),
    "handler": st.sampled_from(get_args(HandlerName)),
    "concurrency": st.sampled_from(get_args(ModelName)),
    "host": st.sampled_from(["127.0.0.1", "::1", "localhost", "0.0.0.0"]),
    "port": st.sampled_from([0, 0, 80, 8080, 65535, 65536]),
    "path": st.sampled_from(["/tmp/sockd-a.sock", "/tmp/sockd-b.sock", "/" + "x" * 107]),
    "mode": st.sampled_from(["0660", "600", "0999"]),
    "upstream": st.sampled_from(["tcp://127.0.0.1:9", "udp://[::1]:53", "unix:///tmp/sockd-u.sock", "http://x"]),
    "allow": st.lists(st.sampled_from(["10.0.0.0/8", "::/0", "1.2.3.4/99"]), max_size=2),
    "buckets": st.lists(st.floats(min_value=0, max_value=10), max_size=3),
}


def fitting(key: str) -> st.SearchStrategy[Any]:
    return st.one_of(FITTING.get(key, leaves), leaves, documents)


REQUIRED_LISTENER_KEYS = ("name", "protocol", "handler", "concurrency")
listener_entries = st.fixed_dictionaries(
    {key: fitting(key) for key in REQUIRED_LISTENER_KEYS},
    optional={key: fitting(key) for key in LISTENER_KEYS if key not in REQUIRED_LISTENER_KEYS} | {"colour": leaves},
)
config_documents = st.fixed_dictionaries(
    {"listeners": st.one_of(st.lists(listener_entries, max_size=3), documents)},
    optional={
        "metrics": st.one_of(
            st.fixed_dictionaries({}, optional={key: fitting(key) for key in MetricsConfig.model_fields}), documents
        ),
        "logging": st.one_of(
            st.fixed_dictionaries({}, optional={key: fitting(key) for key in LoggingConfig.model_fields}), documents
        ),
        "shutdown_timeout": leaves,
        "worker_timeout": leaves,
        "verbose": leaves,
    },
)


@st.composite
def dumped_documents(draw: st.DrawFn) -> str:
    document = draw(st.one_of(config_documents, documents))
    return yaml.safe_dump(
        document,
        default_flow_style=draw(st.sampled_from([False, True, None])),
        allow_unicode=draw(st.booleans()),
        sort_keys=draw(st.booleans()),
        indent=draw(st.sampled_from([2, 4])),
    )


# Raw text: YAML's punctuation, indentation and the words of the format, in any order. Line
# breaks other than "\n" are left out, so that "\n" counts the lines as PyYAML does.
YAML_PUNCTUATION = ":-[]{}&*!|>'\"%@#,?.~=/\\`<+"
RAW_ALPHABET = string.ascii_letters + string.digits + " \t\n" + YAML_PUNCTUATION + "é中\x00\x7f\ufeff"
TOKENS = [
    *(f"{key}: " for key in FORMAT_KEYS),
    *("\n", "\n  ", "\n    ", "\n  - ", "- ", "? ", ": ", ", ", "[", "]", "{", "}", "'", '"', "#", "\t"),
    *("&a ", "*a", "&b ", "*b", "<<: ", "<<: *a", "---\n", "...\n", "%YAML 1.1\n", "%TAG !e! tag:e.org,2000:\n"),
    *("!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!map "),
    *("!!seq ", "!!timestamp ", "!!python/name:os.system ", "!!python/object/apply:os.system ", "!e!x ", "!local "),
    *("|\n", "|-\n", ">+\n", "\\x00", "\\u2028", "\\N", "0o17", "0x1F", "017", "1_000", "1e3", ".inf", "-.nan"),
    *("~", "null", "yes", "off", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "12:30:45"),
    *WORDS,
]
raw_texts = st.one_of(
    st.text(alphabet=RAW_ALPHABET, max_size=200),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.text(alphabet=RAW_ALPHABET, max_size=4)), max_size=40).map("".join),
)
any_texts = st.one_of(dumped_documents(), raw_texts)


def assert_config_or_one_line_problems(text: str) -> None:
    """`parse` returns a Config, or raises ConfigError whose problems are one line each, each on
    a line of the text, in line order."""
    try:
        result = parse(text, "c.yaml")
    except ConfigError as exc:
        problems = exc.problems
    else:
        assert isinstance(result, Config)
        assert result.listeners
        event("valid")
        return
    event("rejected")
    assert problems, text
    last = text.count("\n") + 1
    seen = []
    for problem in problems:
        match = PROBLEM.fullmatch(problem)
        assert match, (problem, text)
        seen.append(int(match["line"]))
        assert 1 <= seen[-1] <= last, (problem, text)
    assert seen == sorted(seen), (problems, text)


@settings(max_examples=200, deadline=None)
@given(dumped_documents())
def test_a_random_yaml_document_is_valid_or_rejected_in_one_line_problems(text: str) -> None:
    assert_config_or_one_line_problems(text)


@settings(max_examples=300, deadline=None)
@given(raw_texts)
def test_random_text_is_valid_or_rejected_in_one_line_problems(text: str) -> None:
    assert_config_or_one_line_problems(text)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_texts)
def test_a_random_document_through_the_command_line(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("random") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    assert_checked_without_a_traceback(path)


# ---------------------------------------------------------------------------------------------
# Hostile files the properties above found or led to: each once crashed sockd or blew up its
# answer, and stays here so it never does again.


@pytest.mark.parametrize(
    "text",
    [
        'listeners: !!int ""\n',  # IndexError in PyYAML's construct_yaml_int
        "listeners: !!int 0x\n",  # ValueError
        "shutdown_timeout: !!float .\n",  # ValueError
        "metrics: {enabled: !!bool maybe}\n",  # KeyError
        "listeners: !!timestamp x\n",  # AttributeError
        "listeners: !<tag:yaml.org,2002:int> x\n",  # the same, with a verbatim tag
    ],
)
def test_a_standard_tag_on_a_value_it_cannot_read_is_one_line(text: str) -> None:
    """PyYAML's constructors for the standard scalar tags raise plain Python errors, not
    YAMLError, on a value they cannot read: still one line, naming the value's line."""
    with pytest.raises(ConfigError) as caught:
        parse(text, "c.yaml")
    assert len(caught.value.problems) == 1
    assert PROBLEM.fullmatch(caught.value.problems[0])


@pytest.mark.parametrize("text", ["[" * 1000 + "]" * 1000, "- " * 1000 + "x\n", "{a: " * 1000 + "1" + "}" * 1000])
def test_deeply_nested_yaml_is_one_line(text: str) -> None:
    """PyYAML composes and constructs recursively: about 500 levels of nesting (a 1 KB file)
    exhaust Python's recursion limit; that is one line too."""
    with pytest.raises(ConfigError) as caught:
        parse(text, "c.yaml")
    assert all(PROBLEM.fullmatch(problem) for problem in caught.value.problems)


def alias_bomb(levels: int) -> str:
    """A 'billion laughs': each anchor a list of ten aliases of the one before, ten to the
    `levels` strings in all, as the value of a listener's `protocol`."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join([*lines, "listeners:", f"  - protocol: *a{levels - 1}", ""])


def test_an_alias_bomb_gets_a_short_answer() -> None:
    """Six levels (a 480-byte file) expand to a million values: refused before anything expands
    them, in one short line (unbounded, the answer took seconds and gigabytes)."""
    text = alias_bomb(6)
    assert len(text) < 500
    with pytest.raises(ConfigError) as caught:
        parse(text, "c.yaml")
    assert sum(len(problem) for problem in caught.value.problems) < 10_000


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
     recv_buffer: 65536, send_buffer: 65536, ipv6_only: false, freebind: true}
  - {name: b, protocol: unix, path: /tmp/b.sock, handler: relay, concurrency: selector,
     upstream: "tcp://[::1]:8080", connect_timeout: 2, half_close_timeout: 1, allow_uids: [0], allow_gids: [0]}
  - {name: c, protocol: udp, host: 127.0.0.1, port: 0, handler: relay, concurrency: busy_poll,
     upstream: "udp://127.0.0.1:53", idle_timeout: 30}
"""
    a, b, c = parse(text, "c.yaml").listeners
    assert isinstance(a, InetListener)
    assert [str(block) for block in a.allow] == ["10.0.0.0/8", "2001:db8::/32"]
    assert b.upstream_endpoint == ("tcp", ("::1", 8080))
    assert c.upstream_endpoint == ("udp", ("127.0.0.1", 53))

"""Reading the config file's YAML: what is not a config at all (syntax errors, tags, files that
cannot be read), duplicate keys, aliases and nesting, and where each problem is placed: its
`FILE:LINE`, one line per problem, in line order.

Checked in-process with sockd.tls.material.load_config and parse (see support.check), as in
test_config_schema.py; test_cli.py pins what the command prints for them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sockd.config import ConfigError, parse

from support import PROBLEM, Expected, assert_rejected, assert_rejected_raw, check, stderr_of, write_config

# ---------------------------------------------------------------------------------------------
# Files that are not a config at all

NOT_A_CONFIG = [
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
           host: 127.0.0.1
            port: 80
        """,
        [
            "{path}:4: invalid YAML: expected <block end>, but found '<block mapping start>'"
            " (while parsing a block collection started at line 2);"
            " a line is probably indented differently from the others of its block"
        ],
        id="malformed_yaml_bad_indentation",
    ),
    # The file has 2 lines; PyYAML notices at the end of the stream, on line 3.
    pytest.param(
        """
        listeners: [
          {name: web, protocol: tcp,
        """,
        [
            "{path}:3: invalid YAML: expected the node content, but found '<stream end>' (while parsing a flow node);"
            " a [ or {{ is not closed"
        ],
        id="malformed_yaml_unclosed_bracket",
    ),
    pytest.param(
        "listeners:\n\t- name: web\n",
        [
            "{path}:2: invalid YAML: found character '\\t' that cannot start any token"
            " (while scanning for the next token); indent with spaces: YAML does not allow tabs"
        ],
        id="malformed_yaml_tab_indentation",
    ),
    pytest.param(
        """
        listeners:
          - name: web
            protocol: tcp
            port: 80
              handler: echo
        """,
        [
            "{path}:5: invalid YAML: mapping values are not allowed here;"
            " a `key: value` line is probably indented wrongly, or a colon needs quoting"
        ],
        id="malformed_yaml_key_indented_under_a_value",
    ),
    pytest.param(
        """
        listeners:
          - name: web: the main one
        """,
        [
            "{path}:2: invalid YAML: mapping values are not allowed here;"
            " a `key: value` line is probably indented wrongly, or a colon needs quoting"
        ],
        id="malformed_yaml_colon_in_a_value",
    ),
    pytest.param(
        """
        listeners:
          - name: "web
        """,
        [
            "{path}:3: invalid YAML: found unexpected end of stream"
            " (while scanning a quoted scalar started at line 2); a quote is not closed"
        ],
        id="malformed_yaml_unclosed_quote",
    ),
    pytest.param(
        """
        listeners: !!python/object/apply:os.system ["true"]
        """,
        [
            "{path}:1: invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'; sockd reads plain YAML: remove the tag"
        ],
        id="yaml_with_a_python_tag_is_not_executed",
    ),
    pytest.param(
        """
        - name: web
          protocol: tcp
        """,
        ["{path}:1: (top level): the file must be a mapping with a `listeners` list"],
        id="file_that_is_a_list",
    ),
    pytest.param(
        "",
        ["{path}:1: (top level): the file must be a mapping with a `listeners` list"],
        id="empty_file-empty",
    ),
    pytest.param(
        "# nothing here yet\n",
        ["{path}:1: (top level): the file must be a mapping with a `listeners` list"],
        id="empty_file-only-a-comment",
    ),
]


@pytest.mark.parametrize(("text", "lines"), NOT_A_CONFIG)
def test_not_a_config(tmp_path: Path, text: str, lines: list[str]) -> None:
    assert_rejected_raw(tmp_path, text, *lines)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    config, problems = check(path)
    assert config is None
    assert problems == [f"{path}: cannot read: no such file or directory"]


def test_file_that_is_a_directory(tmp_path: Path) -> None:
    config, problems = check(tmp_path)
    assert config is None
    assert problems == [f"{tmp_path}: cannot read: is a directory"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"listeners: \xff\n")
    config, problems = check(path)
    assert config is None
    stderr = stderr_of(problems)
    assert len(stderr.splitlines()) == 1
    assert stderr.startswith(f"{path}: cannot read: ")


# ---------------------------------------------------------------------------------------------
# Duplicate keys, and problems in line order

DUPLICATES_AND_LINE_ORDER = [
    pytest.param(
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
        [(8, "listeners[0].port", "duplicate key")],
        id="duplicate_key",
    ),
    pytest.param(
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
        [(9, "shutdown_timeout", "duplicate key")],
        id="duplicate_top_level_key",
    ),
    pytest.param(
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
        [
            (2, "logging.level", "input should be 'debug', 'info', 'warning' or 'error'"),
            (10, "listeners[0].port", "duplicate key"),
        ],
        id="duplicate_key_lines_are_sorted_with_the_others",
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
          - name: dns
            protocol: udp
            port: 70000
            handler: reply
            concurrency: threaded
        logging:
          level: loud
        """,
        [
            (8, "listeners[1].host", "required"),
            (10, "listeners[1].port", "input should be less than or equal to 65535"),
            (
                11,
                "listeners[1].handler",
                "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time', 'chargen', 'relay',"
                " 'agent' or 'exec'",
            ),
            (14, "logging.level", "input should be 'debug', 'info', 'warning' or 'error'"),
        ],
        id="every_problem_is_reported_in_line_order",
    ),
]


@pytest.mark.parametrize(("text", "expected"), DUPLICATES_AND_LINE_ORDER)
def test_duplicate_keys_and_line_order(tmp_path: Path, text: str, expected: list[Expected]) -> None:
    assert_rejected(tmp_path, text, *expected)


# ---------------------------------------------------------------------------------------------
# Hostile or odd files: each still gives one line per problem, in line order.


def test_nul_byte_is_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "listeners: []\nlogging: {}\n\x00\n")
    config, problems = check(path)
    assert config is None
    stderr = stderr_of(problems)
    assert len(stderr.splitlines()) == 1, stderr
    assert re.fullmatch(rf"{re.escape(str(path))}:3: invalid YAML: [^\n]+\n", stderr), stderr


def test_recursive_alias_is_one_line(tmp_path: Path) -> None:
    config, problems = check(write_config(tmp_path, "listeners: &loop [*loop]\n"))
    assert config is None
    assert len(stderr_of(problems).splitlines()) == 1, problems


def test_unknown_key_with_a_newline_is_one_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        "bad\\nkey": 1
        listeners: []
        """,
    )
    config, problems = check(path)
    assert config is None
    assert len(stderr_of(problems).splitlines()) == 2, problems  # the unknown key, the empty list


# ---------------------------------------------------------------------------------------------
# Hostile files the properties (test_config_properties.py) found or led to: each once crashed
# sockd or blew up its answer, and stays here so it never does again.


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


def test_a_relay_to_its_own_address_is_refused_and_one_elsewhere_is_not(tmp_path: Path) -> None:
    relays = """
        listeners:
          - {name: same, protocol: tcp, host: 127.0.0.1, port: 7001, concurrency: asyncio, handler: relay,
             upstream: "tcp://127.0.0.1:7001"}
          - {name: any, protocol: udp, host: 0.0.0.0, port: 7002, concurrency: selector, handler: relay,
             upstream: "udp://localhost:7002"}
          - {name: path, protocol: unix, path: /run/r.sock, concurrency: asyncio, handler: relay,
             upstream: "unix:///run//r.sock"}
          - {name: other-host, protocol: tcp, host: 0.0.0.0, port: 7003, concurrency: asyncio, handler: relay,
             upstream: "tcp://10.1.2.3:7003"}
          - {name: other-port, protocol: tcp, host: 127.0.0.1, port: 7004, concurrency: asyncio, handler: relay,
             upstream: "tcp://127.0.0.1:7005"}
        """
    itself = "is this listener's own address: each client would be relayed to itself, without end"
    assert_rejected(
        tmp_path,
        relays,
        (3, "listeners[0].upstream", itself),
        (5, "listeners[1].upstream", itself),
        (7, "listeners[2].upstream", itself),
    )


@pytest.mark.parametrize("field", ["delay", "idle_timeout", "connect_timeout"])
def test_a_duration_longer_than_a_day_is_refused(tmp_path: Path, field: str) -> None:
    text = f"""
        listeners:
          - name: slow
            protocol: tcp
            host: 127.0.0.1
            port: 7000
            concurrency: asyncio
            handler: relay
            upstream: tcp://127.0.0.1:7001
            {field}: 1.0e+10
        """
    assert_rejected(tmp_path, text, (9, f"listeners[0].{field}", "input should be less than or equal to 86400"))


def test_a_file_larger_than_four_mib_is_refused_unread(tmp_path: Path) -> None:
    text = "# " + "x" * (4 << 20) + "\nlisteners: []\n"
    path = write_config(tmp_path, text)
    config, problems = check(path)
    assert config is None
    assert problems == [f"{path}: larger than 4 MiB: not a config file sockd reads"]


def test_the_select_backend_needs_a_connection_cap_it_can_watch(tmp_path: Path) -> None:
    def listener(name: str, extra: str) -> str:
        return f"""
          - {{name: {name}, protocol: tcp, host: 127.0.0.1, port: 0, concurrency: selector,
             selector_backend: select, {extra}}}"""

    text = "listeners:" + "".join(
        [
            listener("uncapped", "handler: echo"),
            listener("capped", "handler: echo, max_connections: 1000"),
            listener("too-many", "handler: echo, max_connections: 1001"),
            listener("relay", "handler: relay, upstream: 'tcp://127.0.0.1:9', max_connections: 501"),
        ]
    )
    assert_rejected(
        tmp_path,
        text,
        (
            3,
            "listeners[0].selector_backend",
            "select watches 1,024 descriptors at most: needs max_connections of at most 1000",
        ),
        (
            7,
            "listeners[2].selector_backend",
            "select watches 1,024 descriptors at most: needs max_connections of at most 1000",
        ),
        (
            9,
            "listeners[3].selector_backend",
            "select watches 1,024 descriptors at most: needs max_connections of at most 500",
        ),
    )


def test_a_host_name_and_the_address_it_resolves_to_on_one_port_are_refused(tmp_path: Path) -> None:
    """`localhost` binds 127.0.0.1 (its first address, as bind() takes it): the two used to pass
    --check, and the start then failed with exit 71. A name that does not resolve is left to
    bind() to report, as before."""
    text = """
        listeners:
          - {name: by-address, protocol: tcp, host: 127.0.0.1, port: 7010, concurrency: asyncio, handler: echo}
          - {name: by-name, protocol: tcp, host: localhost, port: 7010, concurrency: asyncio, handler: echo}
          - {name: udp-is-apart, protocol: udp, host: localhost, port: 7010, concurrency: asyncio, handler: echo}
          - {name: unknown, protocol: tcp, host: no-such-host.invalid, port: 7010, concurrency: asyncio, handler: echo}
        """
    assert_rejected(
        tmp_path,
        text,
        (
            3,
            "listeners[1].port",
            "tcp localhost:7010 (127.0.0.1) is already used by listener 'by-address' (listeners[0])",
        ),
    )


def test_a_host_name_getaddrinfo_cannot_take_is_refused(tmp_path: Path) -> None:
    """A label over 63 characters made bind() raise UnicodeError: a traceback at start."""
    text = f"""
        listeners:
          - {{name: long, protocol: tcp, host: {"a" * 64}.example, port: 0, concurrency: asyncio, handler: echo}}
        """
    path = write_config(tmp_path, text)
    config, problems = check(path)
    assert config is None
    [problem] = problems
    assert problem.startswith(f"{path}:2: listeners[0].host: not a valid host name: "), problem


def test_a_document_of_more_values_than_a_config_holds_is_refused_where_the_bound_is_passed() -> None:
    """Counted as it is composed, and said as what it is: there is no alias in it."""
    text = "listeners:\n" + "".join(f"  - [{', '.join(['1'] * 1000)}]\n" for _ in range(150))
    with pytest.raises(ConfigError) as caught:
        parse(text, "c.yaml")
    [problem] = caught.value.problems
    # 100,000 values: the key, the list, then 100 lists of 1,001 values each: the 100th ends on line 101.
    assert problem.startswith("c.yaml:101: too large: more than 100000 values"), problem
    assert "alias" not in problem

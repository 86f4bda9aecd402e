"""Properties of the config loader: whatever the file holds (a valid config broken at random, any
YAML document, any text at all), the answer is a Config or problems of one line each, each on a
line of the file, in line order; and `sockd --check` on such files never prints a traceback."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sockd.config import (
    Config,
    ConfigError,
    HandlerName,
    InetListener,
    LoggingConfig,
    MetricsConfig,
    ModelName,
    ProtocolName,
    UnixListener,
    parse,
)

from support import MODELS, PROBLEM, run_sockd

EX_CONFIG = 78


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
# only (test_config_loader.py's test_unknown_key_with_a_newline_is_one_line covers a key with one).
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
    "protocol": st.sampled_from(get_args(ProtocolName)),
    "handler": st.sampled_from(get_args(HandlerName)),
    "concurrency": st.sampled_from(get_args(ModelName)),
    "host": st.sampled_from(["127.0.0.1", "::1", "localhost", "0.0.0.0"]),
    "port": st.sampled_from([0, 0, 80, 8080, 65535, 65536]),
    "path": st.sampled_from(["/tmp/sockd-a.sock", "/tmp/sockd-b.sock", "/" + "x" * 107]),
    "mode": st.sampled_from(["0660", "600", "0999"]),
    "upstream": st.sampled_from(["tcp://127.0.0.1:9", "udp://[::1]:53", "unix:///tmp/sockd-u.sock", "http://x"]),
    "allow": st.lists(st.sampled_from(["10.0.0.0/8", "::/0", "1.2.3.4/99"]), max_size=2),
    "buckets": st.lists(st.floats(min_value=0, max_value=10), max_size=3),
    **dict.fromkeys(
        ("user", "group", "owner", "owner_group"), st.sampled_from(["nobody", "root", 65534, "nosuch", "0"])
    ),
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

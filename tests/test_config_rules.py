"""The rules across fields, in process: each runs on a listener that failed in part as soon as the
fields it reads validated, and names only fields a listener has."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest

from sockd.config import ConfigError, parse
from sockd.config.problems import Problem
from sockd.config.rules import _reads


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse(textwrap.dedent(text), "f.yaml")
    return raised.value.problems


def test_a_rule_waits_only_for_the_fields_it_reads() -> None:
    # The port failed: the upstream's protocol is still checked, as it does not depend on it
    # (once, a rule that went on to compare the upstream with the port was dropped whole).
    assert problems(
        """
        listeners:
          - name: r
            protocol: tcp
            host: 127.0.0.1
            port: 99999
            handler: relay
            concurrency: selector
            upstream: udp://127.0.0.1:53
        """
    ) == [
        "f.yaml:6: listeners[0].port: input should be less than or equal to 65535",
        "f.yaml:9: listeners[0].upstream:"
        " a udp listener relays to a udp upstream, a stream listener to tcp, tls or unix",
    ]


def test_a_rule_on_a_field_that_failed_waits_for_it() -> None:
    # The concurrency failed: whether it can relay is asked once it is a model's name.
    assert problems(
        """
        listeners:
          - name: r
            protocol: tcp
            host: 127.0.0.1
            port: 7000
            handler: relay
            concurrency: fast
            upstream: tcp://127.0.0.1:7001
        """
    ) == [
        "f.yaml:8: listeners[0].concurrency: input should be 'iterative', 'threaded', 'thread_pool', 'busy_poll',"
        " 'selector' or 'asyncio'"
    ]


def test_a_rule_may_read_only_a_listeners_fields() -> None:
    def rule(handler: str, colour: str) -> Iterator[Problem]:
        yield from ()

    with pytest.raises(TypeError, match=r"rule reads \['colour'\], which no listener has"):
        _reads(rule)

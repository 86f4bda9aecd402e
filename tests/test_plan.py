"""Reload planning, in-process: which listeners a new config keeps, restarts, rebinds, adds and
removes, decided from the two lists of listeners alone."""

from __future__ import annotations

from typing import Any

import pytest

from sockd.config import InetListener, Listener, TLSConfig, UnixListener
from sockd.plan import Step, plan, summary
from sockd.tls.material import KeyPair, ServerMaterial, TLSMaterial


def tcp(name: str = "a", **options: Any) -> Listener:
    fields = {"host": "127.0.0.1", "port": 5000, "handler": "echo", "concurrency": "asyncio", **options}
    return InetListener(name=name, protocol=fields.pop("protocol", "tcp"), **fields)


def unix(name: str = "u", **options: Any) -> Listener:
    fields = {"path": "/run/sockd/u.sock", "handler": "echo", "concurrency": "selector", **options}
    return UnixListener(name=name, protocol="unix", **fields)


# (what changes, the old listeners, the new ones, each name's action, whether a warning is due
# because reuse_port, ipv6_only or freebind changed on a socket that stays)
CASES: list[tuple[str, list[Listener], list[Listener], dict[str, str], bool]] = [
    ("nothing", [tcp(), unix()], [tcp(), unix()], {"a": "kept", "u": "kept"}, False),
    ("delay", [tcp()], [tcp(delay=0.5)], {"a": "restarted"}, False),
    ("concurrency", [tcp()], [tcp(concurrency="threaded")], {"a": "restarted"}, False),
    ("handler", [tcp()], [tcp(handler="timestamp")], {"a": "restarted"}, False),
    ("workers", [tcp()], [tcp(workers=3)], {"a": "restarted"}, False),
    ("a limit", [tcp()], [tcp(max_connections=10)], {"a": "restarted"}, False),
    ("backlog, set on the socket it keeps", [tcp()], [tcp(backlog=16)], {"a": "restarted"}, False),
    ("nodelay, set on the socket it keeps", [tcp()], [tcp(nodelay=False)], {"a": "restarted"}, False),
    ("reuse_port", [tcp()], [tcp(reuse_port=True)], {"a": "restarted"}, True),
    ("ipv6_only", [tcp(host="::1")], [tcp(host="::1", ipv6_only=True)], {"a": "restarted"}, True),
    ("freebind", [tcp(protocol="udp")], [tcp(protocol="udp", freebind=True)], {"a": "restarted"}, True),
    ("a unix socket's mode", [unix()], [unix(mode="0600")], {"u": "restarted"}, False),
    ("the port", [tcp()], [tcp(port=5001)], {"a": "rebound"}, False),
    ("the host", [tcp()], [tcp(host="::1")], {"a": "rebound"}, False),
    ("the host's spelling", [tcp()], [tcp(host="localhost")], {"a": "rebound"}, False),
    ("tcp to udp on the same port", [tcp()], [tcp(protocol="udp")], {"a": "rebound"}, False),
    ("tcp to unix", [tcp()], [unix(name="a")], {"a": "rebound"}, False),
    ("a unix path", [unix()], [unix(path="/run/sockd/v.sock")], {"u": "rebound"}, False),
    ("the port and reuse_port", [tcp()], [tcp(port=5001, reuse_port=True)], {"a": "rebound"}, False),
    ("a listener added", [tcp()], [tcp(), unix()], {"a": "kept", "u": "added"}, False),
    ("a listener removed", [tcp(), unix()], [unix()], {"a": "removed", "u": "kept"}, False),
    ("a rename", [tcp()], [tcp(name="b")], {"a": "removed", "b": "added"}, False),
    ("from nothing", [], [tcp()], {"a": "added"}, False),
]


@pytest.mark.parametrize(("old", "new", "actions", "deferred"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_change_gets_its_action(
    old: list[Listener], new: list[Listener], actions: dict[str, str], deferred: bool
) -> None:
    steps = plan(old, new)
    assert {step.name: step.action for step in steps} == actions
    assert [step.name for step in steps if step.bind_options_deferred] == (list(actions) if deferred else [])


def test_a_step_carries_the_new_listener_or_the_removed_one() -> None:
    old, new = [tcp(), unix()], [tcp(delay=1.0)]
    assert plan(old, new) == [Step("removed", unix()), Step("restarted", tcp(delay=1.0))]


def test_only_a_new_address_or_a_new_listener_needs_a_new_socket() -> None:
    old = [tcp("kept"), tcp("restarted", port=1), tcp("rebound", port=2), tcp("removed", port=3)]
    new = [tcp("kept"), tcp("restarted", port=1, delay=1.0), tcp("rebound", port=4), tcp("added", port=5)]
    assert {step.name: step.binds for step in plan(old, new)} == {
        "kept": False,
        "restarted": False,
        "rebound": True,
        "removed": False,
        "added": True,
    }


def test_removed_ones_come_first_then_the_new_file_in_its_order() -> None:
    old = [tcp("x", port=1), tcp("b", port=2), tcp("y", port=3), tcp("a", port=4)]
    new = [tcp("c", port=5), tcp("a", port=4), tcp("b", port=22)]
    steps = plan(old, new)
    assert [(step.action, step.name) for step in steps] == [
        ("removed", "x"),
        ("removed", "y"),
        ("added", "c"),
        ("kept", "a"),
        ("rebound", "b"),
    ]


def test_the_summary_lists_names_by_action_in_a_fixed_order_without_empty_ones() -> None:
    old = [tcp("gone", port=1), tcp("same", port=2), tcp("moved", port=3), tcp("tuned", port=4)]
    new = [tcp("new", port=5), tcp("tuned", port=4, delay=1.0), tcp("moved", port=6), tcp("same", port=2)]
    result = summary(plan(old, new))
    assert result == {
        "kept": ["same"],
        "restarted": ["tuned"],
        "rebound": ["moved"],
        "added": ["new"],
        "removed": ["gone"],
    }
    assert list(result) == ["kept", "restarted", "rebound", "added", "removed"]
    assert summary(plan([tcp()], [tcp()])) == {"kept": ["a"]}


def test_new_code_restarts_what_would_be_kept_and_changes_nothing_else() -> None:
    old = [tcp("same", port=1), tcp("tuned", port=2), tcp("moved", port=3), tcp("gone", port=4)]
    new = [tcp("same", port=1), tcp("tuned", port=2, reuse_port=True), tcp("moved", port=5), tcp("new", port=6)]
    steps = plan(old, new, new_code=True)
    assert summary(steps) == {
        "restarted": ["same", "tuned"],
        "rebound": ["moved"],
        "added": ["new"],
        "removed": ["gone"],
    }
    assert [step.name for step in steps if step.bind_options_deferred] == ["tuned"]
    assert [step.name for step in steps if step.binds] == ["moved", "new"]
    assert plan(old, new) == [
        step if step.name != "same" else Step("kept", step.listener) for step in plan(old, new, new_code=True)
    ]


def material(cert: str) -> TLSMaterial:
    return TLSMaterial(server=ServerMaterial(default=KeyPair(cert=cert, key="the key")))


def test_new_contents_of_a_listeners_tls_files_restart_it_on_its_socket() -> None:
    tls = TLSConfig(cert="/c.pem", key="/c.key")
    old = [tcp("same", port=1, tls=tls), tcp("renewed", port=2, tls=tls), tcp("moved", port=3, tls=tls), tcp("plain")]
    new = [tcp("same", port=1, tls=tls), tcp("renewed", port=2, tls=tls), tcp("moved", port=4, tls=tls), tcp("plain")]
    old_tls = {"same": material("A"), "renewed": material("B"), "moved": material("C")}
    # Equal contents read again: another object, the same material.
    new_tls = {"same": material("A"), "renewed": material("B2"), "moved": material("C2")}
    steps = plan(old, new, old_tls=old_tls, new_tls=new_tls)
    assert summary(steps) == {"kept": ["same", "plain"], "restarted": ["renewed"], "rebound": ["moved"]}
    assert [step.name for step in steps if step.binds] == ["moved"]
    # Material on one side only is a change too.
    assert summary(plan([tcp()], [tcp()], old_tls={}, new_tls={"a": material("A")})) == {"restarted": ["a"]}

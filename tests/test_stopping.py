"""A stop (sockd.stopping, sockd.supervisor): SIGTERM and SIGINT drain the workers within
shutdown_timeout, a second SIGTERM ends the drain at once, and workers never outlive the supervisor
nor hold its ports once orphaned. The real daemon, real signals."""

from __future__ import annotations

import os
import signal
import time

import pytest

from support import (
    MODELS,
    Daemon,
    InFlight,
    Launcher,
    active_connections,
    alive,
    becomes,
    connect,
    cpu_seconds,
    inet,
    read_to_eof,
    request,
)
from support import listener as entry


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _accepted(daemon: Daemon, name: str) -> None:
    """Wait until the listener's worker holds one open connection. A stop answers a connection its
    worker has accepted; one still in the backlog goes with the listening socket, so a test of
    the drain must not signal before it is accepted (however long a busy machine takes)."""
    becomes(lambda: active_connections(daemon, name), 1, f"a connection of {name} accepted")


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_lets_a_delayed_request_finish_then_exits_0(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", model, delay=1.0)])
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    assert daemon.stop(signal.SIGTERM) == 0
    reply = pending.result()
    assert reply, "the in-flight request lost its reply"
    assert reply.startswith(b"20")


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_ends_idle_echo_connections_instead_of_waiting_for_them(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=60)
    with connect(daemon.address("echo"), timeout=30) as idle:
        idle.sendall(b"ping")
        assert idle.recv(16) == b"ping"
        daemon.process.send_signal(signal.SIGTERM)
        assert read_to_eof(idle) == b""  # the drain closes the connection; it does not hang
    assert daemon.process.wait(30) == 0
    assert not [e for e in daemon.events if e.get("event") == "killing worker"]


def test_a_second_sigterm_ends_the_drain_at_once(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=20)], shutdown_timeout=60)
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("stopping")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="second stop signal")


def test_shutdown_timeout_bounds_the_drain(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "asyncio", delay=20)], shutdown_timeout=0.5)
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="shutdown_timeout passed")


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("a", "tcp", "echo", "selector"), entry("b", "tcp", "echo", "iterative")])
    workers = [daemon.worker_pid("a"), daemon.worker_pid("b")]
    fork_server = int(daemon.wait_for("fork server started")["pid"])
    daemon.process.kill()
    daemon.process.wait(10)
    assert all(_gone(pid) for pid in workers), "a worker outlived its supervisor"
    assert _gone(fork_server), "the fork server outlived its supervisor"


@pytest.mark.parametrize("model", MODELS)
def test_an_orphaned_worker_waiting_for_a_first_request_leaves_the_port_to_a_new_sockd(
    start_sockd: Launcher, model: str
) -> None:
    first = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=60)
    host, port = inet(first.address("echo"))
    orphan = first.worker_pid("echo")
    with connect(first.address("echo")) as silent:  # connected, not a byte sent: its drain waits for one
        becomes(lambda: active_connections(first, "echo"), 1, "the silent client accepted")
        first.process.kill()
        first.process.wait(10)
        # The orphan stops at once (its channel closed) and lets go of the listening socket,
        # though it still holds the silent client: a restart binds the port and serves.
        second = start_sockd([entry("echo", "tcp", "echo", model, host, port=port)])
        assert request(second.address("echo"), b"again") == b"again"
        assert alive(orphan)
        assert silent.fileno() >= 0
    assert _gone(orphan, timeout=30)


def test_sigint_from_a_terminal_stops_gracefully(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=0.5)])
    pending = InFlight(daemon.address("slow"))
    _accepted(daemon, "slow")
    # A terminal's Ctrl-C signals the whole process group (the daemon leads its own here): the
    # workers leave it to the supervisor, which drains them.
    os.killpg(daemon.process.pid, signal.SIGINT)
    assert daemon.process.wait(30) == 0
    assert pending.result()


@pytest.mark.parametrize("model", ["asyncio", "selector", "iterative"])
def test_a_draining_worker_waits_without_spinning(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], shutdown_timeout=30)
    pid = daemon.worker_pid("echo")
    with connect(daemon.address("echo")):  # connected, silent: the drain waits for its request
        _accepted(daemon, "echo")
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for("stopping")
        before = cpu_seconds(pid)
        time.sleep(1)
        assert cpu_seconds(pid) - before < 0.5  # a spinning worker burns the whole second
    assert daemon.process.wait(30) == 0


def test_an_orphaned_worker_still_ends_its_drain_in_time(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "iterative")], shutdown_timeout=1)
    worker = daemon.worker_pid("echo")
    with connect(daemon.address("echo")):  # a silent client keeps the drain waiting
        _accepted(daemon, "echo")
        daemon.process.kill()  # no supervisor left to end the drain
        daemon.process.wait(10)
        assert _gone(worker, timeout=15)

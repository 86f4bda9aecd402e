"""The supervisor: graceful stop, restarting dead workers, and workers that never outlive it."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from conftest import Launcher, connect, read_to_eof, request
from conftest import listener as entry

MODELS = ["iterative", "threaded", "thread_pool", "busy_poll", "selector", "asyncio"]


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class InFlight:
    """A request sent to a delayed listener, whose reply (or lack of one) is collected."""

    def __init__(self, address: str) -> None:
        self.sock = connect(address, timeout=30)
        self.sock.sendall(b"hello world")
        self.reply: bytes | None = None
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.reply = read_to_eof(self.sock)
        except OSError:
            self.reply = b""
        finally:
            self.sock.close()

    def result(self) -> bytes | None:
        self.thread.join(30)
        return self.reply


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_lets_a_delayed_request_finish_then_exits_0(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", model, delay=1.0)])
    pending = InFlight(daemon.address("slow"))
    daemon.wait_for("worker started", listener="slow")
    time.sleep(0.3)  # let the worker read the request: it is now in its delay
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
    time.sleep(0.3)
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("stopping")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="second stop signal")


def test_shutdown_timeout_bounds_the_drain(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "asyncio", delay=20)], shutdown_timeout=0.5)
    pending = InFlight(daemon.address("slow"))
    time.sleep(0.3)
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert pending.result() == b""
    assert daemon.wait_for("killing worker", why="shutdown_timeout passed")


@pytest.mark.parametrize("model", ["iterative", "asyncio"])
def test_a_killed_worker_is_restarted_and_clients_in_the_gap_are_served(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", model), entry("other", "udp", "echo", model)])
    address = daemon.address("echo")
    old = daemon.worker_pid("echo")
    mark = len(daemon.events)
    os.kill(old, signal.SIGKILL)
    # Connect at once: the supervisor still holds the listening socket, so this waits in the
    # backlog until the new worker accepts it, and is not refused.
    assert request(address, b"anyone there?") == b"anyone there?"
    died = daemon.wait_for("worker died; restarting", listener="echo", after=mark)
    assert died["pid"] == old
    assert daemon.worker_pid("echo", after=mark) != old
    assert not [e for e in daemon.events[mark:] if e.get("event") == "worker started" and e["listener"] == "other"]


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("a", "tcp", "echo", "selector"), entry("b", "tcp", "echo", "iterative")])
    workers = [daemon.worker_pid("a"), daemon.worker_pid("b")]
    daemon.process.kill()
    daemon.process.wait(10)
    assert all(_gone(pid) for pid in workers), "a worker outlived its supervisor"


def test_sigint_from_a_terminal_stops_gracefully(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("slow", "tcp", "timestamp", "threaded", delay=0.5)])
    pending = InFlight(daemon.address("slow"))
    time.sleep(0.2)
    # A terminal's Ctrl-C signals the whole process group (the daemon leads its own here): the
    # workers leave it to the supervisor, which drains them.
    os.killpg(daemon.process.pid, signal.SIGINT)
    assert daemon.process.wait(30) == 0
    assert pending.result()


def test_sighup_does_not_kill_the_daemon(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("SIGHUP received: reloading the config is not supported yet; still serving")
    assert request(daemon.address("echo"), b"x") == b"x"


def test_port_zero_is_logged_with_the_real_port(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    host, port = daemon.address("echo").rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    with socket.create_connection((host, int(port)), timeout=5):
        pass

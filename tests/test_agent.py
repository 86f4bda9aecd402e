"""`handler: agent` (sockd.handlers' Agent, told by sockd.supervisor through sockd.group and
sockd.worker): the real daemon answers `up ready`, `drain` from a stop signal on, `maint` while a
listener is down, each worker from what it was last told, a new one from its start; and the real
HAProxy (Debian's 2.6) reading it as an agent-check puts the server in MAINT and DRAIN and back."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import MODELS, TIMEOUT, Launcher, becomes, health, inet, read_to_eof, request, require, said
from support import listener as entry

WORKER_TIMEOUT = 120  # a worker stopped by the test is down (1 s) long before it would be killed


def every_answer(address: str, asked: int = 10) -> set[bytes]:
    """What the agent answers `asked` agent-checks (each a connection that sends nothing)."""
    return {said(address) for _ in range(asked)}


@pytest.mark.parametrize("model", MODELS)
def test_the_agent_answers_up_then_drain_from_the_stop_signal_on(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd(
        [entry("agent", "tcp", "agent", model, workers=2), entry("echo", "tcp", "echo", "asyncio")], drain_delay=60
    )
    agent, echo = daemon.address("agent"), daemon.address("echo")
    becomes(lambda: every_answer(agent), {b"up ready\n"}, "the agent's answers once every listener serves")
    daemon.process.send_signal(signal.SIGTERM)
    becomes(lambda: every_answer(agent), {b"drain\n"}, "the agent's answers once the stop signal came")
    assert health(daemon) == (503, "draining\n")
    assert request(echo, b"served on") == b"served on"
    # A worker started now (one died) answers `drain` from its first connection: its spec said so.
    mark = len(daemon.events)
    os.kill(daemon.worker_pids("agent")[0], signal.SIGKILL)
    daemon.wait_for("worker started", listener="agent", after=mark)
    assert every_answer(agent, 20) == {b"drain\n"}
    assert daemon.stop() == 0  # the second signal: the stop


def test_the_agent_answers_maint_while_a_listener_is_down(start_sockd: Launcher, sockdir: Path) -> None:
    daemon = start_sockd(
        [entry("agent", "unix", "agent", "selector", sockdir / "agent.sock"), entry("echo", "tcp", "echo", "asyncio")],
        worker_timeout=WORKER_TIMEOUT,
    )
    agent = daemon.address("agent")
    becomes(lambda: said(agent), b"up ready\n", "the agent's answer once every listener serves")
    with stopped(daemon.worker_pid("echo")):
        becomes(lambda: said(agent), b"maint\n", "the agent's answer once the echo worker's heartbeat stopped")
        assert health(daemon) == (503, "down: echo\n")
    becomes(lambda: said(agent), b"up ready\n", "the agent's answer once it beats again")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process SIGSTOPped for the block: its heartbeat stops, so its listener is down."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class HAProxy:
    """The real HAProxy in the foreground (-db), one backend server checked by TCP connect and by
    agent-check every 100 ms, and its stats socket (level admin) to read the server's status."""

    def __init__(self, directory: Path, server: str, agent: str) -> None:
        self.stats = directory / "stats.sock"
        host, port = inet(server)
        config = directory / "haproxy.cfg"
        config.write_text(
            "global\n"
            f"    stats socket {self.stats} level admin\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 1s\n"
            "    timeout client 10s\n"
            "    timeout server 10s\n"
            "backend sockd\n"
            f"    server s1 {host}:{port} check inter 100ms agent-check agent-port {inet(agent)[1]} agent-inter 100ms\n"
        )
        self.process = subprocess.Popen(
            [require("haproxy"), "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def status(self) -> str:
        """The server's status as `show stat` says it: UP, DRAIN (agent), MAINT, DOWN…; `starting`
        until the stats socket answers."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                table = read_to_eof(sock).decode()
        except (FileNotFoundError, ConnectionRefusedError):
            return "starting"
        header, *rows = table.splitlines()
        columns = header.removeprefix("# ").split(",")
        for row in rows:
            fields = dict(zip(columns, row.split(","), strict=False))
            if fields.get("svname") == "s1":
                return fields["status"]
        raise AssertionError(f"no server s1 in {table!r}")

    def close(self) -> str:
        """Stop it: what it said on stderr."""
        self.process.terminate()
        _, errors = self.process.communicate(timeout=TIMEOUT)
        return errors


def _word(status: str) -> str:
    return status.split(maxsplit=1)[0]  # "DRAIN (agent)": the state, not who set it


def test_haproxy_takes_the_server_to_maint_and_drain_as_the_agent_says_and_back(
    start_sockd: Launcher, sockdir: Path
) -> None:
    daemon = start_sockd(
        [entry("echo", "tcp", "echo", "asyncio"), entry("agent", "tcp", "agent", "asyncio")],
        drain_delay=60,
        worker_timeout=WORKER_TIMEOUT,
    )
    haproxy = HAProxy(sockdir, daemon.address("echo"), daemon.address("agent"))
    try:
        becomes(lambda: _word(haproxy.status()), "UP", "the server, once checked")
        with stopped(daemon.worker_pid("echo")):
            becomes(lambda: _word(haproxy.status()), "MAINT", "the server while its echo listener is down")
        # `ready` takes it out of MAINT: an agent that said only `up` would leave it there for good.
        becomes(lambda: _word(haproxy.status()), "UP", "the server once the listener is up again")
        daemon.process.send_signal(signal.SIGTERM)
        becomes(lambda: _word(haproxy.status()), "DRAIN", "the server once sockd drains")
        assert request(daemon.address("echo"), b"still served") == b"still served"
    finally:
        said = haproxy.close()
    assert "is going DOWN for maintenance" in said, said
    assert "enters drain state" in said, said
    assert daemon.stop() == 0

"""`handler: agent` (sockd.handlers' Agent, told by sockd.supervisor through sockd.group and
sockd.worker): the real daemon answers `up ready`, `drain` from a stop signal on, `maint` while a
listener is down, each worker from what it was last told, a new one from its start; and the real
HAProxy (Debian's 2.6) reading it as an agent-check puts the server in MAINT and DRAIN and back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from support import MODELS, HAProxy, Launcher, becomes, haproxy, health, inet, request, said, stopped
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


def checking(stats: Path, server: str, agent: str) -> str:
    """HAProxy's config: one backend server checked by TCP connect and by agent-check every 100 ms,
    and its stats socket (level admin) to read the server's status."""
    return (
        "global\n"
        f"    stats socket {stats} level admin\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 1s\n"
        "    timeout client 10s\n"
        "    timeout server 10s\n"
        "backend sockd\n"
        f"    server s1 {server} check inter 100ms agent-check agent-port {inet(agent)[1]} agent-inter 100ms\n"
    )


def state(running: HAProxy) -> str:
    """The server's state, not who set it: DRAIN of "DRAIN (agent)"."""
    return running.status("sockd/s1").split(maxsplit=1)[0]


def test_haproxy_takes_the_server_to_maint_and_drain_as_the_agent_says_and_back(
    start_sockd: Launcher, sockdir: Path
) -> None:
    daemon = start_sockd(
        [entry("echo", "tcp", "echo", "asyncio"), entry("agent", "tcp", "agent", "asyncio")],
        drain_delay=60,
        worker_timeout=WORKER_TIMEOUT,
    )
    stats = sockdir / "stats.sock"
    config = checking(stats, daemon.address("echo"), daemon.address("agent"))
    with haproxy(sockdir, config, stats=stats) as running:
        becomes(lambda: state(running), "UP", "the server, once checked")
        with stopped(daemon.worker_pid("echo")):
            becomes(lambda: state(running), "MAINT", "the server while its echo listener is down")
        # `ready` takes it out of MAINT: an agent that said only `up` would leave it there for good.
        becomes(lambda: state(running), "UP", "the server once the listener is up again")
        daemon.process.send_signal(signal.SIGTERM)
        becomes(lambda: state(running), "DRAIN", "the server once sockd drains")
        assert request(daemon.address("echo"), b"still served") == b"still served"
    output = running.output()
    assert "is going DOWN for maintenance" in output, output
    assert "enters drain state" in output, output
    assert daemon.stop() == 0

"""Logs: JSON lines when stderr is not a terminal, a console renderer when it is."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import yaml

from support import Launcher, connect, eventually, request, sockd_command
from support import listener as entry


def test_lines_are_json_with_the_listener_and_its_real_address(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")], logging={"level": "info", "format": "auto"})
    started = daemon.wait_for("listening", listener="echo")
    assert started["protocol"] == "tcp"
    assert started["concurrency"] == "asyncio"
    assert started["handler"] == "echo"
    assert started["level"] == "info"
    assert daemon.wait_for("worker started", listener="echo")["pid"] > 0
    request(daemon.address("echo"), b"x")
    assert daemon.stop() == 0
    assert daemon.other_lines == []  # every line parsed as JSON
    assert [e for e in daemon.events if e["level"] == "debug"] == []  # info hides per-connection detail
    assert daemon.events[-1]["event"] == "stopped"


def test_a_terminal_gets_the_console_renderer(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"metrics": {"port": 0}, "listeners": [entry("echo", "tcp", "echo", "selector")]}))
    controller, terminal = pty.openpty()
    process = subprocess.Popen(sockd_command("-c", str(config)), stderr=terminal, stdout=subprocess.DEVNULL)
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 20
    try:
        while b"ready" not in output and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                output += os.read(controller, 65536)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        os.close(controller)
    text = output.decode(errors="replace")
    assert "listening" in text
    assert "ready" in text
    assert not text.lstrip().startswith("{")
    assert all(not line.startswith("{") for line in text.splitlines())


def _reset_after_echo(address: str) -> None:
    """An echo, then a reset: the worker logs the lost connection at debug level."""
    with connect(address) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_reload_that_changes_the_level_reaches_the_workers_of_kept_listeners(start_sockd: Launcher) -> None:
    listeners = [entry("echo", "tcp", "echo", "asyncio")]
    daemon = start_sockd(listeners, logging={"level": "info", "format": "json"})
    pid = daemon.worker_pid("echo")
    _reset_after_echo(daemon.address("echo"))
    plan = daemon.reload(listeners, logging={"level": "debug", "format": "json"})
    assert plan["kept"] == ["echo"]
    mark = len(daemon.events)

    def lost_at_debug() -> bool:  # the worker takes the new level up as it reads its channel
        _reset_after_echo(daemon.address("echo"))
        return any(e.get("event") == "connection lost" for e in daemon.events[mark:])

    eventually(lost_at_debug, "a lost connection logged at debug level")
    lost = daemon.wait_for("connection lost", after=mark)
    assert lost["pid"] == pid  # the worker started at info level, not a new one
    assert lost["level"] == "debug"
    assert [e for e in daemon.events[:mark] if e["level"] == "debug"] == []  # info hid them before

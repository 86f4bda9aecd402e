"""Logs: JSON lines when stderr is not a terminal, a console renderer when it is."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import yaml

from support import Launcher, request, sockd_command
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

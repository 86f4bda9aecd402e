"""Descriptors (sockd.descriptors, and the workers' accept loops): a worker that runs out pauses
accepting and recovers, and a reload that would need more than the limit changes nothing. The
real daemon."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from support import (
    Launcher,
    inet,
    request,
    require,
    samples,
    value,
)
from support import listener as entry


@pytest.mark.parametrize("model", ["selector", "threaded", "asyncio"])
def test_running_out_of_descriptors_pauses_accepting_and_recovers(start_sockd: Launcher, model: str) -> None:
    prlimit = require("prlimit")
    # The limit is inherited by the workers: with 72 descriptors, 80 clients cannot all be had.
    daemon = start_sockd([entry("echo", "tcp", "echo", model)], prefix=(prlimit, "--nofile=72:72", "--"))
    address, held = daemon.address("echo"), []
    try:
        for _ in range(80):
            sock = socket.create_connection(inet(address), timeout=10)
            held.append(sock)
        if model != "asyncio":  # asyncio pauses accepting by itself, without a word
            daemon.wait_for("cannot accept: out of resources; pausing", listener="echo")
    finally:
        for sock in held:
            sock.close()
    # Recovered by itself once descriptors are free again. (uvloop sheds the connections it
    # cannot accept while out of descriptors: one arriving as it frees them may still be reset.)
    answers: list[bytes] = []
    deadline = time.monotonic() + 10
    while answers[-1:] != [b"recovered"] and time.monotonic() < deadline:
        try:
            answers.append(request(address, b"recovered"))
        except ConnectionResetError:
            time.sleep(0.1)
    assert answers[-1:] == [b"recovered"]
    assert not [e for e in daemon.events if e.get("event") == "worker died; restarting"]


def test_a_reload_beyond_the_descriptor_limit_changes_nothing(start_sockd: Launcher) -> None:
    one = [entry("l0", "tcp", "echo", "asyncio")]
    daemon = start_sockd(one, prefix=("prlimit", "--nofile=100:100", "--"))
    worker = daemon.worker_pid("l0")
    mark = len(daemon.events)
    daemon.write_config([entry(f"l{i}", "tcp", "echo", "asyncio") for i in range(40)])
    daemon.process.send_signal(signal.SIGHUP)
    error = str(daemon.wait_for("reload rolled back", after=mark)["error"])
    assert error.startswith("the descriptor limit (100) is too low for 40 listeners: "), error
    assert not [e for e in daemon.events[mark:] if e.get("event") in ("listening", "worker started")]
    assert value(samples(daemon), "sockd_config_last_reload_successful") == 0
    assert request(daemon.address("l0"), b"as before") == b"as before"
    assert daemon.reload(one)["kept"] == ["l0"]
    assert daemon.worker_pid("l0") == worker

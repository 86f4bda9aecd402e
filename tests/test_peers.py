"""socat and ncat as clients of sockd: random bytes echo back byte for byte, over TCP, Unix and
UDP, under every concurrency model; and socat gets the timestamp handler's one reply."""

from __future__ import annotations

import datetime
import functools
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from support import MODELS, StartSockd, listener, require

STREAM_SIZES = {"1B": 1, "64KiB": 64 << 10, "1MiB": 1 << 20}
# The largest UDP payload over IPv4: 65535 - 20 (IP header) - 8 (UDP header). A 1 MiB datagram
# cannot exist, so none is tried.
UDP_SIZES = {"1B": 1, "65507B": 65507}
PEER_TIMEOUT = 60.0  # seconds a peer run may take


@pytest.fixture
def socat() -> str:
    return require("socat")


def run_peer(command: list[str], input: bytes | None = None, stdin: BinaryIO | None = None) -> bytes:
    """Run a peer (socat, ncat) to its end (it must exit 0) on `input` or the file `stdin`; its stdout."""
    done = subprocess.run(command, input=input, stdin=stdin, capture_output=True, timeout=PEER_TIMEOUT, check=False)
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr!r}"
    return done.stdout


def mismatch(got: bytes, sent: bytes) -> str | None:
    """What is wrong with an echo, briefly: not a diff of a megabyte."""
    if got == sent:
        return None
    first = next((i for i, (a, b) in enumerate(zip(got, sent, strict=False)) if a != b), min(len(got), len(sent)))
    return f"sent {len(sent)} bytes, got {len(got)} back; they first differ at byte {first}"


def assert_echoes(send: Callable[[bytes], bytes], sizes: dict[str, int]) -> None:
    """Each size, as random bytes, through `send`: every one comes back exactly."""
    problems = {}
    for name, size in sizes.items():
        payload = os.urandom(size)
        if problem := mismatch(send(payload), payload):
            problems[name] = problem
    assert not problems, problems


@pytest.mark.parametrize("model", MODELS)
def test_tcp_echo(start_sockd: StartSockd, socat: str, model: str) -> None:
    daemon = start_sockd([listener("echo", "tcp", "echo", model)])
    # At the end of its stdin socat half-closes; it exits once sockd has echoed all and closed.
    command = [socat, "-t", "10", "-T", "20", "-", f"TCP:{daemon.address('echo')}"]
    assert_echoes(lambda payload: run_peer(command, input=payload), STREAM_SIZES)


@pytest.mark.parametrize("model", MODELS)
def test_unix_echo(start_sockd: StartSockd, socat: str, sockdir: Path, model: str) -> None:
    daemon = start_sockd([listener("echo", "unix", "echo", model, sockdir / "echo.sock")])
    command = [socat, "-t", "10", "-T", "20", "-", f"UNIX-CONNECT:{daemon.address('echo')}"]
    assert_echoes(lambda payload: run_peer(command, input=payload), STREAM_SIZES)


@pytest.mark.parametrize("model", MODELS)
def test_udp_echo(start_sockd: StartSockd, socat: str, tmp_path: Path, model: str) -> None:
    daemon = start_sockd([listener("echo", "udp", "echo", model)])
    # UDP has no end: after its stdin ends socat waits out the whole `-t` for replies, then exits.
    command = [socat, "-t", "5", "-b", "65536", "-", f"UDP:{daemon.address('echo')}"]

    def echo(payload: bytes) -> bytes:
        # socat sends each read() of its stdin as one datagram. From a pipe a read may return part
        # of what the writer has written so far; from a regular file it returns the whole message,
        # which `-b` (the read size) leaves room for.
        message = tmp_path / f"message-{len(payload)}"
        message.write_bytes(payload)
        with message.open("rb") as stdin:
            return run_peer(command, stdin=stdin)

    # The sizes run at once, so their `-t` waits overlap.
    with ThreadPoolExecutor(len(UDP_SIZES)) as pool:
        payloads = {name: os.urandom(size) for name, size in UDP_SIZES.items()}
        replies = dict(zip(payloads, pool.map(echo, payloads.values()), strict=True))
    problems = {name: mismatch(replies[name], payload) for name, payload in payloads.items()}
    assert not any(problems.values()), problems


def test_tcp_timestamp(start_sockd: StartSockd, socat: str) -> None:
    daemon = start_sockd([listener("stamp", "tcp", "timestamp", "threaded")])
    command = [socat, "-t", "10", "-T", "20", "-", f"TCP:{daemon.address('stamp')}"]
    reply = run_peer(command, input=b"what time is it?\n").decode()
    # One line, the seed's `str(datetime.now())` (it carries no newline of its own).
    assert "\n" not in reply, reply
    stamp = datetime.datetime.fromisoformat(reply)
    assert abs(datetime.datetime.now() - stamp) < datetime.timedelta(minutes=1), reply


@pytest.mark.parametrize("model", MODELS)
def test_ncat_echo_over_tcp_and_unix(start_sockd: StartSockd, sockdir: Path, model: str) -> None:
    ncat = require("ncat")
    daemon = start_sockd(
        [listener("tcp", "tcp", "echo", model), listener("unix", "unix", "echo", model, sockdir / "n.sock")]
    )
    host, port = daemon.address("tcp").rsplit(":", 1)
    # ncat half-closes at the end of its stdin, and exits once sockd has echoed all and closed.
    for command in ([ncat, host, port], [ncat, "-U", daemon.address("unix")]):
        assert_echoes(functools.partial(run_peer, command), STREAM_SIZES)

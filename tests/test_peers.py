"""socat and ncat as clients of sockd: random bytes echo back byte for byte, over TCP, Unix and
UDP, under every concurrency model; and socat gets the timestamp handler's one reply. And
xinetd as a server beside sockd: its chargen against sockd's and RFC 864's."""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
from test_handlers import rfc864_lines

from support import MODELS, StartSockd, eventually, free_port, inet, listener, require

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


# ---------------------------------------------------------------------------------------------
# chargen against xinetd's own (Debian xinetd, its INTERNAL chargen-stream and chargen-dgram).

CHARGEN_LINES = 10_000
LINE = 74  # 72 characters and CRLF


@dataclass(frozen=True)
class Xinetd:
    stream: tuple[str, int]
    dgram: tuple[str, int]


XINETD_DEFAULTS = """defaults
{
    instances = UNLIMITED
    per_source = UNLIMITED
    cps = 1000000 1
}
"""


@pytest.fixture
def xinetd(tmp_path: Path) -> Iterator[Xinetd]:
    """An xinetd of the test's own, serving its internal chargen on loopback over TCP and UDP,
    stopped at the end. Its rate and instance limits are lifted (cps 50 10 would switch a
    service off), and it logs to a file: there is no syslog here."""
    program = require("xinetd")
    stream, dgram = free_port(), _free_udp_port()
    services = "".join(
        f"""
service chargen
{{
    type = INTERNAL UNLISTED
    id = chargen-{kind}
    socket_type = {kind}
    protocol = {protocol}
    port = {port}
    bind = 127.0.0.1
    wait = {wait}
    user = root
    flags = REUSE
}}
"""
        for kind, protocol, port, wait in (("stream", "tcp", stream, "no"), ("dgram", "udp", dgram, "yes"))
    )
    conf = tmp_path / "xinetd.conf"
    conf.write_text(
        "defaults\n{\n    instances = UNLIMITED\n    per_source = UNLIMITED\n    cps = 1000000 1\n}\n" + services
    )
    log = tmp_path / "xinetd.log"
    command = [program, "-dontfork", "-f", str(conf), "-filelog", str(log), "-pidfile", str(tmp_path / "xinetd.pid")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: "Started working" in (log.read_text() if log.exists() else ""), "xinetd has started")
        yield Xinetd(("127.0.0.1", stream), ("127.0.0.1", dgram))
    finally:
        process.terminate()
        process.wait(PEER_TIMEOUT)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _first_lines(address: tuple[str, int], count: int) -> bytes:
    with socket.create_connection(address, timeout=PEER_TIMEOUT) as sock:
        got = bytearray()
        while len(got) < count * LINE:
            chunk = sock.recv(1 << 16)
            assert chunk, "chargen closed the stream"
            got += chunk
    return bytes(got[: count * LINE])


def xinetd_lines(count: int) -> bytes:
    """xinetd's chargen, as measured (xinetd 2.3.15, Debian 12): the 93 characters from '!' to
    '}' (no space, no '~'), line n starting n places along them, but every 95 lines the lines
    starting at '!' and '"' come twice: its period is 95 lines, as the RFC's is, over 93
    characters."""
    ring = bytes(range(33, 126)) * 2
    starts = [*range(93), 0, 1]
    return b"".join(ring[starts[n % 95] : starts[n % 95] + 72] + b"\r\n" for n in range(count))


def _answer(sock: socket.socket, address: tuple[str, int], size: int) -> bytes:
    """The answer to one datagram of `size` bytes; sent again if it (or its answer) was lost."""
    for _ in range(5):
        sock.sendto(b"?" * size, address)
        try:
            return sock.recv(1 << 16)
        except TimeoutError:
            continue
    pytest.fail(f"no answer from {address}")


def test_chargen_follows_rfc_864_where_xinetd_does_not(start_sockd: StartSockd, xinetd: Xinetd) -> None:
    daemon = start_sockd([listener("tcp", "tcp", "chargen", "selector"), listener("udp", "udp", "chargen", "selector")])
    ours = _first_lines(inet(daemon.address("tcp")), CHARGEN_LINES)
    theirs = _first_lines(xinetd.stream, CHARGEN_LINES)  # first: its datagrams move where it starts
    assert ours == rfc864_lines(CHARGEN_LINES)
    assert theirs == xinetd_lines(CHARGEN_LINES)
    # Where they differ: from the first byte. The RFC's lines are of the 95 printable characters
    # (32 to 126) and begin with a space; xinetd's leave out the space and '~'.
    assert ours[0] == ord(" ")
    assert theirs[0] == ord("!")
    assert set(ours) - set(b"\r\n") == set(range(32, 127))
    assert set(theirs) - set(b"\r\n") == set(range(33, 126))
    # Over UDP, the RFC answers with 0 to 512 characters, at random: sockd so, each the pattern
    # from its start; xinetd with 1024 whatever the datagram, its lines going on from one
    # datagram to the next.
    pattern = rfc864_lines(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        ours_udp = [_answer(sock, inet(daemon.address("udp")), size) for size in (0, 1, 100, 1000) * 10]
        theirs_udp = [_answer(sock, xinetd.dgram, size) for size in (0, 1, 100, 1000)]
    assert all(len(reply) <= 512 and reply == pattern[: len(reply)] for reply in ours_udp)
    assert len({len(reply) for reply in ours_udp}) > 1  # random lengths, not one
    assert [len(reply) for reply in theirs_udp] == [1024] * 4

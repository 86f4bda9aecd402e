"""The seed tutorial's own clients (tests/seed/, vendored verbatim) against sockd.

The clients hard-code their server: the Python ones localhost:50000, the Rust one 127.0.0.1:50000,
the C UDP one 127.0.0.1:50000, and the C TCP one 127.0.0.1:20675, because it forgets htons() and
this is a little-endian machine (htons(50000) == 20675 read back in host order). Fixed ports mean
these tests must never run at the same time as each other. A lock file keeps them apart: across
xdist workers, under any `--dist`, and across two pytest runs on one machine. (xdist's own
`xdist_group` mark does nothing on pytest 9.2 with pytest-xdist 3.8: pytest-dev/pytest-xdist#1386.)
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import MODELS, StartSockd, listener, require

SEED = Path(__file__).resolve().parent / "seed"

PORT = 50000  # every seed client but the C TCP one
# The C TCP client's port: without htons(), 50000 goes on the wire in host byte order.
C_TCP_PORT = int.from_bytes(PORT.to_bytes(2, sys.byteorder), "big")  # 20675 on little-endian
CLIENT_TIMEOUT = 20.0  # seconds a seed client may run
LOCK_TIMEOUT = 300.0  # seconds to wait for another pytest run to release the fixed ports


@pytest.fixture(autouse=True)
def seed_ports() -> Iterator[None]:
    """Hold the fixed ports against every other test of this module, in whatever worker or pytest
    run: a lock on a file they all agree on, waited for with a deadline."""
    path = Path(tempfile.gettempdir()) / "sockd-test-seed-ports.lock"
    with path.open("a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pytest.fail(f"ports {PORT} and {C_TCP_PORT} still held by another test run after {LOCK_TIMEOUT} s")
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def localhost() -> None:
    """The Python clients make AF_INET sockets and connect to "localhost": that resolves to IPv4
    only (never ::1, whatever the order in /etc/hosts), so it must be the loopback address sockd
    listens on. Checked here so a strange resolver fails with its own message."""
    assert socket.gethostbyname("localhost") == "127.0.0.1"


def require_rustc() -> str:
    """rustc is often only in ~/.cargo/bin, which a non-login shell may not have on PATH."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), str(Path.home() / ".cargo" / "bin")])
    return shutil.which("rustc", path=search) or require("rustc")  # skipped, or failed under CI


def compile_program(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"


@pytest.fixture(scope="session")
def c_clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gcc = require("gcc")
    out = tmp_path_factory.mktemp("seed-c")
    built = {}
    for name in ("tcp_echo_client", "udp_echo_client"):
        built[name] = out / name
        compile_program([gcc, "-o", str(built[name]), str(SEED / f"{name}.c")])
    return built


@pytest.fixture(scope="session")
def rust_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rustc = require_rustc()
    out = tmp_path_factory.mktemp("seed-rust")
    binary = out / "tcp_echo_client"
    compile_program([rustc, "--edition", "2021", "-o", str(binary), str(SEED / "tcp_echo_client.rs")])
    return binary


def run_client(*command: str | Path, stdin: bytes = b"") -> bytes:
    """Run a seed client to its end; it must exit 0. Its stdout, as bytes."""
    done = subprocess.run(
        [str(part) for part in command], input=stdin, capture_output=True, timeout=CLIENT_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stdout!r} {done.stderr!r}"
    return done.stdout


def serve(start_sockd: StartSockd, protocol: str, handler: str, model: str, port: int = PORT) -> None:
    daemon = start_sockd([listener("seed", protocol, handler, model, "127.0.0.1", port=port)])
    assert daemon.address("seed") == f"127.0.0.1:{port}"


def assert_recent_stamp(text: str) -> None:
    """The seed server's reply: `str(datetime.now())`, e.g. 2026-11-27 14:37:40.645904."""
    stamp = datetime.datetime.fromisoformat(text)
    assert abs(datetime.datetime.now() - stamp) < datetime.timedelta(minutes=1), text


@pytest.mark.usefixtures("localhost")
@pytest.mark.parametrize("model", MODELS)
def test_python_tcp_client(start_sockd: StartSockd, model: str) -> None:
    serve(start_sockd, "tcp", "timestamp", model)
    out = run_client(sys.executable, SEED / "tcp_client.py", stdin=b"hello world\n").decode()
    prefix = "Input a message: Got a message: "
    assert out.startswith(prefix), out
    assert out.endswith("\n"), out
    assert_recent_stamp(out.removeprefix(prefix).removesuffix("\n"))


@pytest.mark.usefixtures("localhost")
@pytest.mark.parametrize("model", MODELS)
def test_python_udp_client(start_sockd: StartSockd, model: str) -> None:
    serve(start_sockd, "udp", "timestamp", model)
    out = run_client(sys.executable, SEED / "udp_client.py").decode()
    assert out.endswith("\n"), out
    assert_recent_stamp(out.removesuffix("\n"))


@pytest.mark.usefixtures("localhost")
def test_python_argv_client(start_sockd: StartSockd) -> None:
    serve(start_sockd, "tcp", "timestamp", "iterative")  # the tutorial's single-thread server
    out = run_client(sys.executable, SEED / "tcp_client_argv.py", "3").decode()
    prefix = "Got a message: "
    assert out.startswith(prefix), out
    assert out.endswith("\n"), out
    assert_recent_stamp(out.removeprefix(prefix).removesuffix("\n"))


@pytest.mark.parametrize("model", MODELS)
def test_rust_tcp_echo_client(start_sockd: StartSockd, rust_client: Path, model: str) -> None:
    # The client writes, reads once and exits without a half-close: the exit is its hang-up.
    serve(start_sockd, "tcp", "echo", model)
    out = run_client(rust_client)
    # It prints its whole 4096-byte buffer: the echo, then NULs, then println!'s newline.
    assert len(out) == 4096 + 1, out
    assert out.rstrip(b"\n").rstrip(b"\0") == b"hello world"


@pytest.mark.parametrize("model", MODELS)
def test_c_tcp_echo_client(start_sockd: StartSockd, c_clients: dict[str, Path], model: str) -> None:
    serve(start_sockd, "tcp", "echo", model, port=C_TCP_PORT)
    assert run_client(c_clients["tcp_echo_client"]) == b"hello world\n"


@pytest.mark.parametrize("model", MODELS)
def test_c_udp_echo_client(start_sockd: StartSockd, c_clients: dict[str, Path], model: str) -> None:
    serve(start_sockd, "udp", "echo", model)
    assert run_client(c_clients["udp_echo_client"]) == b"hello world\n"

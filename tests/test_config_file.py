"""The config file as the daemon reads it (sockd.tls.material.load_config): a file that is no regular file, or
too large a document, is refused in one line at `--check`, and on a reload while the supervisor
keeps supervising; and the file read when no `-c` is given."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockd.config import MAX_FILE_BYTES, MAX_VALUES
from sockd.errors import EX_CONFIG

from support import TIMEOUT, StartSockd, config_text, listener, machine_config, request, run_sockd

# A 4 MiB document of two million values, one byte under the size cap. Unbounded, PyYAML took a
# minute (and the supervisor 1.6 GB) to compose it: longer than any of these tests waits.
HUGE = "x: [" + ",".join(["1"] * ((MAX_FILE_BYTES - 16) // 2)) + "]\n"
TOO_LARGE = f"too large: more than {MAX_VALUES} values (scalars, lists and mappings) by this line"


def test_check_refuses_a_document_of_millions_of_values_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(HUGE)
    # The bound is what the message says (the parse stopped at the cap); the wait only has to
    # outlast a busy machine's share of the few seconds of CPU that takes.
    result = run_sockd("--check", "-c", str(path), timeout=300)
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr == f"{path}:1: {TOO_LARGE}: a sockd config has far fewer\n"


def test_a_reload_of_millions_of_values_is_refused_while_a_killed_worker_is_replaced(start_sockd: StartSockd) -> None:
    """The reload's parse is bounded: the loop turns on and replaces a worker killed meanwhile
    (it used to wait for the whole parse, a minute)."""
    daemon = start_sockd([listener("echo", "tcp", "echo", "asyncio")])
    old = daemon.worker_pid("echo")
    daemon.config_path.write_text(HUGE)
    mark = len(daemon.events)
    daemon.process.send_signal(signal.SIGHUP)
    os.kill(old, signal.SIGKILL)
    # What proves the parse bounded is the problem it names; the waits only have to outlast a
    # busy machine's share of the few seconds of CPU it takes.
    daemon.wait_for("worker started", listener="echo", after=mark, timeout=120)
    problem = daemon.wait_for("config error", after=mark, timeout=120)["problem"]
    assert problem.startswith(f"{daemon.config_path}:1: {TOO_LARGE}"), problem
    assert request(daemon.address("echo"), b"still here") == b"still here"


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


def test_check_refuses_a_fifo_without_waiting_for_a_writer(fifo: Path) -> None:
    result = run_sockd("--check", "-c", str(fifo), timeout=TIMEOUT)
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr == f"{fifo}: cannot read: not a regular file\n"


def test_a_config_replaced_by_a_fifo_is_refused_and_sockd_keeps_supervising(start_sockd: StartSockd) -> None:
    """open() of a FIFO waits for a writer: the supervisor used to hang in it, neither replacing
    a killed worker nor taking SIGTERM."""
    daemon = start_sockd([listener("echo", "tcp", "echo", "selector")])
    old = daemon.worker_pid("echo")
    daemon.config_path.unlink()
    os.mkfifo(daemon.config_path)
    mark = len(daemon.events)
    daemon.process.send_signal(signal.SIGHUP)
    problem = daemon.wait_for("config error", after=mark)["problem"]
    assert problem == f"{daemon.config_path}: cannot read: not a regular file"
    os.kill(old, signal.SIGKILL)
    daemon.wait_for("worker started", listener="echo", after=mark)
    assert request(daemon.address("echo"), b"still here") == b"still here"
    assert daemon.stop() == 0, daemon.other_lines


def test_a_symlink_to_a_config_is_read(tmp_path: Path) -> None:
    """Config managers link files into /etc: the link is followed."""
    target = tmp_path / "real.yaml"
    target.write_text(config_text([listener("echo", "tcp", "echo", "asyncio")]))
    link = tmp_path / "sockd.yaml"
    link.symlink_to(target)
    result = run_sockd("--check", "-c", str(link))
    assert (result.returncode, result.stdout) == (0, f"{link}: OK, 1 listener\n"), result.stderr


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("/tmp/a\0b", "listeners[0].path: may not hold a NUL character"),
        ("@name", "listeners[0].path: a leading @ names a Linux abstract socket"),
    ],
    ids=["nul", "abstract"],
)
def test_check_refuses_a_unix_path_bind_would_not_take_as_written(tmp_path: Path, where: str, message: str) -> None:
    """A NUL passed --check and then gave a 28-line traceback at start; `@name` made a file of
    that name where clients look for an abstract socket."""
    path = tmp_path / "sockd.yaml"
    path.write_text(config_text([listener("uds", "unix", "echo", "selector", where)]))
    for args in (("--check", "-c", str(path)), ("-c", str(path))):
        result = run_sockd(*args)
        assert result.returncode == EX_CONFIG, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"{path}:"), line
        assert message in line, line


DEFAULT = Path("/etc/sockd/sockd.yaml")


@contextlib.contextmanager
def default_config(text: str) -> Iterator[None]:
    """/etc/sockd/sockd.yaml holding `text`, and as it was afterwards (the tests run as root; the
    package's test installs one there too)."""
    with machine_config():
        before = DEFAULT.read_bytes() if DEFAULT.exists() else None
        made = not DEFAULT.parent.exists()
        DEFAULT.parent.mkdir(parents=True, exist_ok=True)
        try:
            DEFAULT.write_text(text)
            yield
        finally:
            if before is not None:
                DEFAULT.write_bytes(before)
            else:
                DEFAULT.unlink()
                if made:
                    DEFAULT.parent.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="writes /etc/sockd/sockd.yaml")
def test_without_c_sockd_reads_etc_sockd_sockd_yaml() -> None:
    with default_config(
        config_text([listener("a", "tcp", "echo", "asyncio"), listener("b", "udp", "echo", "asyncio")])
    ):
        result = run_sockd("--check")
    assert (result.returncode, result.stdout) == (0, f"{DEFAULT}: OK, 2 listeners\n"), result.stderr

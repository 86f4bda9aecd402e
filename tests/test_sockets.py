"""Binding listeners, and what sockd does with whatever already sits at a Unix socket path."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import yaml

from support import Launcher, request, run_sockd
from support import listener as entry


def _start_failing(tmp_path: Path, listener: dict[str, object]) -> tuple[int, str]:
    path = tmp_path / "sockd.yaml"
    path.write_text(yaml.safe_dump({"listeners": [listener]}))
    done = run_sockd("-c", str(path))
    return done.returncode, done.stderr


def test_a_stale_socket_file_is_replaced(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # closed without unlink: what a crashed server leaves behind
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path)])
    assert request(str(path), b"fresh") == b"fresh"
    assert daemon.stop() == 0


def test_a_live_socket_is_not_taken_over(tmp_path: Path, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        code, stderr = _start_failing(tmp_path, entry("u", "unix", "echo", "selector", path))
    assert code == 71
    assert stderr == f"sockd: cannot bind listener 'u' to unix {path}: address already in use\n"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path: Path, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    path.write_text("precious")
    code, stderr = _start_failing(tmp_path, entry("u", "unix", "echo", "selector", path))
    assert code == 71
    reason = "something that is not a socket is at this path; sockd will not remove it"
    assert stderr == f"sockd: cannot bind listener 'u' to unix {path}: {reason}\n"
    assert path.read_text() == "precious"


def test_a_symlink_at_the_path_is_not_followed(tmp_path: Path, sockdir: Path) -> None:
    target = sockdir / "target"
    target.write_text("precious")
    path = sockdir / "s.sock"
    path.symlink_to(target)
    code, stderr = _start_failing(tmp_path, entry("u", "unix", "echo", "selector", path))
    assert code == 71
    assert "something that is not a socket is at this path" in stderr
    assert path.is_symlink()
    assert target.read_text() == "precious"


def test_the_socket_file_gets_its_mode_and_is_removed_at_stop(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "missing-dir" / "s.sock"  # the parent directory is created
    daemon = start_sockd([entry("u", "unix", "echo", "asyncio", path, mode="0600")])
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert daemon.stop() == 0
    assert not path.exists()


def test_a_socket_file_replaced_behind_sockd_is_left_alone_at_stop(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "asyncio", path)])
    path.unlink()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))  # someone else's socket now
        assert daemon.stop() == 0
        assert path.exists()


def test_a_hostname_is_resolved(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("h", "tcp", "echo", "asyncio", "localhost")])
    assert request(daemon.address("h"), b"by name") == b"by name"


def test_tcp_and_udp_may_share_a_port_number(start_sockd: Launcher) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start_sockd(
        [entry("t", "tcp", "echo", "asyncio", port=port), entry("u", "udp", "echo", "asyncio", port=port)]
    )
    assert daemon.address("t") == daemon.address("u") == f"127.0.0.1:{port}"

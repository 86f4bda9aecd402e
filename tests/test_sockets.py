"""Binding listeners, and what sockd does with whatever already sits at a Unix socket path."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
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


NOBODY = 65534


def test_a_reload_never_changes_the_mode_of_what_a_symlink_at_the_socket_path_points_to(
    start_sockd: Launcher, sockdir: Path
) -> None:
    secret = sockdir / "secret"
    secret.write_text("root's")
    secret.chmod(0o600)
    path = sockdir / "s.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path, mode="0600")])
    path.unlink()
    path.symlink_to(secret)  # what a user who can write the directory could do
    plan = daemon.reload([entry("u", "unix", "echo", "selector", path, mode="0666")])
    assert plan["restarted"] == ["u"]
    warning = daemon.wait_for("cannot apply the socket file's new mode")
    assert warning["error"] == "the socket file was replaced by something else"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert path.is_symlink()


def test_a_reload_changes_the_mode_of_the_socket_file_it_made(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path, mode="0600")])
    daemon.reload([entry("u", "unix", "echo", "selector", path, mode="0640")])
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
    assert request(str(path), b"same socket") == b"same socket"


def _untrusted_directory(sockdir: Path, kind: str) -> Path:
    directory = sockdir / "d"
    directory.mkdir()
    if kind == "owned by another user":
        os.chown(directory, NOBODY, NOBODY)
        return directory
    if kind == "writable by all, not sticky":
        directory.chmod(0o777)
        return directory
    link = sockdir / "link"  # a symlink to a trusted directory, but another user's
    os.symlink(directory, link)
    os.lchown(link, NOBODY, NOBODY)
    return link


@pytest.mark.parametrize("kind", ["owned by another user", "writable by all, not sticky", "a symlink of another user"])
def test_a_socket_directory_another_user_could_swap_files_in_is_refused(
    tmp_path: Path, sockdir: Path, kind: str
) -> None:
    directory = _untrusted_directory(sockdir, kind)
    path = directory / "s.sock"
    code, stderr = _start_failing(tmp_path, entry("u", "unix", "echo", "selector", path))
    assert code == 71, stderr
    [line] = stderr.splitlines()
    assert line.startswith(f"sockd: cannot bind listener 'u' to unix {path}: ")
    assert any(words in line for words in ("belongs to another user", "not sticky", "symlink owned by another")), line
    assert not os.path.lexists(path)


def test_a_sticky_directory_writable_by_all_is_used(start_sockd: Launcher, sockdir: Path) -> None:
    directory = sockdir / "d"
    directory.mkdir()
    directory.chmod(0o1777)  # as /tmp is: nobody may remove or rename another's file
    path = directory / "s.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path)])
    assert request(str(path), b"sticky") == b"sticky"
    assert daemon.stop() == 0


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

"""A listener's `user` and `group` (its workers drop root to them) and a Unix listener's `owner` and
`owner_group` (its socket file's): sockd.privileges, with the real daemon (run as root, as CI runs)."""

from __future__ import annotations

import ctypes
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sockd import privileges
from sockd.privileges import PrivilegeError

from support import (
    CA,
    MODELS,
    SERVER_NAME,
    TIMEOUT,
    Launcher,
    assert_rejected,
    becomes,
    client_context,
    free_port,
    recv_exactly,
    request,
    requests,
    require,
    run_sockd,
    sockd_command,
)
from support import listener as entry

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = pwd.getpwnam("nobody").pw_gid
DAEMON = pwd.getpwnam("daemon").pw_uid  # another unprivileged user, with a group of its own
_PR_SET_SECUREBITS = 28  # <linux/prctl.h>
_SECBIT_NO_SETUID_FIXUP = 1 << 2  # <linux/securebits.h>: capabilities survive a setuid from root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root (CI runs as root)")


def _credentials(pid: int) -> dict[str, list[int]]:
    """A process's Uid, Gid (real, effective, saved, filesystem) and Groups, as /proc shows them."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = (line.split(":", 1) for line in lines)
    return {name: [int(n) for n in value.split()] for name, value in fields if name in ("Uid", "Gid", "Groups")}


def _as(uid: int, gid: int) -> dict[str, list[int]]:
    return {"Uid": [uid] * 4, "Gid": [gid] * 4, "Groups": [gid]}


@pytest.mark.parametrize("model", MODELS)
def test_a_worker_runs_as_its_listeners_user_and_serves(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", model, user="nobody")])
    assert request(daemon.address("e"), b"as nobody") == b"as nobody"
    assert _credentials(daemon.worker_pid("e")) == _as(NOBODY, NOGROUP)
    # Its counts still reach the supervisor: the shared memory was mapped before the drop.
    becomes(lambda: requests(daemon, "e"), 1.0, "the request counted")
    assert _credentials(daemon.process.pid)["Uid"] == [0] * 4  # the supervisor stays root


def test_a_dropped_worker_serves_tls_with_a_key_only_root_can_read(
    start_sockd: Launcher, tls_ca: CA, tmp_path: Path
) -> None:
    issued = tls_ca.server().write(tmp_path, "server")
    Path(issued.key).chmod(0o600)  # root's, in pytest's 0700 directory: the supervisor reads it
    daemon = start_sockd(
        [entry("t", "tcp", "echo", "asyncio", user="nobody", tls={"cert": str(issued.cert), "key": str(issued.key)})]
    )
    host, port = daemon.address("t").rsplit(":", 1)
    context = client_context(tls_ca.write(tmp_path))
    with (
        socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as client,
    ):
        client.sendall(b"over tls")
        assert recv_exactly(client, 8) == b"over tls"
    assert _credentials(daemon.worker_pid("t")) == _as(NOBODY, NOGROUP)


def test_a_dropped_relay_resolves_its_upstream(start_sockd: Launcher) -> None:
    port = free_port()
    daemon = start_sockd(
        [
            entry("echo", "tcp", "echo", "selector", port=port),
            entry("r", "tcp", "relay", "asyncio", user="nobody", upstream=f"tcp://localhost:{port}"),
        ]
    )
    assert request(daemon.address("r"), b"relayed") == b"relayed"
    assert _credentials(daemon.worker_pid("r")) == _as(NOBODY, NOGROUP)


def _free_privileged_port() -> int:
    """A loopback TCP port below 1024 that nothing holds now."""
    for port in range(1023, 899, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 900-1023")


def test_a_port_below_1024_is_bound_by_the_supervisor_and_served_by_the_dropped_worker(
    start_sockd: Launcher,
) -> None:
    port = _free_privileged_port()
    daemon = start_sockd([entry("low", "tcp", "echo", "asyncio", port=port, user="nobody")])
    assert request(f"127.0.0.1:{port}", b"low port") == b"low port"
    assert _credentials(daemon.worker_pid("low")) == _as(NOBODY, NOGROUP)


def test_a_listener_without_user_runs_as_sockd_does(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "selector"), entry("n", "tcp", "echo", "selector", user=NOBODY)])
    assert _credentials(daemon.worker_pid("e"))["Uid"] == [0] * 4
    assert _credentials(daemon.worker_pid("n")) == _as(NOBODY, NOGROUP)


def test_group_and_numeric_ids(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "asyncio", user=str(DAEMON), group=NOGROUP)])
    assert request(daemon.address("e"), b"ids") == b"ids"
    assert _credentials(daemon.worker_pid("e")) == _as(DAEMON, NOGROUP)


def test_a_unix_socket_file_gets_its_owner_group_and_mode(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    daemon = start_sockd(
        [entry("u", "unix", "echo", "threaded", path, mode="0660", owner="nobody", owner_group="daemon", user="nobody")]
    )
    info = os.lstat(path)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, DAEMON, 0o660)
    assert request(str(path), b"through the file") == b"through the file"
    assert _credentials(daemon.worker_pid("u")) == _as(NOBODY, NOGROUP)


def test_a_reload_changes_the_socket_files_owner(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "s.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path, owner="nobody")])
    assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (NOBODY, 0)  # owner_group: as bind() made it
    daemon.reload([entry("u", "unix", "echo", "selector", path, owner="daemon", owner_group="nogroup")])
    assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (DAEMON, NOGROUP)
    assert request(str(path), b"same socket") == b"same socket"


def test_a_reload_never_gives_away_what_a_symlink_at_the_socket_path_points_to(
    start_sockd: Launcher, sockdir: Path
) -> None:
    secret = sockdir / "secret"
    secret.write_text("root's")
    path = sockdir / "s.sock"
    daemon = start_sockd([entry("u", "unix", "echo", "selector", path)])
    path.unlink()
    path.symlink_to(secret)  # what a user who can write the directory could do
    daemon.reload([entry("u", "unix", "echo", "selector", path, owner="nobody")])
    assert daemon.wait_for("cannot apply the socket file's new mode")["error"] == (
        "the socket file was replaced by something else"
    )
    assert (secret.stat().st_uid, os.lstat(path).st_uid) == (0, 0)


def test_a_reload_that_changes_the_user_replaces_the_workers(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("e", "tcp", "echo", "asyncio", user="nobody")])
    address = daemon.address("e")
    old = daemon.worker_pid("e")
    mark = len(daemon.events)
    plan = daemon.reload([entry("e", "tcp", "echo", "asyncio", user="daemon")])  # port 0: the socket it has
    assert plan["restarted"] == ["e"]
    new = daemon.worker_pid("e", after=mark)
    assert new != old
    assert _credentials(new) == _as(DAEMON, DAEMON)
    assert request(address, b"as daemon") == b"as daemon"


REFUSALS = {
    # Capabilities of root outlive the worker's setuid, so setuid(0) would work again.
    "could become root again": (("--securebits", "+no_setuid_fixup"), "still holds capabilities after setuid: CapPrm "),
    # A root without CAP_SETGID and CAP_SETUID (a container's, a unit's bounding set): no drop at all.
    "cannot drop": (("--bounding-set", "-setuid,-setgid"), f"cannot become uid {NOBODY} gid {NOGROUP}: "),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_worker_that_cannot_drop_for_good_refuses_to_serve(start_sockd: Launcher, case: str) -> None:
    # Still root (uid 0) to the config; the worker finds out, says so, exits 1 and is restarted
    # like any worker that failed.
    options, error = REFUSALS[case]
    daemon = start_sockd(
        [entry("e", "tcp", "echo", "asyncio", user="nobody")], wait=False, prefix=(require("setpriv"), *options)
    )
    refused = daemon.wait_for("cannot drop privileges; not serving", listener="e")
    assert refused["error"].startswith(error)
    assert daemon.wait_for("worker died; restarting", pid=refused["pid"])["code"] == 1
    assert not any(event.get("event") == "serving" and event.get("pid") == refused["pid"] for event in daemon.events)


def _in_child(act: Callable[[], None]) -> str:
    """Run `act` in a forked child, with the real system calls: "ok" or the PrivilegeError's message."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            act()
            outcome = "ok"
        except PrivilegeError as exc:
            outcome = str(exc)
        except BaseException as exc:  # whatever it is, the parent's assertion shows it
            outcome = repr(exc)
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


def _keep_capabilities_across_setuid() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_SECUREBITS, ctypes.c_ulong(_SECBIT_NO_SETUID_FIXUP), 0, 0, 0) == 0


def test_the_check_refuses_a_process_that_can_regain_root() -> None:
    def half_dropped() -> None:  # every id changed, yet root's capabilities kept
        _keep_capabilities_across_setuid()
        os.setgroups([NOGROUP])
        os.setresgid(NOGROUP, NOGROUP, NOGROUP)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        privileges.check(NOBODY, NOGROUP)

    def saved_root() -> None:  # root kept as the saved uid, from which setuid(0) returns
        os.setgroups([NOGROUP])
        os.setresgid(NOGROUP, NOGROUP, NOGROUP)
        os.setresuid(NOBODY, NOBODY, 0)
        privileges.check(NOBODY, NOGROUP)

    assert _in_child(half_dropped) == "setuid(0) succeeded: root's uid can be had back"
    assert (
        _in_child(saved_root)
        == f"runs as uids ({NOBODY}, {NOBODY}, 0) gids {(NOGROUP,) * 3}, not uid {NOBODY} gid {NOGROUP}"
    )
    assert _in_child(lambda: privileges.check(NOBODY, NOGROUP)).startswith("runs as uids (0, 0, 0)")
    assert _in_child(lambda: privileges.drop(NOBODY, NOGROUP)) == "ok"


def test_drop_refuses_when_capabilities_outlive_the_setuid() -> None:
    def drop() -> None:
        _keep_capabilities_across_setuid()
        privileges.drop(NOBODY, NOGROUP)

    assert _in_child(drop).startswith("still holds capabilities after setuid: CapPrm ")


def _config(directory: Path, **options: str) -> Path:
    path = directory / "sockd.yaml"
    path.write_text(yaml.safe_dump({"listeners": [entry("e", "tcp", "echo", "asyncio", **options)]}))
    return path


def test_an_unknown_user_is_a_config_error_at_start(tmp_path: Path) -> None:
    path = _config(tmp_path, user="no-such-user")
    done = run_sockd("-c", str(path))
    assert done.returncode == 78
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  user:"))
    assert done.stderr == f"{path}:{line}: listeners[0].user: no user named 'no-such-user' in the password database\n"


def _as_nobody(*args: str) -> tuple[int, str, str]:
    """sockd run as nobody:nogroup without supplementary groups (as a non-root service would be)."""
    command = [require("setpriv"), "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *sockd_command(*args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    return done.returncode, done.stdout, done.stderr


def test_not_root_naming_another_user_is_a_config_error(sockdir: Path) -> None:
    sockdir.chmod(0o755)  # nobody reads the config from there
    other = _config(sockdir, user="daemon")
    line = next(n for n, text in enumerate(other.read_text().splitlines(), 1) if text.startswith("  user:"))
    expected = (
        f"{other}:{line}: listeners[0].user: sockd runs as uid {NOBODY}, not root, so cannot use uid {DAEMON}:"
        f" name uid {NOBODY} or start sockd as root\n"
    )
    for args in (("-c", str(other)), ("--check", "-c", str(other))):
        code, _, stderr = _as_nobody(*args)
        assert (code, stderr) == (78, expected)
    itself = _config(sockdir, user="nobody")  # its own user is no change: fine
    assert _as_nobody("--check", "-c", str(itself))[:2] == (0, f"{itself}: OK, 1 listener\n")


CONFIG_PROBLEMS = [
    (["group: nogroup"], "group", "only valid with user (a worker that stays root could take any group back)"),
    (["user: root"], "user", "root: a worker runs as root when its listener names no user"),
    (
        ["user: 123456"],
        "group",
        "uid 123456 is not in the password database, so has no group of its own: give group",
    ),
    (["user: nobody", "group: no-such-group"], "group", "no group named 'no-such-group' in the group database"),
    (["user: -1"], "user", "input should be greater than or equal to 0"),
    (["user: 4294967295"], "user", "4294967295 is not a user id: at most 4294967294"),
    (["owner: nobody"], "owner", "only valid with protocol: unix"),
]


@pytest.mark.parametrize(("options", "field", "message"), CONFIG_PROBLEMS)
def test_users_and_groups_that_cannot_be_had(tmp_path: Path, options: list[str], field: str, message: str) -> None:
    lines = "\n".join(f"    {option}" for option in options)
    text = f"""
listeners:
  - name: e
    protocol: tcp
    host: 127.0.0.1
    port: 0
    handler: echo
    concurrency: asyncio
{lines}
"""
    # The line of the field named; one not written (a group for want of one) is told at the listener's first.
    line = next((7 + n for n, option in enumerate(options, 1) if option.startswith(field)), 2)
    assert_rejected(tmp_path, text, (line, f"listeners[0].{field}", message))

"""Upgrading in place (sockd.upgrade): SIGUSR2 re-executes the sockd now on disk with the same pid,
from one installed version to another, under load and with persistent sessions, and an upgrade to
a broken install changes nothing.

The two installs are virtualenvs of their own, each with a wheel built from a copy of the source
whose __version__ says which it is (its dependencies are this environment's, through a .pth
file): built once per run, shared by the xdist workers. The daemon runs as a unit's ExecStart=
would, from a `sockd` console script at a path of its own, a link to one install; upgrading is
pointing the link at the other (what `make install` over the old one, or a package manager, does
to the path) and sending SIGUSR2."""

from __future__ import annotations

import collections
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sockd import __version__

from support import (
    RETIRED_OR_EXITED,
    ROOT,
    Daemon,
    Launcher,
    Load,
    Session,
    alive,
    building,
    connect,
    eventually,
    listener,
    request,
    run_directory,
    said,
    samples,
    scrape,
    short_directory,
    tcp_owner,
    value,
)

OLD, NEW = f"{__version__}+old", f"{__version__}+new"
SESSIONS = 10
NO_DEPS = ("--no-deps", "--no-index")  # the dependencies are this environment's (see build_install)


def build_install(directory: Path, version: str) -> Path:
    """A virtualenv in `directory` with sockd `version` installed from a wheel: its `sockd`."""
    source = directory / "source"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("sockd", "sockd_bench"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    init = source / "sockd" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
    wheels = directory / "wheels"
    subprocess.run(
        # This environment has what the build needs (pure: the copy has no setup.py).
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(wheels), str(source)],
        capture_output=True,
        timeout=600,
        check=True,
    )
    venv = directory / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120, check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = wheels.glob("sockd-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", *NO_DEPS, str(wheel)],
        capture_output=True,
        timeout=600,
        check=True,
    )
    return venv / "bin" / "sockd"


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The `sockd` of each install, by version."""
    root = run_directory(tmp_path_factory) / "upgrade-installs"
    done = root / "done"
    with building(tmp_path_factory):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            for version in (OLD, NEW):
                (root / version / "source").mkdir(parents=True)
                build_install(root / version, version)
            done.touch()
    return {version: root / version / "venv" / "bin" / "sockd" for version in (OLD, NEW)}


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """Where the daemon's `sockd` is: a link, which an upgrade points elsewhere."""
    with short_directory() as directory:
        yield directory / "sockd"


def point(link: Path, target: Path) -> None:
    """Put `target` at `link` in one step, as an install renames its files into place."""
    new = link.with_suffix(".new")
    new.unlink(missing_ok=True)
    new.symlink_to(target)
    new.replace(link)


def version(daemon: Daemon) -> str:
    found = [labels for name, labels in samples(daemon) if name == "sockd_build_info"]
    assert len(found) == 1, found
    return dict(found[0])["version"]


def upgrades(daemon: Daemon, result: str) -> float:
    return value(samples(daemon), "sockd_upgrades_total", result=result)


def upgrade(daemon: Daemon, event: str = "ready") -> int:
    """SIGUSR2, and wait for `event` after it: the index in the log it was sent at."""
    mark = len(daemon.events)
    daemon.process.send_signal(signal.SIGUSR2)
    daemon.wait_for(event, after=mark, timeout=60)
    return mark


@dataclass
class Talking:
    """Persistent sessions, each sending a request now and then from a thread of their own, until
    told to stop; what failed, and how many exchanges each had."""

    sessions: list[Session]
    failures: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 240
        while not self.done.is_set() and time.monotonic() < deadline:
            for session in self.sessions:
                try:
                    session.exchange()
                except (OSError, AssertionError) as exc:
                    self.failures.append(f"{session.name}: {exc!r}")
            self.done.wait(0.05)

    def exchanges(self) -> list[int]:
        return [session.exchanges for session in self.sessions]

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


def test_an_upgrade_under_load_refuses_nothing_cuts_no_session_and_serves_new_connections_with_the_new_version(
    start_sockd: Launcher, installs: dict[str, Path], installed: Path
) -> None:
    point(installed, installs[OLD])
    sock_path = installed.parent / "echo.sock"
    listeners = [
        listener("echo", "tcp", "echo", "asyncio", workers=2),
        listener("local", "unix", "echo", "threaded", sock_path),
    ]
    daemon = start_sockd(listeners, program=(str(installed),))
    address = daemon.address("echo")
    assert version(daemon) == OLD
    sessions = [Session(address if n % 2 else str(sock_path), f"session{n}", timeout=30) for n in range(SESSIONS)]
    talking = Talking(sessions)
    load = Load([address, str(sock_path)])
    try:
        eventually(lambda: load.answered > 100 and min(talking.exchanges()) > 2, "load and sessions going")
        old_workers = daemon.worker_pids("echo") + daemon.worker_pids("local")
        counted = value(samples(daemon), "sockd_requests_total", listener="echo")
        assert counted > 0
        point(installed, installs[NEW])
        mark = upgrade(daemon)
        upgraded = daemon.wait_for("upgraded", after=mark)
        assert (upgraded["pid"], upgraded["previous"], upgraded["version"]) == (daemon.process.pid, OLD, NEW)
        before = (load.answered, talking.exchanges())
        eventually(lambda: load.answered > before[0] + 100, "load served after the upgrade", timeout=30)
        eventually(
            lambda: all(now > then + 2 for now, then in zip(talking.exchanges(), before[1], strict=True)),
            "every session echoing after the upgrade",
            timeout=30,
        )
    finally:
        load.stop()
        talking.stop()
    assert load.failures == [], load.failures[:5]
    assert talking.failures == [], talking.failures[:5]
    assert daemon.process.poll() is None
    print(  # the note asks for these counts
        f"\nupgrade under load: {load.answered} requests, {len(load.failures)} failures,"
        f" {SESSIONS - len({f.split(':')[0] for f in talking.failures})}/{SESSIONS} sessions kept"
        f" ({sum(talking.exchanges())} exchanges)"
    )

    # The new version serves: the supervisor (same pid), its fork server, and new connections.
    assert version(daemon) == NEW
    assert upgrades(daemon, "ok") == 1
    assert upgrades(daemon, "failed") == 0
    fork_server = daemon.wait_for("fork server started", after=mark)
    assert fork_server["package"].startswith(str(installs[NEW].parents[1])), fork_server
    new_workers = [pid for pid in daemon.worker_pids("echo") if pid not in old_workers]
    assert len(new_workers) == 2
    with connect(address) as client:
        assert request(address, b"new") == b"new"
        client.sendall(b"whose?")
        assert client.recv(64) == b"whose?"
        assert tcp_owner(client, new_workers) is not None
    # What the old workers counted was carried over: no count went back.
    assert value(samples(daemon), "sockd_requests_total", listener="echo") >= counted

    # The adopted workers serve each session until its client ends it, then exit: without a
    # reload_drain_timeout nothing bounds an upgrade's old generation (shutdown_timeout bounds a stop).
    for session in sessions:
        session.exchange()
        session.close()
    for pid in old_workers:
        daemon.wait_for("worker exited", pid=pid, after=mark, timeout=30)
        assert not alive(pid)


def test_an_upgrade_to_a_broken_install_keeps_the_old_one_serving_and_is_counted(
    start_sockd: Launcher, installs: dict[str, Path], installed: Path
) -> None:
    point(installed, installs[OLD])
    daemon = start_sockd([listener("echo", "tcp", "echo", "selector")], program=(str(installed),))
    address = daemon.address("echo")
    session = Session(address, "kept")
    session.exchange()
    broken = installed.parent / "broken"
    broken.write_text("#!/bin/sh\necho 'Traceback: cannot import sockd' >&2\nexit 1\n")
    broken.chmod(0o755)
    point(installed, broken)

    mark = upgrade(daemon, "upgrade failed, the old sockd serves on")
    failed = daemon.wait_for("upgrade failed, the old sockd serves on", after=mark)
    assert failed["reason"] == f"{installed} --check exited with 1: Traceback: cannot import sockd", failed
    session.exchange()
    assert request(address, b"still served") == b"still served"
    assert (version(daemon), upgrades(daemon, "failed"), upgrades(daemon, "ok")) == (OLD, 1, 0)
    assert not [e for e in daemon.events[mark:] if e.get("event") == "worker started"]

    # Fixed: the next upgrade takes, and the counts go on across the exec.
    point(installed, installs[NEW])
    upgrade(daemon)
    session.exchange()
    assert (version(daemon), upgrades(daemon, "failed"), upgrades(daemon, "ok")) == (NEW, 1, 1)
    session.close()


def test_an_upgrade_applies_the_config_retiring_a_listener_gone_and_binding_a_moved_one_anew(
    start_sockd: Launcher,
) -> None:
    """The same code re-executed (`python -m sockd`): what an upgrade does to the listeners does not
    depend on the version."""
    kept = listener("kept", "tcp", "echo", "asyncio")
    moved = listener("moved", "tcp", "echo", "selector")
    gone = listener("gone", "tcp", "echo", "threaded")
    daemon = start_sockd([kept, moved, gone])
    addresses = {name: daemon.address(name) for name in ("kept", "moved", "gone")}
    sessions = {name: Session(address, name) for name, address in addresses.items()}
    daemon.write_config([kept, {**moved, "host": "127.0.0.2"}], metrics={"port": 0})

    mark = upgrade(daemon)
    assert daemon.wait_for("listening", listener="kept", after=mark)["address"] == addresses["kept"]
    moved_to = daemon.wait_for("listening", listener="moved", after=mark)["address"]
    assert moved_to.startswith("127.0.0.2:")
    assert request(moved_to, b"moved") == b"moved"
    assert request(addresses["kept"], b"kept") == b"kept"
    for name in ("gone", "moved"):  # their old sockets are closed: a new client is refused
        eventually(functools.partial(refused, addresses[name]), f"{name}'s old address refused")
    for session in sessions.values():  # and every session goes on in its old worker
        session.exchange()
        session.close()
    assert "sockd_connections_total" in scrape(daemon)


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_the_workers_ignore_sigusr2_sent_to_every_process_of_the_unit(start_sockd: Launcher) -> None:
    """`systemctl kill -s USR2 sockd` without --kill-whom=main reaches the workers too."""
    daemon = start_sockd([listener("echo", "tcp", "echo", "asyncio")])
    worker = daemon.worker_pid("echo")
    os.kill(worker, signal.SIGUSR2)
    assert request(daemon.address("echo"), b"served") == b"served"  # by that worker, the only one
    assert alive(worker)
    assert not [e for e in daemon.events if e.get("event") == "worker died; restarting"]


def test_the_agent_answers_up_ready_throughout_an_upgrade(start_sockd: Launcher) -> None:
    """A balancer's agent-check sees no MAINT in an upgrade: the adopted workers are told the state
    the new supervisor finds, and its first workers start with it."""
    daemon = start_sockd([listener("echo", "tcp", "echo", "asyncio"), listener("agent", "tcp", "agent", "selector")])
    agent = daemon.address("agent")
    eventually(lambda: said(agent) == b"up ready\n", "the agent up")
    answers: collections.Counter[bytes] = collections.Counter()
    done = threading.Event()

    def check() -> None:  # as HAProxy's agent-check, only much more often
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            answers[said(agent)] += 1

    checker = threading.Thread(target=check)
    checker.start()
    try:
        old = daemon.worker_pids("agent")
        mark = upgrade(daemon)
        new = daemon.worker_pid("agent", after=mark)
        daemon.wait_for(RETIRED_OR_EXITED, pid=old[0], after=mark)  # the new worker answers now
        before = answers.total()
        eventually(lambda: answers.total() > before + 50, "agent-checks after the upgrade")
    finally:
        done.set()
        checker.join(30)
    assert new not in old
    assert answers == {b"up ready\n": answers.total()}

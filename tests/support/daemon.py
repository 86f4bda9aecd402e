"""The real daemon as a subprocess (Daemon, Launcher, run_sockd), the configs it is started on,
and the external programs a test needs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from sockd.config import RELAYING_MODELS, ModelName

from support.waits import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
MODELS: list[str] = list(get_args(ModelName))  # every concurrency model, in the order sockd declares them
RELAY_MODELS: list[str] = list(RELAYING_MODELS)  # two sockets a client
# The asyncio model once more on the standard library's loop (uvloop is the default): a model
# name of the tests' own, which model_options turns into the config's.
STDLIB_LOOP = "asyncio-stdlib-loop"
# What an old worker logs once it accepts no more: its retirement taken (at debug level), or its exit.
RETIRED_OR_EXITED = ("retired: serving the open connections on", "worker exited")


def require(program: str) -> str:
    """The path of an external program a test needs: skipped on a developer machine without it,
    a failure in CI, where .ci/run installs everything (so nothing is silently not tested)."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed; .ci/run should have installed it")
        pytest.skip(f"{program} is not installed")
    return path


def model_options(model: str) -> tuple[str, dict[str, Any]]:
    """A model name of the tests' (STDLIB_LOOP too) as a listener's `concurrency` and options."""
    return ("asyncio", {"event_loop": "asyncio"}) if model == STDLIB_LOOP else (model, {})


def sockd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sockd", *args]


def run_sockd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command of sockd that exits by itself (--check, --schema, a failing start)."""
    return subprocess.run(sockd_command(*args), capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Daemon:
    """A running `sockd -c FILE`, with its stderr JSON log lines collected as they come."""

    process: subprocess.Popen[str]
    config_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    other_lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def start_reading(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    self.other_lines.append(line)
                self._changed.notify_all()

    def wait_for(
        self, event: str | tuple[str, ...], timeout: float = TIMEOUT, after: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first log event named `event` (or any of several names) from index `after` on whose
        fields match `fields`."""
        names = (event,) if isinstance(event, str) else event
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for entry in self.events[after:]:
                    if entry.get("event") in names and all(entry.get(k) == v for k, v in fields.items()):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._pending()):
                    raise AssertionError(f"no {event!r} {fields} in the log: {self.events}{self.other_lines}")
                self._changed.wait(min(remaining, 0.1))

    def _pending(self) -> bool:
        return self.process.stderr is not None and not self.process.stderr.closed

    def address(self, listener: str) -> str:
        return str(self.wait_for("listening", listener=listener)["address"])

    def worker_pid(self, listener: str, after: int = 0) -> int:
        return int(self.wait_for("worker started", listener=listener, after=after)["pid"])

    def worker_pids(self, listener: str) -> list[int]:
        """Every worker ever started for a listener, oldest first (its "worker started" lines)."""
        with self._changed:
            started = [e for e in self.events if e.get("event") == "worker started" and e.get("listener") == listener]
        return [int(e["pid"]) for e in started]

    def write_config(self, listeners: list[dict[str, Any]], **settings: Any) -> None:
        """Replace the config file it was started with (it takes it up at the next SIGHUP), as
        the README asks: a new file renamed over the old, so a HUP never finds it half written."""
        new = self.config_path.with_suffix(".new")
        new.write_text(config_text(listeners, **settings))
        new.replace(self.config_path)

    def reload(self, listeners: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
        """Write a new config, send SIGHUP and return the "reloaded" event (its plan), once every
        listener it restarted or moved is served by its new workers alone: each old worker has taken
        its retirement (it accepts no more), or has exited."""
        self.write_config(listeners, **settings)
        mark = len(self.events)
        self.process.send_signal(signal.SIGHUP)
        plan = self.wait_for("reloaded", after=mark, timeout=30)
        for name in [*plan.get("restarted", []), *plan.get("rebound", [])]:
            replaced = self.wait_for("replaced", listener=name, after=mark, timeout=30)
            for pid in replaced["retired"]:
                self.wait_for(RETIRED_OR_EXITED, pid=pid, after=mark, timeout=30)
        return plan

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)


@contextlib.contextmanager
def short_directory() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sk", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# What systemd hands a service: a test sets the ones it means, and none leaks in from outside.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def config_text(listeners: list[dict[str, Any]], **settings: Any) -> str:
    """A config file for tests: debug JSON logs, and metrics on a port of the kernel's choosing
    so that daemons of parallel tests never collide."""
    config = {"logging": {"level": "debug", "format": "json"}, "metrics": {"port": 0}, **settings}
    return yaml.safe_dump({**config, "listeners": listeners})


class Launcher:
    """Starts daemons on configs written into `directory`; `finish` stops the ones still running,
    which must exit 0, and fails on any traceback a daemon printed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Daemon] = []

    def __call__(
        self,
        listeners: list[dict[str, Any]],
        wait: bool = True,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        program: tuple[str, ...] = (),
        *,
        pass_fds: tuple[int, ...] = (),
        **settings: Any,
    ) -> Daemon:
        """Start `sockd -c` on these listeners and top-level settings, with `env` added to the
        environment and `prefix` before the command (e.g. systemd-socket-activate); wait until
        it is ready. `program` is another sockd than this environment's (an installed one);
        `pass_fds`, descriptors the command inherits (for `prefix` to hand on)."""
        path = self.directory / f"sockd-{len(self.started)}.yaml"
        path.write_text(config_text(listeners, **settings))
        environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        process = subprocess.Popen(
            [*prefix, *(program or sockd_command()), "-c", str(path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**environment, **(env or {})},
            start_new_session=True,  # its own process group, as a terminal would give it
            pass_fds=pass_fds,
        )
        daemon = Daemon(process, path)
        daemon.start_reading()
        self.started.append(daemon)
        if wait:
            daemon.wait_for("ready", timeout=30)
        return daemon

    def finish(self) -> None:
        """Stop every daemon it started, then check how each ended: a failure with one must not
        leave the others running."""
        codes = [daemon.stop() if daemon.process.poll() is None else 0 for daemon in self.started]
        for daemon, code in zip(self.started, codes, strict=True):
            assert code == 0, daemon.other_lines
            assert not any("Traceback" in line for line in daemon.other_lines), "".join(daemon.other_lines)


StartSockd = Launcher


def listener(
    name: str, protocol: str, handler: str, concurrency: str, where: str | Path = "127.0.0.1", **options: Any
) -> dict[str, Any]:
    """One listener's config: `where` is a host for tcp/udp (port 0) and a path for unix."""
    entry: dict[str, Any] = {"name": name, "protocol": protocol, "handler": handler, "concurrency": concurrency}
    entry.update({"path": str(where)} if protocol == "unix" else {"host": str(where), "port": 0})
    entry.update(options)
    return entry


# The models that serve many connections at once (iterative serves one: the rest wait in the
# backlog, unaccepted, so connection limits never see them).
CONCURRENT = [model for model in MODELS if model != "iterative"]


def options_for(model: str, **options: Any) -> dict[str, Any]:
    return {"threads": 16, **options} if model == "thread_pool" else options

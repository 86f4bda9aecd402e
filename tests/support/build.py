"""The clone's Makefile targets as tests run them (make), one build at a time (building): the
installs, wheels and packages all build sockd in the clone's build/. And the machine's own
/etc/sockd, one test at a time (machine_config)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.daemon import ROOT, require


def make(*args: str, env: dict[str, str] | None = None) -> None:
    """`make -C ROOT ARGS` in this environment, or in `env` alone; it must succeed."""
    result = subprocess.run(
        [require("make"), "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_directory(factory: pytest.TempPathFactory) -> Path:
    """A directory of this pytest run that all its xdist workers share (each has its own
    basetemp in it), and no other run does."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def building(factory: pytest.TempPathFactory) -> Iterator[None]:
    """Held while the clone builds sockd: two builds at once would share its build/."""
    with (run_directory(factory) / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def machine_config() -> Iterator[None]:
    """Held while a test writes this machine's /etc/sockd (tests run as root): the package's test
    installs its conffile there, another writes the file `sockd` reads without -c. A lock of the
    machine, not of the run, as no two runs on one machine may share that file either."""
    with (Path(tempfile.gettempdir()) / "sockd-tests-etc-sockd.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield

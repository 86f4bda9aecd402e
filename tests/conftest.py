"""The fixtures every test module may ask for; the helpers they build on are in support/."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import CA, Launcher, short_directory


def pytest_configure(config: pytest.Config) -> None:
    """Under `make compiled-test`, SOCKD_EXPECT_COMPILED names the modules mypyc built (as the
    paths given to mypyc): a run that imported any of them as Python would pass while testing
    nothing compiled, so it stops here instead."""
    for path in os.environ.get("SOCKD_EXPECT_COMPILED", "").split():
        name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        where = importlib.import_module(name).__file__ or ""
        if not where.endswith(".so"):
            raise pytest.UsageError(f"SOCKD_EXPECT_COMPILED: {name} is not the compiled build: {where}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory with a short path, for Unix sockets (see short_directory)."""
    with short_directory() as path:
        yield path


@pytest.fixture
def start_sockd(tmp_path: Path) -> Iterator[Launcher]:
    """Start the real daemon for one test (see Launcher)."""
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.finish()


@pytest.fixture(scope="module")
def start_module_sockd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Start the real daemon once for a whole test module (see Launcher)."""
    launcher = Launcher(tmp_path_factory.mktemp("sockd"))
    yield launcher
    launcher.finish()


@pytest.fixture(scope="session")
def tls_ca() -> CA:
    """A certificate authority for the TLS tests (see support.certs); it issues a fresh
    certificate each time it is asked."""
    return CA()

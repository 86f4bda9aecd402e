"""The fixtures every test module may ask for; the helpers they build on are in support/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockd import build

from support import CA, Launcher, short_directory


def pytest_configure(config: pytest.Config) -> None:
    """Under `make compiled-test` (SOCKD_EXPECT_COMPILED=1), a run that imported any of the hot
    modules as Python would pass while testing nothing compiled, so it stops here instead."""
    if os.environ.get("SOCKD_EXPECT_COMPILED") == "1" and not build.compiled():
        raise pytest.UsageError(f"SOCKD_EXPECT_COMPILED: this is not the compiled build: {build.describe()}")


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

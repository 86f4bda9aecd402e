"""The fixtures every test module may ask for; the helpers they build on are in support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Launcher, short_directory


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

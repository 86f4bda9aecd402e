"""`make deb`: the Debian package, checked by lintian, then installed on this machine with apt-get,
checked, served, upgraded with its config edited, removed and purged.

On this machine, not in a throwaway root: CI runs as root on a machine of its own, and a root
file system to install into (mmdebstrap from the mirror) would cost more than the whole test. So
the test refuses to start where a sockd is installed already, and purges its own at the end
whatever happened. One test, its steps in order: the package is the machine's, one at a time."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sockd

from support import (
    SYSTEMD_VARIABLES,
    Daemon,
    building,
    datagram,
    machine_config,
    make,
    request,
    require,
    run_directory,
    scrape,
)

CONFIG = Path("/etc/sockd/sockd.yaml")
COMMAND = Path("/usr/bin/sockd")
VIRTUALENV = Path("/opt/sockd")
UNITS = [Path("/lib/systemd/system/sockd.service"), Path("/lib/systemd/system/sockd.socket")]
# postinst enables sockd.service as Debian enables the daemons it installs (deb-systemd-helper:
# the link, made with or without a running systemd); a removal masks it, a purge forgets both.
ENABLED = Path("/etc/systemd/system/multi-user.target.wants/sockd.service")
MASKED = Path("/etc/systemd/system/sockd.service")
# An upgrade keeps the admin's edited conffile without asking: what the README tells an
# unattended upgrade to say (dpkg would ask only if the package's own copy changed too).
KEEP_CONFIG = ("-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")
INSTALLED = "install ok installed"


def step(what: str, started: float) -> None:
    """How long each step took, in the output of `pytest -s` (the build and install times)."""
    print(f"{what}: {time.monotonic() - started:.1f} s")


def apt_get(*args: str) -> None:
    """apt-get as an admin runs it unattended; another apt-get on the machine holds the lock for a while."""
    command = [require("apt-get"), "-o", "DPkg::Lock::Timeout=600", "-y", "-q", *args]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr


def status() -> str:
    """sockd's status and version as dpkg has them, "" when none is installed nor left configured."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status} ${Version}", "sockd"], capture_output=True, text=True, check=False
    )
    return "" if "not-installed" in result.stdout else result.stdout


def ours() -> list[Path]:
    """What the package puts on the machine outside /usr/share, and its enable state."""
    paths = [VIRTUALENV, CONFIG.parent, COMMAND, *UNITS, ENABLED, MASKED]
    return [path for path in paths if path.exists() or path.is_symlink()]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two builds of the package by `make deb`, the second one version higher (an upgrade): built
    once for the run, whichever xdist worker asks first (see run_directory)."""
    version = sockd.__version__
    directory = run_directory(tmp_path_factory) / "debian"
    built: list[Path] = []
    for deb_version in (version, f"{version}+1"):
        with building(tmp_path_factory):
            found = list(directory.glob(f"sockd_{deb_version}_*.deb"))
            if not found:
                started = time.monotonic()
                stage = f"DEB_ROOT={directory / 'root'}"
                make("deb", f"DEB_VERSION={deb_version}", f"DEB_DIR={directory}", stage)
                step(f"make deb {deb_version}", started)
                found = list(directory.glob(f"sockd_{deb_version}_*.deb"))
        (package,) = found
        built.append(package)
    return built[0], built[1]


@contextlib.contextmanager
def installable() -> Iterator[None]:
    """The machine without a sockd of its own, before and after: purged at the end. No other test
    writes its /etc/sockd meanwhile."""
    with machine_config():
        found = ours()
        if status() or found:
            pytest.fail(f"this machine has a sockd already, which the test will not replace: {status()} {found}")
        try:
            yield
        finally:
            if status():
                apt_get("purge", "sockd")


def check(expected: str) -> None:
    result = subprocess.run(
        [str(COMMAND), "--check", "-c", str(CONFIG)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", expected)


def serve() -> None:
    """The installed sockd on the installed config, as its unit starts it (there is no systemd here)."""
    environment = {name: value for name, value in os.environ.items() if name not in SYSTEMD_VARIABLES}
    process = subprocess.Popen(
        [str(COMMAND), "-c", str(CONFIG)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environment,
        start_new_session=True,
    )
    daemon = Daemon(process, CONFIG)
    daemon.start_reading()
    try:
        daemon.wait_for("ready", timeout=60)
        assert request(daemon.address("tcp-echo"), b"over tcp") == b"over tcp"
        assert request(daemon.address("uds-echo"), b"over unix") == b"over unix"
        assert datagram(daemon.address("udp-time"), b"now?").decode().startswith("20")  # ISO 8601
        assert "sockd_requests_total" in scrape(daemon)
        # What runs is the package's virtualenv.
        assert f"{VIRTUALENV}/lib/python3" in Path(f"/proc/{daemon.worker_pid('tcp-echo')}/maps").read_text()
    finally:
        assert daemon.stop() == 0, daemon.other_lines


def test_lintian_reports_nothing_but_the_overridden(packages: tuple[Path, Path]) -> None:
    # deploy/debian/lintian-overrides says why each override is accepted.
    started = time.monotonic()
    result = subprocess.run(
        [require("lintian"), "--fail-on", "error,warning", str(packages[0])],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    step("lintian", started)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_package_installs_serves_upgrades_keeping_the_config_and_purges(
    packages: tuple[Path, Path], sockdir: Path
) -> None:
    first, second = packages
    version = sockd.__version__
    with installable():
        started = time.monotonic()
        apt_get("install", str(first))
        step("apt-get install", started)
        assert status() == f"{INSTALLED} {version}"
        assert COMMAND.resolve() == VIRTUALENV / "bin" / "sockd"
        assert ENABLED.resolve() == UNITS[0].resolve()  # /lib may be a link to /usr/lib
        # Every file as packaged (DEBIAN/md5sums), postinst's bytecode beside them.
        verified = subprocess.run(["dpkg", "--verify", "sockd"], capture_output=True, text=True, check=False)
        assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")
        check(f"{CONFIG}: OK, 3 listeners\n")

        # The admin's edit: the host's ports and /run/sockd (the unit's) become the test's own.
        pristine = CONFIG.read_text()
        edits = {"port: 20007": "port: 0", "port: 20037": "port: 0", "port: 9464": "port: 0"}
        edits["/run/sockd/echo.sock"] = str(sockdir / "echo.sock")
        edited = pristine
        for old, new in edits.items():
            assert old in edited
            edited = edited.replace(old, new)
        CONFIG.write_text(edited)
        started = time.monotonic()
        serve()
        step("serve", started)

        started = time.monotonic()
        apt_get("install", *KEEP_CONFIG, str(second))
        step("apt-get install (the upgrade)", started)
        assert status() == f"{INSTALLED} {version}+1"
        assert CONFIG.read_text() == edited
        serve()

        started = time.monotonic()
        apt_get("remove", "sockd")
        step("apt-get remove", started)
        assert status().startswith("deinstall ok config-files")
        assert CONFIG.read_text() == edited  # a conffile stays until the purge
        assert ours() == [CONFIG.parent, ENABLED, MASKED]  # the admin's choice, masked
        assert MASKED.resolve() == Path(os.devnull)

        started = time.monotonic()
        apt_get("purge", "sockd")
        step("apt-get purge", started)
        assert status() == ""
        assert ours() == []

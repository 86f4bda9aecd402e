"""`make install`, `make uninstall`, the wheel, the lock and the wheelhouse: what a host gets from a
clone. Named after what it tests, the Makefile's install targets, as there is no sockd/install.py.

The staged install (`make install DESTDIR=... WHEELHOUSE=...`, from `make wheelhouse` with no package
index) takes a virtualenv and a pip install, so one is shared by the module's tests and by every
xdist worker of the run; installs and wheel builds take turns, as each builds in the clone's build/.
The install from the index, with the lock's hashes, is the one elsewhere below (and `make deb`'s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_systemd_units import analyze, value

import sockd
from sockd.build import HOT_MODULES

from support import ROOT, StartSockd, building, datagram, make, request, require, run_directory, scrape

PREFIX = "/opt/sockd"  # the Makefile's default, which the repository's unit names
BINDIR = "/usr/local/bin"
UNITDIR = "/etc/systemd/system"
CONFIG = "/etc/sockd/sockd.yaml"  # whatever PREFIX is: the unit's ConfigurationDirectory=
HOST_UNITS = Path("/usr/lib/systemd/system")
# pip with no package index: none named (PIP_NO_INDEX), the default one unreachable should pip
# look anyway, and neither this machine's pip configuration nor its PIP_ variables.
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_CONFIG_FILE": os.devnull}


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DESTDIR after `make install DESTDIR=...`. It holds the host's systemd units too, as a root
    file system would: `systemd-analyze verify --root=` needs sysinit.target and the like."""
    root = run_directory(tmp_path_factory) / "staged"
    done = root.with_suffix(".done")
    with building(tmp_path_factory):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            if HOST_UNITS.is_dir():  # else systemd-analyze is missing too, and its test skipped
                shutil.copytree(HOST_UNITS, root / HOST_UNITS.relative_to("/"), symlinks=True)
            wheelhouse = run_directory(tmp_path_factory) / "wheelhouse"
            shutil.rmtree(wheelhouse, ignore_errors=True)
            make("wheelhouse", f"WHEELHOUSE={wheelhouse}")
            environment = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
            make("install", f"DESTDIR={root}", f"WHEELHOUSE={wheelhouse}", env={**environment, **OFFLINE})
            done.touch()
    return root


def locked() -> dict[str, str]:
    """requirements.lock's pins, by canonical name."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def in_place(staged: Path) -> tuple[str, ...]:
    """A prefix for a command that runs it with the staged tree where it is installed for: in a
    mount namespace of its own (nothing changes for other processes), the staged PREFIX's parent
    and BINDIR are bind-mounted over the host's, and hidden where they were staged, so that
    nothing can run from DESTDIR."""
    mounts = [Path(PREFIX).parent, Path(BINDIR)]
    script = " && ".join(f'mount --bind "$0"{path} {path} && mount -t tmpfs none "$0"{path}' for path in mounts)
    return (require("unshare"), "--mount", "sh", "-c", f'{script} && exec "$@"', str(staged))


def installed_unit(staged: Path) -> Path:
    return staged / UNITDIR.lstrip("/") / "sockd.service"


# -- the staged tree


def test_staged_tree_names_no_destdir_path(staged: Path) -> None:
    installed = [staged / path.lstrip("/") for path in (PREFIX, BINDIR, UNITDIR, CONFIG)]
    found = subprocess.run(
        ["grep", "-rlF", str(staged), *map(str, installed)], capture_output=True, text=True, timeout=120, check=False
    )
    assert found.returncode == 1, f"files naming {staged}:\n{found.stdout}{found.stderr}"
    links = {path: os.readlink(path) for top in installed for path in [top, *top.rglob("*")] if path.is_symlink()}
    assert links, "no symbolic link installed"
    assert [path for path, target in links.items() if str(staged) in target] == []
    assert links[staged / BINDIR.lstrip("/") / "sockd"] == f"{PREFIX}/bin/sockd"
    shebang = (staged / PREFIX.lstrip("/") / "bin" / "sockd").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{PREFIX}/bin/python")


def test_systemd_analyze_verify_accepts_the_installed_units(staged: Path) -> None:
    # --root= resolves ExecStart='s program inside the staged tree: it must be an executable there.
    result = analyze("verify", "--man=no", f"--root={staged}", "sockd.socket", "sockd.service")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "sockd" in line] == []
    unit = installed_unit(staged)
    assert value(unit, "Service", "ExecStart").split() == [f"{PREFIX}/bin/sockd", "-c", CONFIG]
    assert value(unit, "Service", "ExecReload").split() == [f"{PREFIX}/bin/sockd", "reload", "$MAINPID"]


def test_installed_config_is_the_hosts_world_readable(staged: Path) -> None:
    config = staged / CONFIG.lstrip("/")
    assert config.read_text() == (ROOT / "config" / "host.yaml").read_text()
    assert config.stat().st_mode & 0o777 == 0o644  # the unit's dynamic user reads it


def test_staged_virtualenv_holds_the_locked_releases_and_sockd_alone(staged: Path) -> None:
    python = str(staged / PREFIX.lstrip("/") / "bin" / "python")
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, timeout=60, check=True
    )
    installed = {canonicalize_name(entry["name"]): entry["version"] for entry in json.loads(listed.stdout)}
    tools = {"pip", "setuptools"}  # the virtualenv's own, from venv
    assert {name: version for name, version in installed.items() if name not in tools} == {
        **locked(),
        "sockd": sockd.__version__,
    }
    # Every requirement of every installed distribution met: the lock is whole.
    checked = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    # pyproject.toml's ranges are the library's: the lock must pick inside them.
    pins = locked()
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock: make lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}: make lock"


# -- the installed sockd, run where it was installed for


def test_installed_sockd_checks_the_installed_config(staged: Path) -> None:
    program = value(installed_unit(staged), "Service", "ExecStart").split()[0]
    staged_config = str(staged / CONFIG.lstrip("/"))
    command = [*in_place(staged), program, "--check", "-c", staged_config]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{staged_config}: OK, 3 listeners\n"


def test_installed_sockd_is_the_compiled_build(staged: Path) -> None:
    # `make install` is `pip install .`, which compiles the hot path where it can, as here.
    program = value(installed_unit(staged), "Service", "ExecStart").split()[0]
    result = subprocess.run(
        [*in_place(staged), program, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout == f"sockd {sockd.__version__} (compiled with mypyc)\n", result.stderr


def test_installed_sockd_serves_the_installed_config(staged: Path, start_sockd: StartSockd, sockdir: Path) -> None:
    config = yaml.safe_load((staged / CONFIG.lstrip("/")).read_text())
    # Its ports and /run/sockd are the host's: the same listeners on free ports, in a directory of the test.
    listeners = [
        {**entry, "path": str(sockdir / Path(entry["path"]).name)}
        if entry["protocol"] == "unix"
        else {**entry, "port": 0}
        for entry in config.pop("listeners")
    ]
    config.pop("logging")  # the tests' JSON lines
    config["metrics"]["port"] = 0
    program = value(installed_unit(staged), "Service", "ExecStart").split()[0]
    daemon = start_sockd(listeners, prefix=in_place(staged), program=(program,), **config)

    assert request(daemon.address("tcp-echo"), b"over tcp") == b"over tcp"
    assert request(daemon.address("uds-echo"), b"over unix") == b"over unix"
    assert datagram(daemon.address("udp-time"), b"now?").decode().startswith("20")  # ISO 8601, this century
    assert "sockd_requests_total" in scrape(daemon)
    # What runs is the installed virtualenv, at PREFIX, not this one.
    worker = daemon.worker_pid("tcp-echo")
    maps = Path(f"/proc/{worker}/maps").read_text()
    assert f"{PREFIX}/lib/python3" in maps
    assert sys.prefix not in maps


# -- again, elsewhere, and away


def test_install_keeps_the_hosts_config_and_uninstall_the_rest(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    prefix = "/srv/sockd-elsewhere"
    own = tmp_path / CONFIG.lstrip("/")
    own.parent.mkdir(parents=True)
    own.write_text("# the host's own\n")
    with building(tmp_path_factory):
        make("install", f"DESTDIR={tmp_path}", f"PREFIX={prefix}")
    assert own.read_text() == "# the host's own\n"
    unit = tmp_path / UNITDIR.lstrip("/") / "sockd.service"
    assert value(unit, "Service", "ExecStart").split() == [f"{prefix}/bin/sockd", "-c", CONFIG]
    assert os.readlink(tmp_path / BINDIR.lstrip("/") / "sockd") == f"{prefix}/bin/sockd"
    assert (tmp_path / prefix.lstrip("/") / "bin" / "sockd").is_file()

    make("uninstall", f"DESTDIR={tmp_path}", f"PREFIX={prefix}")
    left = [path for path in tmp_path.rglob("*") if not path.is_dir() or path.is_symlink()]
    assert left == [own]
    assert not (tmp_path / prefix.lstrip("/")).exists()


# -- the wheel


def build_wheel(into: Path, factory: pytest.TempPathFactory, **environment: str) -> Path:
    """What `make wheel` runs, into a directory of the test's."""
    with building(factory):
        result = subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(into), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            env={**os.environ, **environment},
        )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = into.glob("sockd-*.whl")
    return wheel


def test_wheel_holds_the_daemon_its_command_and_its_dependencies(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    wheel = build_wheel(tmp_path, tmp_path_factory)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (info,) = {name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA")}
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sockd").rglob("*.py")}
    assert sources <= names
    assert "sockd = sockd.__main__:main" in entry_points.splitlines()
    requires = set(re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata, re.MULTILINE))
    assert {"pydantic", "structlog", "pyyaml", "prometheus-client", "uvloop"} <= {name.lower() for name in requires}
    # Here there are a compiler and Python's headers (.ci/run installs them): the hot path is
    # compiled, each module an extension beside its source.
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert {compiled_path(name, suffix) for name in HOT_MODULES} <= names, sorted(names)


def test_wheel_without_a_compiler_is_pure_python(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    wheel = build_wheel(tmp_path, tmp_path_factory, CC="/nonexistent/cc")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [name for name in archive.namelist() if name.endswith(".so")]


def compiled_path(module: str, suffix: str) -> str:
    path = Path(*module.split("."))
    package = ROOT / path / "__init__.py"
    return f"{path / '__init__' if package.exists() else path}{suffix}"

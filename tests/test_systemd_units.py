"""systemd/sockd.service and systemd/sockd.socket: systemd-analyze accepts them (offline: no systemd
needs to run), the sandbox scores as it should, and the settings sockd relies on are there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import ROOT, require

UNITS = ROOT / "systemd"
SERVICE = UNITS / "sockd.service"
SOCKET = UNITS / "sockd.socket"
INSTALLED = "/opt/sockd/bin/sockd"  # `make install` with its default PREFIX (test_install.py: another)
CONFIG = "/etc/sockd/sockd.yaml"
# `make run`'s, and the one `make install` puts at CONFIG for the unit.
EXAMPLES = [ROOT / "config" / "sockd.yaml", ROOT / "config" / "host.yaml"]
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0.0 (locked down) to 10.0 (unprotected)
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """Every (section, key, value) of a unit file, in order: keys such as ExecReload= repeat, which
    configparser cannot keep."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}: not a key=value line: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, section: str, key: str) -> list[str]:
    return [value for sect, k, value in parse_unit(path) if sect == section and k == key]


def value(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key}= should be set once, found {found}"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span such as `15s`, `1min 30s` or a bare number of seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


def venv_sockd() -> str:
    """The `sockd` console script of the environment running the tests."""
    path = shutil.which("sockd", path=str(Path(sys.executable).parent))
    assert path is not None, "the sockd console script is not installed next to this Python"
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    command = [require("systemd-analyze"), "--no-pager", *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=60, check=False)


# -- systemd-analyze


def test_verify_accepts_both_units(tmp_path: Path) -> None:
    # verify checks that ExecStart='s program exists: point the units at this environment's sockd.
    for unit in (SERVICE, SOCKET):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, venv_sockd()))
    result = analyze("verify", "--man=no", str(tmp_path / SOCKET.name), str(tmp_path / SERVICE.name))
    output = result.stdout + result.stderr
    # Unknown keys and bad values are warnings with exit 0; other units of the machine may warn too.
    ours = [line for line in output.splitlines() if "sockd" in line]
    assert result.returncode == 0, output
    assert ours == [], "\n".join(ours)


def test_security_exposure_is_low() -> None:
    result = analyze("security", "--offline=yes", str(SERVICE))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for sockd\.service: (\d+\.\d+)", output)
    assert match is not None, output
    exposure = float(match.group(1))
    failing = "\n".join(line for line in output.splitlines() if line.startswith("✗"))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}; what counts:\n{failing}"


# -- what sockd relies on


def test_service_is_notify_with_main_access() -> None:
    assert value(SERVICE, "Service", "Type") == "notify"  # not notify-reload: systemd 253+
    assert value(SERVICE, "Service", "NotifyAccess") == "main"
    assert seconds(value(SERVICE, "Service", "WatchdogSec")) > 0


def test_service_runs_the_installed_script_on_the_etc_config() -> None:
    assert value(SERVICE, "Service", "ExecStart").split() == [INSTALLED, "-c", CONFIG]


def test_reload_waits_for_the_outcome() -> None:
    # `sockd reload` sends SIGHUP and fails with the reason if the reload was refused or rolled
    # back (tests/test_reloads.py): a plain kill -HUP would succeed whatever followed.
    assert value(SERVICE, "Service", "ExecReload").split() == [INSTALLED, "reload", "$MAINPID"]


def test_restart_policy_spares_config_errors() -> None:
    assert value(SERVICE, "Service", "Restart") == "on-failure"
    assert "78" in value(SERVICE, "Service", "RestartPreventExitStatus").split()  # EX_CONFIG


def test_stop_gives_the_drain_time_to_the_supervisor() -> None:
    assert value(SERVICE, "Service", "KillMode") == "mixed"
    assert seconds(value(SERVICE, "Service", "TimeoutStopSec")) > DEFAULT_SHUTDOWN_TIMEOUT


def test_descriptors_are_not_left_at_systemds_default_of_1024() -> None:
    assert int(value(SERVICE, "Service", "LimitNOFILE")) >= 65536


def test_runtime_directory_and_identity() -> None:
    assert value(SERVICE, "Service", "RuntimeDirectory") == "sockd"  # /run/sockd for Unix sockets
    assert value(SERVICE, "Service", "ConfigurationDirectory") == "sockd"
    assert value(SERVICE, "Service", "DynamicUser") == "yes"


def test_only_capability_is_binding_low_ports() -> None:
    assert value(SERVICE, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert value(SERVICE, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    # In a user namespace the capability would not count for the host's ports.
    assert values(SERVICE, "Service", "PrivateUsers") in ([], ["no"])


def test_address_families_are_the_ones_sockd_serves() -> None:
    families = set(value(SERVICE, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_socket_is_named_after_a_listener_of_the_host_config() -> None:
    # make install puts config/host.yaml where the unit reads it (config/sockd.yaml is `make run`'s).
    assert value(SOCKET, "Socket", "Service") == SERVICE.name
    name = value(SOCKET, "Socket", "FileDescriptorName")
    listeners = yaml.safe_load(EXAMPLES[1].read_text())["listeners"]
    matching = [entry for entry in listeners if entry["name"] == name]
    assert matching, f"no listener named {name!r} in {EXAMPLES[1].name}"
    (entry,) = matching
    assert entry["protocol"] == "tcp"
    assert value(SOCKET, "Socket", "ListenStream") == f"{entry['host']}:{entry['port']}"


def test_host_config_ports_are_outside_the_kernels_client_port_range() -> None:
    """The kernel gives the ports of ip_local_port_range to client connections, whose TIME-WAITs
    would hold an installed sockd's ports (see README, Command line)."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    listeners = yaml.safe_load(EXAMPLES[1].read_text())["listeners"]
    ports = [entry["port"] for entry in listeners if entry["protocol"] in ("tcp", "udp")]
    assert ports
    assert [port for port in ports if low <= port <= high] == []
    socket_port = int(value(SOCKET, "Socket", "ListenStream").rpartition(":")[2])
    assert not low <= socket_port <= high


def test_hosts_unix_sockets_are_in_the_runtime_directory() -> None:
    # The rest of the file system is read-only to the unit, and its /tmp is its own: a socket
    # there would be out of every client's sight.
    runtime = Path("/run") / value(SERVICE, "Service", "RuntimeDirectory")
    listeners = yaml.safe_load(EXAMPLES[1].read_text())["listeners"]
    paths = [Path(entry["path"]) for entry in listeners if entry["protocol"] == "unix"]
    assert paths
    assert [path for path in paths if path.parent != runtime] == []


@pytest.mark.parametrize("unit", [SERVICE, SOCKET], ids=lambda path: path.name)
def test_unit_parses_by_lines(unit: Path) -> None:
    sections = {section for section, _, _ in parse_unit(unit)}
    assert sections == {"Unit", "Install", "Service" if unit.suffix == ".service" else "Socket"}


def test_the_file_descriptor_store_holds_every_socket_and_sockd_knows_its_size() -> None:
    # sockd stores nothing unless $FDSTORE says how many the store takes (systemd sets it itself
    # only from 254 on): one socket per listener of the host's config, and the metrics endpoint's.
    room = int(value(SERVICE, "Service", "FileDescriptorStoreMax"))
    listeners = yaml.safe_load(EXAMPLES[1].read_text())["listeners"]
    assert room >= len(listeners) + 1
    assert f"FDSTORE={room}" in values(SERVICE, "Service", "Environment")
    # A Unix listener's socket comes back from the store: its file, in /run/sockd, must stay.
    assert value(SERVICE, "Service", "RuntimeDirectoryPreserve") == "restart"

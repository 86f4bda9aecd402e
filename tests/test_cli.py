"""The `sockd` command line: --check, --schema, --version, usage errors, bind failures, signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import yaml

import sockd
from sockd import build

from support import (
    WAITING_FOR_CONNECTIONS,
    Daemon,
    StartSockd,
    check,
    config_text,
    eventually,
    held_port,
    listener,
    request,
    run_sockd,
    sockd_command,
    squatting,
    stderr_of,
    write_config,
    yaml_text,
)

EX_USAGE = 2  # argparse
EX_OSERR = 71
EX_CONFIG = 78

EXAMPLE = textwrap.dedent(
    """\
    metrics:
      enabled: true
      host: 127.0.0.1
      port: 9464
    logging:
      level: info
      format: json
    shutdown_timeout: 5
    listeners:
      - name: web
        protocol: tcp
        host: 127.0.0.1
        port: 8080
        handler: echo
        concurrency: thread_pool
        threads: 8
      - name: dns
        protocol: udp
        host: "::1"
        port: 5353
        handler: timestamp
        timestamp_format: iso8601
        concurrency: selector
        selector_backend: epoll
      - name: clock
        protocol: tcp
        host: 127.0.0.1
        port: 0
        handler: timestamp
        concurrency: asyncio
        event_loop: auto
      - name: local
        protocol: unix
        path: /run/sockd/local.sock
        mode: "0600"
        handler: echo
        concurrency: busy_poll
        delay: 0.1
    """
)


def one_listener(name: str, protocol: str, address: str) -> str:
    host, port = address.rsplit(":", 1)
    return textwrap.dedent(
        f"""\
        listeners:
          - name: {name}
            protocol: {protocol}
            host: {host}
            port: {port}
            handler: echo
            concurrency: threaded
        """
    )


# ---------------------------------------------------------------------------------------------
# --check


def test_check_prints_ok_and_the_listener_count(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: OK, 4 listeners\n"
    assert result.stderr == ""


AMPLIFIER = yaml_text(
    """
    listeners:
      - name: daytime
        protocol: udp
        host: 0.0.0.0
        port: 0
        handler: daytime
        concurrency: selector
    """
)
AMPLIFIER_WARNING = (
    "listeners[0].handler: warning: daytime over UDP on 0.0.0.0 answers with more bytes than it receives,"
    " to whatever source a datagram forges (a reflection amplifier): set datagram_rate"
)


@pytest.mark.parametrize("rate", [None, 10.0])
def test_check_warns_of_a_udp_amplifier_open_beyond_loopback_without_datagram_rate(
    tmp_path: Path, rate: float | None
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(AMPLIFIER + (f"    datagram_rate: {rate}\n" if rate else ""))
    result = run_sockd("--check", "-c", str(path))
    assert (result.returncode, result.stdout) == (0, f"{path}: OK, 1 listener\n")  # a warning, not a problem
    assert result.stderr == ("" if rate else f"{path}:6: {AMPLIFIER_WARNING}\n")


@pytest.mark.parametrize("rate", [None, 10.0])
def test_a_start_logs_the_warning_check_prints(start_sockd: StartSockd, rate: float | None) -> None:
    options = {"datagram_rate": rate} if rate else {}
    daemon = start_sockd([listener("daytime", "udp", "daytime", "selector", "0.0.0.0", **options)])
    warnings = [event for event in daemon.events if event["event"] == "config warning"]
    assert len(warnings) == (0 if rate else 1)
    for event in warnings:  # the line --check prints, placed in the file as the test wrote it
        assert event["warning"].startswith(f"{daemon.config_path}:")
        assert event["warning"].endswith(f": {AMPLIFIER_WARNING}")
    assert all(event["level"] == "warning" for event in warnings)


def test_check_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.yaml").write_text(EXAMPLE)
    monkeypatch.chdir(tmp_path)
    result = run_sockd("--check", "--config", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config.yaml: OK, 4 listeners\n"


def test_check_of_a_bad_file_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.yaml").write_text(EXAMPLE.replace("port: 8080", "port: 80800"))
    monkeypatch.chdir(tmp_path)
    result = run_sockd("--check", "-c", "./config.yaml")
    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    assert result.stderr == "./config.yaml:13: listeners[0].port: input should be less than or equal to 65535\n"


def test_a_bad_config_without_check_is_the_same_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE.replace("handler: echo", "handler: ping", 1))
    result = run_sockd("-c", str(path))
    assert result.returncode == EX_CONFIG
    expected = (
        "input should be 'echo', 'timestamp', 'discard', 'daytime', 'time', 'chargen', 'relay', 'agent' or 'exec'"
    )
    assert result.stderr == f"{path}:14: listeners[0].handler: {expected}\n"


# What the config tests (test_config_*.py) rely on when they read the
# problems of sockd.tls.material.load_config in-process: the command prints exactly those, one per line, on
# stderr, nothing on stdout, no traceback, and exits 78; or the OK line and exits 0.


def test_check_prints_every_problem_on_a_line_of_its_own_in_line_order(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 80
            handler: echo
            concurrency: threaded
          - name: dns
            protocol: udp
            port: 70000
            handler: reply
            concurrency: threaded
        logging:
          level: loud
        """,
    )
    result = run_sockd("--check", "-c", str(path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stdout == ""
    handlers = "'echo', 'timestamp', 'discard', 'daytime', 'time', 'chargen', 'relay', 'agent' or 'exec'"
    assert result.stderr.splitlines() == [
        f"{path}:8: listeners[1].host: required",
        f"{path}:10: listeners[1].port: input should be less than or equal to 65535",
        f"{path}:11: listeners[1].handler: input should be {handlers}",
        f"{path}:14: logging.level: input should be 'debug', 'info', 'warning' or 'error'",
    ]
    assert result.stderr == stderr_of(check(path)[1])


def test_check_of_a_file_that_is_not_yaml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "listeners:\n\t- name: web\n")
    result = run_sockd("--check", "-c", str(path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:2: invalid YAML: found character '\\t' that cannot start any token"
        " (while scanning for the next token); indent with spaces: YAML does not allow tabs"
    ]
    assert result.stderr == stderr_of(check(path)[1])


def test_check_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{path}: cannot read: no such file or directory"]


def test_check_of_a_valid_file_with_one_listener(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        listeners:
          - name: web
            protocol: tcp
            host: 127.0.0.1
            port: 8080
            handler: echo
            concurrency: threaded
        """,
    )
    result = run_sockd("--check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == f"{path}: OK, 1 listener\n"


# ---------------------------------------------------------------------------------------------
# --schema, --version, usage


def schema() -> dict[str, object]:
    result = run_sockd("--schema")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def test_schema_is_a_json_schema_of_the_config() -> None:
    document = schema()
    assert document["type"] == "object"
    properties = document["properties"]
    assert isinstance(properties, dict)
    assert set(properties) == {
        "metrics",
        "logging",
        "shutdown_timeout",
        "drain_delay",
        "reload_drain_timeout",
        "worker_timeout",
        "listeners",
    }
    assert document["required"] == ["listeners"]
    assert document["additionalProperties"] is False  # unknown keys are rejected
    listeners = properties["listeners"]
    assert listeners["type"] == "array"
    assert listeners["minItems"] == 1
    text = json.dumps(document)
    for word in ("thread_pool", "busy_poll", "epoll", "uvloop", "iso8601", "65535"):
        assert word in text


def test_schema_accepts_the_example_and_rejects_a_bad_port() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    document = schema()
    jsonschema.validators.validator_for(document).check_schema(document)
    example = yaml.safe_load(EXAMPLE)
    jsonschema.validate(example, document)
    example["listeners"][0]["port"] = 70000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(example, document)


def test_version() -> None:
    result = run_sockd("--version")
    assert result.returncode == 0
    # Which build runs: pure under `make test`, compiled under `make compiled-test` (conftest.py
    # checks that it is), and the command line says the same as this process sees.
    assert result.stdout == f"sockd {sockd.__version__} ({build.describe()})\n"
    assert build.describe() in {"pure Python", "compiled with mypyc"}


def test_an_unknown_option_is_a_usage_error() -> None:
    result = run_sockd("--frobnicate")
    assert result.returncode == EX_USAGE
    assert "unrecognized arguments: --frobnicate" in result.stderr


# ---------------------------------------------------------------------------------------------
# Bind failures: exit 71, one line naming the listener, the address and the reason


def _client_port_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_address_in_use(tmp_path: Path, protocol: str) -> None:
    # squatting's port is the kernel's pick for a client: inside ip_local_port_range, so the
    # error says a client connection may hold it (here a server does; sockd cannot tell which).
    path = tmp_path / "config.yaml"
    with squatting(protocol) as address:
        path.write_text(one_listener("web", protocol, address))
        result = run_sockd("-c", str(path))
    port = int(address.rsplit(":", 1)[1])
    low, high = _client_port_range()
    assert result.returncode == EX_OSERR, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"sockd: cannot bind listener 'web' to {protocol} {address}: address already in use;"
        f" port {port} is in net.ipv4.ip_local_port_range ({low}-{high}), where the kernel picks the ports of"
        " client connections: one may hold it; pick a port outside the range, or reserve it"
        f" (sysctl net.ipv4.ip_local_reserved_ports={port})"
    ]


def test_address_in_use_outside_the_client_port_range_gives_no_hint(tmp_path: Path) -> None:
    low, _ = _client_port_range()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        for port in range(low - 1, max(low - 200, 1024), -1):  # the first free port below the range
            with contextlib.suppress(OSError):
                server.bind(("127.0.0.1", port))
                break
        else:
            pytest.skip(f"no free port in the 200 below {low}")
        server.listen()
        path = tmp_path / "config.yaml"
        path.write_text(one_listener("web", "tcp", f"127.0.0.1:{port}"))
        result = run_sockd("-c", str(path))
    assert result.returncode == EX_OSERR, result.stderr
    assert result.stderr.splitlines() == [
        f"sockd: cannot bind listener 'web' to tcp 127.0.0.1:{port}: address already in use"
    ]


def test_address_in_use_after_another_listener_bound(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with squatting("udp") as address:
        host, port = address.rsplit(":", 1)
        path.write_text(
            yaml.safe_dump(
                {
                    "listeners": [
                        listener("first", "tcp", "echo", "asyncio"),
                        listener("second", "udp", "echo", "selector", host, port=int(port)),
                    ]
                }
            )
        )
        result = run_sockd("-c", str(path))
    assert result.returncode == EX_OSERR, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"sockd: cannot bind listener 'second' to udp {address}: address already in use;")


def test_unix_path_that_is_not_a_socket(tmp_path: Path, sockdir: Path) -> None:
    taken = sockdir / "taken"
    taken.write_text("a file somebody cares about")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"listeners": [listener("local", "unix", "echo", "threaded", taken)]}))
    result = run_sockd("-c", str(path))
    assert result.returncode == EX_OSERR, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"sockd: cannot bind listener 'local' to unix {taken}: ")
    assert "not a socket" in line
    assert taken.read_text() == "a file somebody cares about"


# ---------------------------------------------------------------------------------------------
# Descriptors: what the supervisor needs is had before anything serves, or sockd says why


@pytest.mark.parametrize(("listeners", "limit"), [(40, 64), (1, 12)])
def test_a_descriptor_limit_too_low_for_the_listeners_is_one_line_and_exit_71(
    tmp_path: Path, listeners: int, limit: int
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config_text([listener(f"l{i}", "tcp", "echo", "asyncio") for i in range(listeners)]))
    result = subprocess.run(
        ["prlimit", f"--nofile={limit}", *sockd_command("-c", str(path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == EX_OSERR, result.stderr
    [line] = result.stderr.splitlines()
    plural = "s" if listeners > 1 else ""
    assert line.startswith(f"sockd: the descriptor limit ({limit}) is too low for {listeners} listener{plural}: ")
    assert line.endswith("; raise LimitNOFILE= (or ulimit -n)")


def test_a_soft_descriptor_limit_below_what_the_listeners_need_is_raised(start_sockd: StartSockd) -> None:
    listeners = [listener(f"l{i}", "tcp", "echo", "asyncio") for i in range(40)]
    daemon = start_sockd(listeners, prefix=("prlimit", "--nofile=64:4096", "--"))
    raised = daemon.wait_for("raised the descriptor limit")
    assert raised["was"] == 64
    assert raised["soft"] > 40 * 3  # a socket and two channels (this generation and the next) each
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(raised["soft"]), "4096"]
    for name in ("l0", "l39"):
        assert request(daemon.address(name), name.encode()) == name.encode()


def test_a_python_that_cannot_be_executed_is_one_line_and_exit_71(tmp_path: Path) -> None:
    """sockd run by an interpreter that is gone by the time the fork server starts (a virtualenv
    removed under it): a port held by a connection holds sockd in its start meanwhile."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.symlink_to(os.path.realpath(sys.executable))
    (venv / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir(parents=True)
    (site / "tests.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    path = tmp_path / "config.yaml"
    command = [str(python), *sockd_command("-c", str(path))[1:]]
    with held_port() as port:
        path.write_text(config_text([listener("echo", "tcp", "echo", "asyncio", port=port)]))
        process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        daemon = Daemon(process, path)
        daemon.start_reading()
        try:
            daemon.wait_for(WAITING_FOR_CONNECTIONS)
            python.unlink()
        except BaseException:
            process.kill()
            raise
    try:
        process.wait(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == EX_OSERR, daemon.other_lines
    eventually(lambda: bool(daemon.other_lines), "the error line")
    assert daemon.other_lines == [f"sockd: the fork server cannot be started: {python}: no such file or directory\n"]
    assert not any(event.get("level") == "error" or "error" in event for event in daemon.events), daemon.events


def test_host_that_cannot_be_resolved(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(one_listener("web", "tcp", "no-such-host.invalid:0"))
    result = run_sockd("-c", str(path))
    assert result.returncode == EX_OSERR, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    # The resolver's own words vary ("Name or service not known", "Temporary failure ..."): not pinned.
    prefix = "sockd: cannot bind listener 'web' to tcp no-such-host.invalid:0: cannot resolve 'no-such-host.invalid': "
    assert line.startswith(prefix)
    assert len(line) > len(prefix)


# ---------------------------------------------------------------------------------------------
# Signals


def test_sigint_stops_the_daemon_with_exit_0(start_sockd: StartSockd) -> None:
    daemon = start_sockd([listener("web", "tcp", "echo", "threaded")])
    assert request(daemon.address("web"), b"hello") == b"hello"
    assert daemon.stop(signal.SIGINT) == 0
    assert not any("Traceback" in line for line in daemon.other_lines), daemon.other_lines


def test_sigterm_stops_the_daemon_with_exit_0(start_sockd: StartSockd) -> None:
    daemon = start_sockd([listener("web", "udp", "echo", "selector")])
    daemon.address("web")
    assert daemon.stop(signal.SIGTERM) == 0

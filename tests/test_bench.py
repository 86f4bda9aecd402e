"""`sockd bench`, run as a user runs it (`python -m sockd bench`) against a real sockd, the
footprint benchmark (`python -m sockd_bench.footprint`), and the suite's compare.py. Only sanity:
numbers that add up, never timings."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest

from sockd.config import ModelName
from sockd_bench import suite

from support import ROOT, Daemon, StartSockd, listener, require, run_sockd, short_directory, sockd_command

EX_USAGE = 2  # argparse
SHORT = ("--duration", "1", "--processes", "2")  # every run is brief


@pytest.fixture(scope="module")
def daemon(start_module_sockd: StartSockd) -> Iterator[Daemon]:
    """One sockd for the module: echo over each protocol, and the seed's timestamp server."""
    with short_directory() as directory:
        running = start_module_sockd(
            [
                listener("tcp", "tcp", "echo", "asyncio"),
                listener("tcp6", "tcp", "echo", "selector", "::1"),
                listener("udp", "udp", "echo", "asyncio"),
                listener("unix", "unix", "echo", "selector", directory / "echo.sock"),
                listener("time", "tcp", "timestamp", "threaded"),
                listener("iterative", "tcp", "echo", "iterative"),
            ]
        )
        yield running
        assert running.stop() == 0  # before its Unix socket's directory goes


def target(daemon: Daemon, name: str) -> str:
    address = daemon.address(name)
    protocol = "unix" if address.startswith("/") else "udp" if name == "udp" else "tcp"
    return f"{protocol}://{address}"


def bench_json(*args: str, timeout: float = 60) -> dict[str, Any]:
    result = run_sockd("bench", *args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def assert_sane(report: dict[str, Any]) -> None:
    assert report["requests"] > 0
    assert report["errors"] == 0
    assert report["requests_per_second"] > 0
    latency = report["latency_us"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"]


@pytest.mark.parametrize("name", ["tcp", "tcp6", "udp", "unix"])
def test_echo(daemon: Daemon, name: str) -> None:
    url = target(daemon, name)
    report = bench_json(url, *SHORT, "--connections", "3", "--size", "100")
    assert_sane(report)
    assert report["target"] == url
    assert report["mode"] == "echo"
    assert (report["connections"], report["size"], report["processes"]) == (3, 100, 2)
    assert report["duration"] > 0


def test_a_reply_larger_than_a_read(daemon: Daemon) -> None:
    report = bench_json(target(daemon, "tcp"), *SHORT, "--connections", "2", "--size", "300000")
    assert_sane(report)


def test_connect_mode_against_the_timestamp_server(daemon: Daemon) -> None:
    report = bench_json(target(daemon, "time"), *SHORT, "--connections", "3", "--mode", "connect")
    assert_sane(report)
    assert report["mode"] == "connect"


def test_the_human_table(daemon: Daemon) -> None:
    result = run_sockd("bench", target(daemon, "tcp"), *SHORT, "--connections", "2")
    assert result.returncode == 0, result.stderr
    for word in ("requests/s", "p50", "p99", "p99.9", "errors", "connections", "processes"):
        assert word in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)
    assert "\r" not in result.stderr  # no progress line where stderr is not a terminal


# 50 connections to a server that serves one at a time: one is answered, 49 wait all run long.
# One client process: the answered connection then closes only when the run is over (with two,
# the first to finish would let the server reach a connection of the other in its last moments).
QUEUED = ("--connections", "50", "--processes", "1")


def test_connections_an_iterative_server_never_answers(daemon: Daemon) -> None:
    result = run_sockd("bench", target(daemon, "iterative"), *QUEUED, "--duration", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] > 0
    assert (report["errors"], report["unanswered"]) == (0, 49)
    assert "sockd bench: 49 of 50 connections never got an answer" in result.stderr


def test_the_progress_line_and_the_table_count_the_same(daemon: Daemon) -> None:
    controller, terminal = pty.openpty()
    command = sockd_command("bench", target(daemon, "iterative"), *QUEUED, "--duration", "2")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the command has exited and closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
        stdout, _ = process.communicate(timeout=60)
    finally:
        os.close(controller)
    assert process.returncode == 0
    lines = re.findall(r"([\d,]+) requests +[\d,]+ req/s +([\d,]+) unanswered", shown.decode())
    assert len(lines) >= 2, shown  # a live one during the run, and the totals at the end
    table = dict(line.split(None, 1) for line in stdout.splitlines())
    assert table["unanswered"] == "49 of 50 connections"
    requests, unanswered = lines[-1]
    assert (requests, unanswered) == (table["requests"], "49")


def test_a_closed_port_fails_every_request() -> None:
    # Bound but not listening: the port is refused, and nobody else can take it meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        result = run_sockd("bench", url, *SHORT, "--connections", "2", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["requests"] == 0
    assert report["errors"] > 0
    assert report["latency_us"]["p50"] is None
    assert result.stderr.splitlines() == [
        f"sockd bench: no request succeeded: {report['errors']} errors (connection refused: {report['errors']})"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("udp://127.0.0.1:9", "--mode", "connect"), "--mode connect needs a stream"),
        ((), "a target is required"),
        (("tcp://192.0.2.1:80",), "is not a loopback address"),
        (("tcp://127.0.0.1",), "a target is tcp://HOST:PORT"),
        (("unix://relative.sock",), "an absolute path"),
        (("udp://127.0.0.1:9", "--size", "70000"), "at most 65507 bytes over UDP"),
        (("tcp://127.0.0.1:9", "--delay", "1"), "--delay: only with --models"),
        (("--models", "tcp://127.0.0.1:9"), "give no target"),
        (("--models", "--mode", "connect"), "takes the mode from --handler"),
        (("tcp://127.0.0.1:9", "--connections", "0"), "must be from 1"),
        (("tcp://127.0.0.1:9", "--duration", "nan"), "must be above 0"),
    ],
)
def test_usage_errors(args: tuple[str, ...], message: str) -> None:
    result = run_sockd("bench", *args)
    assert result.returncode == EX_USAGE
    assert result.stdout == ""
    assert result.stderr.startswith("usage: sockd bench ")
    assert message in result.stderr.splitlines()[-1]


def test_models_side_by_side() -> None:
    """Six daemons, one after the other: one test, kept short."""
    result = run_sockd("bench", "--models", "--duration", "0.5", "--connections", "4", "--json", timeout=240)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    reports = json.loads(result.stdout)
    assert [report["model"] for report in reports] == list(get_args(ModelName))
    for report in reports:
        assert report["requests"] > 0, report
        assert report["errors"] == 0, report
        assert report["mode"] == "echo"
        assert report["target"].startswith("tcp://127.0.0.1:")


def test_footprint_of_a_small_sockd() -> None:
    """Each section on its smallest sockd: 6 listeners (one model), 2 listeners, a few connections."""
    small = ["--models", "asyncio", "--requests", "5", "--listeners", "2", "--runs", "1", "--idle", "0,20,50"]
    result = subprocess.run(
        [sys.executable, "-P", "-m", "sockd_bench.footprint", *small],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    *table, last = result.stdout.splitlines()
    assert "PSS/process" in "\n".join(table)
    report = json.loads(last)
    matrix, startup, idle = report["matrix"], report["startup"], report["idle"]
    # A worker per listener, the supervisor and its fork server.
    assert (matrix["listeners"], matrix["processes"]) == (6, 8)
    assert 0 < matrix["supervisor_pss_mib"] < matrix["pss_mib"] <= matrix["rss_mib"]
    assert 0 < matrix["pss_anon_mib"] <= matrix["pss_mib"]
    assert matrix["ready_s"] > 0
    assert matrix["cpu_s_to_ready"] > 0
    assert (startup["processes"], len(startup["ready_s"]), len(startup["pss_mib"])) == (4, 1, 1)
    assert startup["ready_s_median"] == startup["ready_s"][0] > 0
    assert idle["connections"] == [0, 20, 50]
    assert all(size > 0 for size in idle["rss_bytes"] + idle["pss_bytes"])


def test_healthz_probes_sockd_idle_and_under_the_echo_load() -> None:
    """The healthz workload's one short run: a row per phase, each with probes all answered 200."""
    require("gcc")
    result = subprocess.run(
        [sys.executable, "-P", "-m", "sockd_bench.healthz", "--runs", "1", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line.split()[2:] for line in result.stdout.splitlines() if line.startswith("1 ")}
    assert list(rows) == ["idle", "loaded"], result.stdout
    for probes, not_200, *_ in rows.values():
        assert int(probes) > 0, result.stdout
        assert not_200 == "0", result.stdout
    assert "req/s, CPUs" in " ".join(rows["loaded"]), result.stdout


@pytest.mark.parametrize(("load", "server"), [("echo", "c_epoll_echo"), ("udp", "c_udp_echo")])
def test_percost_counts_the_cpu_of_the_c_echo_server_per_request(load: str, server: str) -> None:
    """percost's cpu mode, one second against bench's C echo server (over TCP, or over UDP with
    udp-echo's load): the requests it drove, and a CPU time per request that is positive and
    below a millisecond (it divided by them)."""
    require("gcc")
    command = str(ROOT / "build" / "bench" / server)  # compare.py builds it with the loads
    percost = [sys.executable, "-P", "-m", "sockd_bench.percost", "--load", load, "--mode", "cpu", "--seconds", "1"]
    result = subprocess.run(
        [*percost, "--", command, "{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = re.fullmatch(
        r"cpu: (\d+) requests, per request: user \S+ us, system \S+ us, on CPU (\S+) us\n", result.stdout
    )
    assert found, result.stdout
    assert int(found[1]) > 0
    assert 0 < float(found[2]) < 1000


def compare(mode: str, servers: list[str]) -> dict[str, list[str]]:
    """One short round of compare.py on `servers`: each server's row, by name, after the header
    has been checked; every server must have answered, without an error."""
    command = [sys.executable, str(suite.COMPARE), mode, "--rounds", "1", "--seconds", "1", *servers]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    header, columns, *rows = result.stdout.splitlines()
    assert header.startswith(f"{mode}: ")
    assert header.endswith(f"seconds=1.0 rounds=1 reference={servers[0].partition('=')[0]}")
    assert columns.split() == ["server", "rps", "ratio", "cpu_us/req", "cpu_ratio", "p50_us", "p99_us", "errors"]
    for row in rows:
        assert not row.endswith("did not start"), result.stdout
    measured = {row.split()[0]: row.split()[1:] for row in rows}
    for name, (rps, *_, errors) in measured.items():
        assert float(rps) > 0, name
        assert errors == "0", name
    return measured


def test_compare_builds_its_peers_and_measures_sockd() -> None:
    """The suite's yardstick from the checkout alone: compare.py compiles the C echo server and the
    load generator into the git-ignored build/bench/, then one short round of each server."""
    require("gcc")
    assert suite.COMPARE.is_relative_to(ROOT)  # nothing from outside the repository
    measured = compare("tcp-echo", ["c", f"sockd-asyncio={suite.sockd(build='pure')}"])
    assert (ROOT / "build" / "bench" / "c_epoll_echo").exists()
    assert list(measured) == ["c", "sockd-asyncio"]


def test_compare_over_tls() -> None:
    """The tls-* modes: compare.py builds tlsload against OpenSSL and makes the run's certificate;
    stunnel (its config in memory) relays to the C echo server; the bare uvloop TLS peer; sockd
    serves that certificate."""
    require("gcc")
    require("openssl")
    require("stunnel")
    if not Path("/usr/include/openssl/ssl.h").exists() and not os.environ.get("CI"):
        pytest.skip("OpenSSL's headers (libssl-dev) are not installed: compare.py skips the tls-* modes")
    measured = compare(
        "tls-echo",
        [
            *suite.tls_relays("stunnel"),
            "uvloop-tls",
            *suite.models("tcp", "echo", ["asyncio"], *suite.TLS, build="pure"),
        ],
    )
    assert list(measured) == ["stunnel", "uvloop-tls", "sockd-asyncio"]


def test_compare_programs_per_connection() -> None:
    """The exec workload: `head -c 64` per connection under xinetd (its config removed once it
    listens), systemd-socket-activate, socat and sockd's exec handler, each answering the
    timestamp load's 64 bytes."""
    require("gcc")
    for program in suite.INETDS:
        require(suite.PROGRAMS[program])
    options = suite.WORKLOADS["exec"][0]
    assert options[0] == "timestamp"
    before = set(Path(tempfile.gettempdir()).glob("sockd-bench-xinetd-*"))
    measured = compare("timestamp", suite.servers_of("exec", ("pure",)))
    assert list(measured) == ["xinetd", "systemd-socket-activate", "socat-exec", "sockd-exec-pure"]
    assert set(Path(tempfile.gettempdir()).glob("sockd-bench-xinetd-*")) <= before


def names(servers: list[str]) -> list[str]:
    return [server.partition("=")[0] for server in servers]


def test_each_row_of_the_issue_has_its_peer_and_both_builds() -> None:
    """Every row of issue 26's table runs in the same compare.py run as its peer; a compiled sockd
    row has its pure twin beside it, and no sockd row runs a build it does not name."""
    for row in suite.ROWS:
        both = names(suite.servers_of(row.workload, ("compiled", "pure")))
        assert {row.server, row.peer} <= set(both), row
        if row.pure:
            assert both[both.index(row.server) + 1] == f"{row.server}-pure", row
    tcp = suite.servers_of("tcp-echo", ("compiled", "pure"))
    assert "sockd-asyncio-no-metrics-pure" not in names(tcp)  # only the rows the issue names
    for server in tcp:
        name, _, command = server.partition("=")
        if name.startswith("sockd-"):
            assert ("--build pure" in command) == name.endswith("-pure"), server
            assert ("--build compiled" in command) != name.endswith("-pure"), server
    assert not any(name.endswith("-pure") for name in names(suite.servers_of("tcp-echo", ("compiled",))))
    pure = suite.servers_of("tcp-echo", ("pure",))
    assert not any("--build compiled" in server for server in pure)
    assert "sockd-selector-pure" in names(pure)
    relay = names(suite.servers_of("relay", ("compiled", "pure")))
    assert relay[:3] == ["haproxy-relay", "haproxy-relay-splice", "c"]  # HAProxy is the reference


def test_against_peers_pairs_rounds_per_row() -> None:
    def rounds(*rps: float) -> list[dict[str, float]]:
        return [{"rps": value, "cpu_us": 1e6 / value} for value in rps]

    measured: dict[str, dict[str, Any]] = {
        "relay": {
            "unit": "rps",
            "rounds": {
                "haproxy-relay": rounds(100, 200, 300),
                "sockd-relay-asyncio": rounds(110, 240, 330),
                "sockd-relay-asyncio-pure": rounds(90, 160, 270),
            },
        }
    }
    lines = suite.against_peers(measured).splitlines()
    assert len(lines) == 3  # the caption, the header and the one row of the relay workload
    assert lines[2].split() == ["relay", "sockd-relay-asyncio", "haproxy-relay", "1.10", "1.10", "0.90", "0.90"]
    del measured["relay"]["rounds"]["sockd-relay-asyncio"]
    assert suite.against_peers(measured).splitlines()[2].split()[3:5] == ["-", "-"]
    # Metrics on vs off compares compiled with compiled: sockd-asyncio-pure is the uvloop row's.
    tcp = {"sockd-asyncio-no-metrics": rounds(100), "sockd-asyncio": rounds(95), "sockd-asyncio-pure": rounds(90)}
    lines = suite.against_peers({"tcp-echo": {"unit": "rps", "rounds": tcp}}).splitlines()
    metrics = next(line.split() for line in lines if "sockd-asyncio-no-metrics" in line)
    assert metrics[3:] == ["0.95", "0.95", "-", "-"]


def test_a_compiled_row_that_would_run_pure_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build/mypyc whose sockd is pure Python (no compiler, or a stale copy) is refused, loudly."""
    from sockd_bench import serve  # noqa: PLC0415 (only this test calls it in-process)

    (tmp_path / ".built").touch()
    (tmp_path / "sockd").symlink_to(ROOT / "sockd")
    monkeypatch.setattr(serve, "MYPYC_BUILD", tmp_path)
    with pytest.raises(SystemExit, match="the compiled build was asked for, but sockd runs: pure Python"):
        serve.build_environment("compiled")
    monkeypatch.setattr(serve, "MYPYC_BUILD", tmp_path / "absent")
    with pytest.raises(SystemExit, match="run `make compiled`"):
        serve.build_environment("compiled")
    assert "PYTHONPATH" not in serve.build_environment("pure")


def test_the_relay_rows_against_haproxy() -> None:
    """The relay workload in one short round, pure build: HAProxy with and without splice, the
    direct connection, socat and sockd's relays, then the row set against HAProxy."""
    require("gcc")
    require("haproxy")
    require("socat")
    command = [sys.executable, "-P", "-m", "sockd_bench.suite", "--rounds", "1", "--seconds", "1", "--builds", "pure"]
    result = subprocess.run([*command, "relay"], capture_output=True, text=True, timeout=180, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index("== relay") + 3 :]}
    expected = ["haproxy-relay", "haproxy-relay-splice", "c", "socat-relay", "sockd-relay-asyncio-pure"]
    assert list(rows)[:5] == expected, result.stdout
    for name in expected:
        assert float(rows[name][0]) > 0, result.stdout
    ours = next(line.split() for line in lines if line.startswith("relay "))
    assert ours[:5] == ["relay", "sockd-relay-asyncio", "haproxy-relay", "-", "-"], result.stdout
    assert float(ours[5]) > 0, result.stdout

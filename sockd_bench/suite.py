"""`make bench`: the performance tables of the project, sockd's models beside the bare peers.

Each workload is one run of bench/compare.py (interleaved rounds, server on CPU 0,
load on CPU 1), whose first server is the reference of the ratios it prints; `footprint` is
footprint.py instead (memory and start-up, sockd alone, its startup section run --rounds times),
and `healthz` healthz.py (how long /healthz takes to answer while a tcp-echo load saturates every
core, --rounds runs).
sockd runs with metrics enabled, as in production. This is not part of `make test`: it takes
minutes and its numbers belong to the machine it ran on.

Every sockd row runs the compiled build (`make compiled`'s build/mypyc, which `make bench` makes
first; see serve.py's --build); the rows of issue 26's table (ROWS) run the pure build too, beside
it, as `NAME-pure`. `--builds compiled` leaves the pure rows out; `--builds pure` runs every sockd
row in the pure build alone (where nothing compiles). The run stops at once if the compiled build
is not compiled. After the workloads, the table "against its peer" sets each of ROWS against the
peer it names (not the run's first server), compiled and pure side by side: the median over the
rounds of the row's requests/s over the peer's in the same round (in `idle`, of the bytes per
idle connection: lower is better), and of the peer's CPU per request over the row's.

The plain relay workloads put HAProxy (one thread, TCP mode, `nosplice`; and again with splice)
first, as their reference, then a direct connection to the C echo server (`c`), socat and sockd.

The tls-* workloads measure TLS 1.3 (compare.py's tlsload, a throwaway P-256 certificate per run)
against stunnel 5 and socat `OPENSSL-LISTEN` in front of the C echo server (the setup a user has
without sockd's TLS), a bare uvloop TLS echo server, and, for the relay, HAProxy terminating TLS.
The C echo server behind a TLS relay runs on the relay's CPU 0 and counts in its CPU, so that a
relay and its service compare with a server that echoes over TLS itself (the plain relay
workloads give a relay CPU 0 to itself instead). A peer whose program is missing (stunnel,
haproxy, socat) is skipped with a note.

The exec workload runs `/usr/bin/head -c 64` per connection (the timestamp load sends 64 bytes and
reads to EOF, 20 connections at a time): sockd's `exec` handler against xinetd (its limits lifted),
`systemd-socket-activate --accept --inetd` and socat `EXEC:` (see inetd.py), xinetd the reference.
CPU per connection counts the `head` processes too, in every row alike (their times reach the
server's cutime/cstime as it reaps them; see inetd.py).

    .venv/bin/python -m sockd_bench.suite [--rounds 3] [--seconds 3] [--builds compiled,pure] [WORKLOAD ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, get_args

from sockd_bench.inetd import HEAD
from sockd_bench.serve import Build, build_environment

ROOT = Path(__file__).resolve().parents[1]  # the checkout
COMPARE = ROOT / "bench" / "compare.py"  # which builds its C peers and load generators itself
PYTHON = shlex.quote(sys.executable)
SERVE = f"{PYTHON} -P -m sockd_bench.serve"


def sockd(*options: str, where: str = "{port}", build: Build = "compiled") -> str:
    return f"{SERVE} {where} --build {build} {' '.join(options)}"


def models(protocol: str, handler: str, names: list[str], *options: str, build: Build = "compiled") -> list[str]:
    """sockd under each model (thread_pool sized for the load's 50 connections)."""
    servers = []
    for name in names:
        extra = ["--option", "threads=50"] if name == "thread_pool" else []
        command = sockd(
            "--protocol", protocol, "--handler", handler, "--concurrency", name, *extra, *options, build=build
        )
        servers.append(f"sockd-{name}={command}")
    return servers


def inetds() -> list[str]:
    """What runs a program per connection without sockd (see inetd.py), then sockd's exec handler."""
    inetd = f"{PYTHON} -P -m sockd_bench.inetd {{port}}"
    peers = [f"{name}={inetd} {kind}" for name, kind in INETDS.items()]
    return [*peers, f"sockd-exec={sockd('--exec', shlex.quote(shlex.join(HEAD)))}"]


def relays() -> list[str]:
    """HAProxy (the reference: `nosplice`, then with splice), a direct connection to the C echo
    server, socat and sockd's relay, each relay in front of that echo server (see relay.py). The
    relay has the server's CPU to itself; the echo server runs beside the load generator, as the
    separate service an upstream is."""
    relay = f"{PYTHON} -P -m sockd_bench.relay {{port}} {{build}}"
    kinds = [
        ("haproxy-relay", "haproxy"),
        ("haproxy-relay-splice", "haproxy --splice"),
        ("c", ""),
        ("socat-relay", "socat"),
        ("sockd-relay-asyncio", "asyncio --build compiled"),
        ("sockd-relay-selector", "selector --build compiled"),
    ]
    return [f"{name}={relay} {kind} --upstream-cpus 1" if kind else name for name, kind in kinds]


def tls_relays(*kinds: str) -> list[str]:
    """Relays terminating TLS in front of the C echo server, which shares their CPU (see relay.py)."""
    names = {"socat": "socat-tls", "stunnel": "stunnel", "haproxy": "haproxy-tls"}
    relay = f"{PYTHON} -P -m sockd_bench.relay {{port}} {{build}}"
    servers = []
    for kind in kinds:
        name = names.get(kind, f"sockd-relay-{kind}")
        build = "" if kind in names else " --build compiled"
        servers.append(f"{name}={relay} {kind} --tls {{tls}}{build}")
    return servers


INETDS = {"xinetd": "xinetd", "systemd-socket-activate": "systemd", "socat-exec": "socat"}  # name: inetd.py's server
# What the servers that start through relay.py and inetd.py run, which compare.py cannot see: without it, they
# are skipped with a note (compare.py notes its own, such as Go's peer).
PROGRAMS = {
    "socat-relay": "socat",
    "haproxy-relay": "haproxy",
    "haproxy-relay-splice": "haproxy",
    "socat-tls": "socat",
    "stunnel": "stunnel",
    "haproxy-tls": "haproxy",
    "xinetd": "xinetd",
    "systemd-socket-activate": "systemd-socket-activate",
    "socat-exec": "socat",
}
TLS = ("--tls", "{tls}")  # sockd's listener serves the run's certificate
TLS_PEERS = [*tls_relays("stunnel", "socat"), "uvloop-tls"]
TLS_MODELS = ["asyncio", "selector", "busy_poll", "threaded"]


WORKLOADS: dict[str, tuple[list[str], list[str]]] = {
    # name: (compare.py arguments, servers: the first is the reference)
    "tcp-echo": (
        ["tcp-echo"],
        [
            "c",
            "uvloop",
            "asyncio",
            "go",
            "threaded",
            *models("tcp", "echo", ["asyncio", "selector", "busy_poll", "threaded", "thread_pool"]),
            f"sockd-asyncio-no-metrics={sockd('--no-metrics')}",
            f"sockd-asyncio-stdlib={sockd('--option', 'event_loop=asyncio')}",
            f"sockd-asyncio-2-workers={sockd('--option', 'workers=2')}",
        ],
    ),
    "udp-echo": (
        ["udp-echo", "--conns", "20"],
        [
            "c-udp",
            "python-udp",
            "uvloop-udp",
            "asyncio-udp",
            *models("udp", "echo", ["iterative", "asyncio", "selector", "thread_pool"]),
        ],
    ),
    "timestamp": (
        ["timestamp"],
        [
            "seed-iterative",
            "uvloop-stamp",
            "asyncio-stamp",
            "seed-thread",
            *models("tcp", "timestamp", ["iterative", "asyncio", "selector", "threaded"]),
        ],
    ),
    "unix-echo": (
        ["unix-echo"],
        [
            f"sockd-asyncio-unix={sockd('--protocol', 'unix', where='{sock}')}",
            f"sockd-selector-unix={sockd('--protocol', 'unix', '--concurrency', 'selector', where='{sock}')}",
        ],
    ),
    # A program per connection (/usr/bin/head -c 64), as inetd starts one: xinetd is the reference.
    "exec": (["timestamp", "--conns", "20"], inetds()),
    "idle": (["idle", "--conns", "8000"], ["uvloop", "asyncio", "threaded", f"sockd-asyncio={sockd()}"]),
    # A relay in front of the C echo server: requests/s against a direct connection to it.
    "relay": (["tcp-echo"], relays()),
    "relay-bulk": (["tcp-echo", "--size", str(1 << 20), "--conns", "8"], relays()),
    # TLS 1.3: 64 bytes over 50 persistent connections; a new connection per request, with a full
    # handshake each (cpu_us is per connection); 1 MiB messages over 8 connections.
    "tls-echo": (["tls-echo"], [*TLS_PEERS, *models("tcp", "echo", TLS_MODELS, *TLS)]),
    "tls-connect": (["tls-connect"], [*TLS_PEERS, *models("tcp", "echo", TLS_MODELS, *TLS)]),
    "tls-bulk": (["tls-bulk"], [*TLS_PEERS, *models("tcp", "echo", ["asyncio", "selector"], *TLS)]),
    # TLS termination in front of the C echo server: sockd's relay against HAProxy's and stunnel's.
    "tls-relay": (["tls-echo"], tls_relays("haproxy", "stunnel", "asyncio", "selector")),
    "tls-relay-connect": (["tls-connect"], tls_relays("haproxy", "stunnel", "asyncio", "selector")),
}
# Workloads run by a module of this package, not compare.py.
OWN = {"footprint": "sockd_bench.footprint", "healthz": "sockd_bench.healthz"}
BUILDS: tuple[Build, ...] = get_args(Build)


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of issue 26's table: a sockd server of `workload` against the `peer` it is measured
    by, both in the same compare.py run; with `pure`, the server runs in the pure build too."""

    workload: str
    server: str
    peer: str
    pure: bool = True


ROWS = [
    Row("tcp-echo", "sockd-asyncio", "uvloop"),
    Row("tcp-echo", "sockd-asyncio-stdlib", "asyncio"),
    Row("tcp-echo", "sockd-asyncio", "sockd-asyncio-no-metrics", pure=False),  # metrics on vs off
    Row("tcp-echo", "sockd-threaded", "threaded"),
    Row("udp-echo", "sockd-iterative", "python-udp"),  # the best model, 2026-11-29
    Row("timestamp", "sockd-iterative", "seed-iterative"),  # the best model, 2026-11-29
    Row("relay", "sockd-relay-asyncio", "haproxy-relay"),
    Row("relay-bulk", "sockd-relay-asyncio", "haproxy-relay"),
    Row("idle", "sockd-asyncio", "uvloop"),
]
COMPILED = "--build compiled"  # in the command of every sockd row (see sockd(), relays())


def servers_of(workload: str, builds: tuple[Build, ...]) -> list[str]:
    """The workload's servers in `builds`: each compiled sockd row, and beside it its pure twin
    if ROWS names it (with "pure" alone, every sockd row, pure)."""
    twinned = {row.server for row in ROWS if row.workload == workload and row.pure}
    servers = []
    for server in WORKLOADS[workload][1]:
        name, _, command = server.partition("=")
        if COMPILED not in command:
            servers.append(server)
            continue
        if "compiled" in builds:
            servers.append(server)
        if "pure" in builds and (name in twinned or "compiled" not in builds):
            servers.append(f"{name}-pure={command.replace(COMPILED, '--build pure')}")
    return servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*WORKLOADS, *OWN]
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"{', '.join(names)} (default: all)")
    parser.add_argument("--rounds", default="3")
    parser.add_argument("--seconds", default="3")
    parser.add_argument("--builds", default="compiled,pure", help="sockd's builds to run (default compiled,pure)")
    args = parser.parse_args()
    if unknown := set(args.workloads) - set(names):
        parser.error(f"unknown workload: {', '.join(sorted(unknown))}")
    builds = tuple(build for build in BUILDS if build in args.builds.split(","))
    if not builds or set(args.builds.split(",")) - set(BUILDS):
        parser.error(f"--builds: one or both of {', '.join(BUILDS)}")
    if "compiled" in builds:
        build_environment("compiled")  # exits with the reason unless the compiled build is compiled
    chosen = args.workloads or names
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sockd-suite-") as directory:
        for name in chosen:
            print(f"== {name}", flush=True)
            figures = Path(directory) / f"{name}.json"
            if name in OWN:
                command = [sys.executable, "-P", "-m", OWN[name], "--runs", args.rounds]
            else:
                options = WORKLOADS[name][0]
                servers = [server for server in servers_of(name, builds) if _present(server)]
                timing = ["--rounds", args.rounds, "--seconds", args.seconds, "--json", str(figures)]
                command = [sys.executable, str(COMPARE), *options, *timing, *servers]
            done = subprocess.run(command, check=False)
            if done.returncode:
                return done.returncode
            if figures.exists():
                measured[name] = json.loads(figures.read_text())
    if table := against_peers(measured):
        print(table, flush=True)
    return 0


def against_peers(measured: dict[str, dict[str, Any]]) -> str:
    """ROWS of the workloads measured, each against its peer, compiled and pure side by side
    ("-" where a server or its peer did not run)."""
    lines = []
    for row in ROWS:
        if row.workload not in measured:
            continue
        unit, rounds = measured[row.workload]["unit"], measured[row.workload]["rounds"]
        cells = []
        # A row without `pure` (metrics on vs off: both compiled) has no pure twin of its own.
        for server in (row.server, f"{row.server}-pure" if row.pure else None):
            ratio, cpu = _ratios(rounds.get(server, []) if server else [], rounds.get(row.peer, []), unit)
            cells += [ratio, cpu]
        lines.append(f"{row.workload:<12}{row.server:<24}{row.peer:<26}" + "".join(f"{cell:>10}" for cell in cells))
    if not lines:
        return ""
    header = f"{'workload':<12}{'sockd':<24}{'peer = 1.00':<26}"
    header += "".join(f"{column:>10}" for column in ("compiled", "cpu_ratio", "pure", "cpu_ratio"))
    caption = "== against its peer: sockd / peer (idle: bytes per connection, lower is better); cpu_ratio: peer / sockd"
    return "\n".join([caption, header, *lines])


def _ratios(server: list[dict[str, float]], peer: list[dict[str, float]], unit: str) -> tuple[str, str]:
    """The medians over the rounds run by both (compare.py's pairing): `unit`, and CPU per request."""
    pairs = list(zip(server, peer, strict=False))
    ratios = [mine[unit] / theirs[unit] for mine, theirs in pairs if theirs[unit]]
    cpu = [theirs["cpu_us"] / mine["cpu_us"] for mine, theirs in pairs if mine["cpu_us"] and theirs["cpu_us"]]
    return _median(ratios), _median(cpu)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def _present(server: str) -> bool:
    name = server.partition("=")[0]
    program = PROGRAMS.get(name.removesuffix("-pure"))
    if program is None or shutil.which(program):
        return True
    print(f"{name}: skipped: no {program}", flush=True)
    return False


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: the performance tables of the project, sockd's models beside the bare peers.

Each workload is one run of bench/compare.py (interleaved rounds, server on CPU 0,
load on CPU 1), whose first server is the reference of the ratios it prints; `footprint` is
footprint.py instead (memory and start-up, sockd alone, its startup section run --rounds times),
and `healthz` healthz.py (how long /healthz takes to answer while a tcp-echo load saturates every
core, --rounds runs).
sockd runs with metrics enabled, as in production. This is not part of `make test`: it takes
minutes and its numbers belong to the machine it ran on.

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

    .venv/bin/python -m sockd_bench.suite [--rounds 3] [--seconds 3] [WORKLOAD ...]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from sockd_bench.inetd import HEAD

ROOT = Path(__file__).resolve().parents[1]  # the checkout
COMPARE = ROOT / "bench" / "compare.py"  # which builds its C peers and load generators itself
PYTHON = shlex.quote(sys.executable)
SERVE = f"{PYTHON} -P -m sockd_bench.serve"


def sockd(*options: str, where: str = "{port}") -> str:
    return f"{SERVE} {where} {' '.join(options)}"


def models(protocol: str, handler: str, names: list[str], *options: str) -> list[str]:
    """sockd under each model (thread_pool sized for the load's 50 connections)."""
    servers = []
    for name in names:
        extra = ["--option", "threads=50"] if name == "thread_pool" else []
        command = sockd("--protocol", protocol, "--handler", handler, "--concurrency", name, *extra, *options)
        servers.append(f"sockd-{name}={command}")
    return servers


def inetds() -> list[str]:
    """What runs a program per connection without sockd (see inetd.py), then sockd's exec handler."""
    inetd = f"{PYTHON} -P -m sockd_bench.inetd {{port}}"
    peers = [f"{name}={inetd} {kind}" for name, kind in INETDS.items()]
    return [*peers, f"sockd-exec={sockd('--exec', shlex.quote(shlex.join(HEAD)))}"]


def relays() -> list[str]:
    """socat and sockd's relay, each in front of the C echo server (see relay.py). The relay has
    the server's CPU to itself; the echo server runs beside the load generator, as the separate
    service an upstream is."""
    relay = f"{PYTHON} -P -m sockd_bench.relay {{port}} {{build}}"
    kinds = [("socat-relay", "socat"), ("sockd-relay-asyncio", "asyncio"), ("sockd-relay-selector", "selector")]
    return [f"{name}={relay} {kind} --upstream-cpus 1" for name, kind in kinds]


def tls_relays(*kinds: str) -> list[str]:
    """Relays terminating TLS in front of the C echo server, which shares their CPU (see relay.py)."""
    names = {"socat": "socat-tls", "stunnel": "stunnel", "haproxy": "haproxy-tls"}
    relay = f"{PYTHON} -P -m sockd_bench.relay {{port}} {{build}}"
    return [f"{names.get(kind, f'sockd-relay-{kind}')}={relay} {kind} --tls {{tls}}" for kind in kinds]


INETDS = {"xinetd": "xinetd", "systemd-socket-activate": "systemd", "socat-exec": "socat"}  # name: inetd.py's server
# What the servers that start through relay.py and inetd.py run, which compare.py cannot see: without it, they
# are skipped with a note (compare.py notes its own, such as Go's peer).
PROGRAMS = {
    "socat-relay": "socat",
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
    "relay": (["tcp-echo"], ["c", *relays()]),
    "relay-bulk": (["tcp-echo", "--size", str(1 << 20), "--conns", "8"], ["c", *relays()]),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*WORKLOADS, *OWN]
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"{', '.join(names)} (default: all)")
    parser.add_argument("--rounds", default="3")
    parser.add_argument("--seconds", default="3")
    args = parser.parse_args()
    if unknown := set(args.workloads) - set(names):
        parser.error(f"unknown workload: {', '.join(sorted(unknown))}")
    chosen = args.workloads or names
    for name in chosen:
        print(f"== {name}", flush=True)
        if name in OWN:
            command = [sys.executable, "-P", "-m", OWN[name], "--runs", args.rounds]
        else:
            options, servers = WORKLOADS[name]
            servers = [server for server in servers if _present(server)]
            timing = ["--rounds", args.rounds, "--seconds", args.seconds]
            command = [sys.executable, str(COMPARE), *options, *timing, *servers]
        done = subprocess.run(command, check=False)
        if done.returncode:
            return done.returncode
    return 0


def _present(server: str) -> bool:
    name = server.partition("=")[0]
    program = PROGRAMS.get(name)
    if program is None or shutil.which(program):
        return True
    print(f"{name}: skipped: no {program}", flush=True)
    return False


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measure servers side by side under one load, in interleaved rounds, and print ratios.

Each server is a shell command that listens on 127.0.0.1:PORT (the string {port} is replaced,
{sock} too for a Unix socket path). The first server is the reference: every row shows its
median requests/s as a ratio to the reference's, round by round, so machine drift cancels out.

  compare.py tcp-echo  [opts] NAME='command' ...   closed-loop echo, CONNS connections, SIZE bytes
  compare.py udp-echo  [opts] NAME='command' ...   the same over UDP
  compare.py unix-echo [opts] NAME='command' ...   the same over a Unix stream socket {sock}
  compare.py timestamp [opts] NAME='command' ...   connect, send, read to EOF, close; per second
  compare.py idle      [opts] NAME='command' ...   hold CONNS idle connections; server RSS per connection
  compare.py tls-echo    [opts] NAME='command' ...  tcp-echo over TLS 1.3 (tlsload: OpenSSL, no verification)
  compare.py tls-connect [opts] NAME='command' ...  a new TLS connection per request: a full handshake (nothing
                                                    resumed), SIZE bytes echoed, close; per second
  compare.py tls-bulk    [opts] NAME='command' ...  tls-echo with 1 MiB messages on 8 connections

The tls-* modes make a throwaway self-signed P-256 certificate per run (with the openssl command):
{tls} in a command names the temporary directory that holds its cert.pem and key.pem.

The C load generators and peers are compiled on first use (and again when their source changes)
into build/bench/ at the top of the checkout (git ignores it); {build} in a command names it.

Besides requests/s, each row shows the server's CPU time per request (all its processes and
threads, from /proc/PID/stat over the run; a request is a connection in the timestamp and
tls-connect modes; ratio = reference's CPU per request over this one's, so higher is better). By
default the server runs on CPU 0 and the load generator on CPU 1 (--server-cpus, --client-cpus).
--json FILE also writes every round's figures of every server there (sockd_bench/suite.py reads
them to set rows against other peers than the first).

A NAME alone (no '=') picks a built-in peer: c, go, uvloop, uvloop-streams, asyncio, threaded,
socat (tcp-echo); c-udp, python-udp, uvloop-udp, asyncio-udp (udp-echo); seed-iterative,
seed-thread, uvloop-stamp, asyncio-stamp (timestamp); socat-unix (unix-echo); uvloop-tls (tls-*).
`--peers` adds the standard set for the mode. Needs gcc, and OpenSSL's headers (Debian libssl-dev)
for the tls-* modes; peers need Go (golang-go), socat and uvloop (`pip install uvloop`); a mode or
peer whose program is missing is skipped, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE.parent / "build" / "bench"  # git-ignored: a build, not the source
PY = sys.executable
PEERS = {
    "tcp-echo": {
        "c": "{build}/c_epoll_echo {port}",
        "go": "{build}/go_echo {port}",
        "uvloop": f"{PY} {HERE}/peers/asyncio_echo.py {{port}} protocol uvloop",
        "uvloop-streams": f"{PY} {HERE}/peers/asyncio_echo.py {{port}} streams uvloop",
        "asyncio": f"{PY} {HERE}/peers/asyncio_echo.py {{port}} protocol",
        "threaded": f"{PY} {HERE}/peers/threaded_echo.py {{port}}",
        "socat": "socat tcp-listen:{port},bind=127.0.0.1,reuseaddr,fork exec:cat",
    },
    "udp-echo": {
        "c-udp": "{build}/c_udp_echo {port}",
        "python-udp": f"{PY} {HERE}/peers/udp_peers.py {{port}} blocking",
        "uvloop-udp": f"{PY} {HERE}/peers/udp_peers.py {{port}} uvloop",
        "asyncio-udp": f"{PY} {HERE}/peers/udp_peers.py {{port}} asyncio",
    },
    "timestamp": {
        "seed-iterative": f"{PY} {HERE}/peers/timestamp_peers.py {{port}} seed-iterative",
        "seed-thread": f"{PY} {HERE}/peers/timestamp_peers.py {{port}} seed-thread",
        "uvloop-stamp": f"{PY} {HERE}/peers/timestamp_peers.py {{port}} uvloop",
        "asyncio-stamp": f"{PY} {HERE}/peers/timestamp_peers.py {{port}} asyncio",
    },
    "unix-echo": {
        "socat-unix": "socat unix-listen:{sock},fork exec:cat",
    },
    "tls-echo": {
        "uvloop-tls": f"{PY} {HERE}/peers/tls_echo.py {{port}} {{tls}} uvloop",
        "asyncio-tls": f"{PY} {HERE}/peers/tls_echo.py {{port}} {{tls}}",
    },
}
PEERS["idle"] = PEERS["tcp-echo"]
PEERS["tls-connect"] = PEERS["tls-bulk"] = PEERS["tls-echo"]
# The load generator, and the kind of load it is told, per mode.
LOADS = {
    "udp-echo": ("echoload", "udp"),
    "unix-echo": ("echoload", "unix"),
    "timestamp": ("connload", "tcp"),
    "tls-echo": ("tlsload", "echo"),
    "tls-bulk": ("tlsload", "echo"),
    "tls-connect": ("tlsload", "conn"),
}


def build() -> None:
    """Compile the C load generators and peers, and Go's peer where Go exists, when missing or older
    than their source."""
    BUILD.mkdir(parents=True, exist_ok=True)
    for name in ("echoload", "connload"):
        _compile(HERE / f"{name}.c", BUILD / name, ["gcc", "-O2"])
    for name in ("c_epoll_echo", "c_udp_echo"):
        _compile(HERE / "peers" / f"{name}.c", BUILD / name, ["gcc", "-O2"])
    if Path("/usr/include/openssl/ssl.h").exists():  # libssl-dev; without it, the tls-* modes are skipped
        _compile(HERE / "tlsload.c", BUILD / "tlsload", ["gcc", "-O2"], libraries=("-lssl", "-lcrypto"))
    go = shutil.which("go")
    if go:
        # A failed Go build leaves no binary: the go peer is then skipped, as without Go.
        _compile(
            HERE / "peers" / "go_echo.go",
            BUILD / "go_echo",
            [go, "build"],
            check=False,
            env={**os.environ, "GOCACHE": str(BUILD / "gocache")},
        )


def _compile(
    src: Path,
    out: Path,
    compiler: list[str],
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    libraries: tuple[str, ...] = (),
) -> None:
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return
    # Built beside, then renamed: an interrupted or concurrent build never leaves a half-written
    # binary that looks newer than its source.
    partial = out.with_name(f".{out.name}.{os.getpid()}")
    command = [*compiler, "-o", str(partial), str(src), *libraries]  # libraries after what uses them
    done = subprocess.run(command, check=check, cwd=BUILD, env=env)
    if done.returncode == 0:
        partial.replace(out)


def make_certificate(directory: str) -> None:
    """A self-signed P-256 certificate for localhost, valid for a day, as cert.pem and key.pem."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{directory}/key.pem"]
    certificate = ["-x509", "-out", f"{directory}/cert.pem", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run(["openssl", "req", *key, *certificate], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    mode: str, port: int, sock: str, server: subprocess.Popen[bytes], *, size: int, timeout: float = 15.0
) -> bool:
    """Whether the server answers a request within `timeout`: an accepted connection alone proves
    nothing (a listening socket queues clients before any worker serves it). A server that has
    exited (sockd refusing its config) is not waited for. In the timestamp mode the request is the
    load's `size` bytes: a program per connection (`head -c 64`, stdout buffered) answers only
    once it has read them all."""
    deadline = time.monotonic() + timeout
    request = b"r" * size if mode == "timestamp" else b"ready?"
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if mode == "udp-echo":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(0.2)
                    s.sendto(b"ready?", ("127.0.0.1", port))
                    s.recv(4096)
                    return True
            if mode == "unix-echo":
                client = socket.socket(socket.AF_UNIX)
                client.settimeout(1.0)
                client.connect(sock)
            else:
                client = socket.create_connection(("127.0.0.1", port), timeout=1.0)
            if mode.startswith("tls-"):
                client = _ANY_SERVER.wrap_socket(client)  # the handshake, within the same timeout
            with client:
                client.sendall(request)
                if client.recv(4096):  # an echo or a timestamp: the server serves
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


# A TLS client that takes any certificate: wait_ready asks whether a server answers, not who it is.
_ANY_SERVER = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_ANY_SERVER.check_hostname = False
_ANY_SERVER.verify_mode = ssl.CERT_NONE


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_times(pids: Iterable[int]) -> dict[int, tuple[float, float]]:
    """CPU seconds (user + system, all threads) of each process: its own, and its reaped children's."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            utime, stime, cutime, cstime = (int(field) / tick for field in fields[11:15])
        except (OSError, ValueError):
            continue
        times[pid] = (utime + stime, cutime + cstime)
    return times


def server_cpu(
    start: dict[int, tuple[float, float]], end: dict[int, tuple[float, float]], settled: dict[int, tuple[float, float]]
) -> float:
    """CPU seconds a server's processes used from `start` to `end` (cpu_times of its tree).

    A forking server's per-connection children exit as the load ends: read at that moment, a child
    reaped between the read of its parent and its own would be lost, or counted twice the other way
    round. So the children's time is read once they have been reaped (`settled`, the tree a moment
    later, when it no longer shrinks), and the processes' own time at the end: what one that lives
    on spends idling after the load (busy_poll spins) does not count."""
    used = 0.0
    for pid, (own, children) in settled.items():
        used += (end[pid][0] if pid in end else own) + children
    return used - sum(own + children for own, children in start.values())


def settled_tree(pid: int, timeout: float = 2.0) -> list[int]:
    """tree(pid) once it has stopped shrinking (or after `timeout`): each child that served one of
    the load's connections has exited and been reaped."""
    found = tree(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = tree(pid)
        if set(now) == set(found):
            break
        found = now
    return found


def tree(pid: int) -> list[int]:
    """The pid and all its descendants (sockd's workers count toward its memory)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], check=True, capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        if line.strip():
            p, pp = map(int, line.split())
            children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def run_one(mode: str, command: str, args: argparse.Namespace) -> dict[str, float] | None:
    port = free_port()
    directory = tempfile.mkdtemp(prefix="sb")  # short: a Unix socket's path has 107 bytes at most
    sock = os.path.join(directory, "s")
    cmd = command.format(port=port, sock=sock, build=BUILD, tls=args.tls)
    server = subprocess.Popen(
        f"exec taskset -c {args.server_cpus} {cmd}",
        shell=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if not wait_ready(mode, port, sock, server, size=args.size):
            return None
        time.sleep(0.3)
        if mode == "idle":
            before = rss_kb(tree(server.pid))
            conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.conns)]
            for c in conns:
                c.sendall(b"ping")
            ok = sum(1 for c in conns if c.recv(16) == b"ping")
            time.sleep(0.5)
            after = rss_kb(tree(server.pid))
            for c in conns:
                c.close()
            return {
                "rps": float(ok),
                "per_conn_bytes": (after - before) * 1024 / args.conns,
                "cpu_us": 0,
                "p50_us": 0,
                "p99_us": 0,
                "errors": args.conns - ok,
            }
        tool, kind = LOADS.get(mode, ("echoload", "tcp"))
        addr = sock if kind == "unix" else f"127.0.0.1:{port}"
        start = cpu_times(tree(server.pid))
        load = subprocess.Popen(
            [
                "taskset",
                "-c",
                args.client_cpus,
                str(BUILD / tool),
                kind,
                addr,
                str(args.conns),
                str(args.size),
                str(args.seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(args.seconds * 0.9)
        pids = set(start) | set(tree(server.pid))  # a forking server's children appear under load
        out, _ = load.communicate(timeout=args.seconds + 30)
        end = cpu_times(pids)
        cpu = server_cpu(start, end, cpu_times(settled_tree(server.pid)))
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        rate = float(fields.get("rps", fields.get("cps", 0)))
        done = float(fields.get("requests", 0))
        return {
            "rps": rate,
            "cpu_us": 1e6 * cpu / done if done else float("nan"),
            "p50_us": float(fields["p50_us"]),
            "p99_us": float(fields["p99_us"]),
            "errors": float(fields["errors"]),
        }
    finally:
        # The process group: a relay's echo server too, even once the server itself has exited
        # (wait_ready reaps it); with neither left, there is nothing to stop.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=sorted(PEERS))
    ap.add_argument("servers", nargs="*", help="NAME='command with {port}' or a built-in peer name")
    ap.add_argument("--peers", action="store_true", help="add the standard peers for this mode")
    ap.add_argument(
        "--conns", type=int, default=None, help="connections (default 50; idle: 5000; udp-echo: 20; tls-bulk: 8)"
    )
    ap.add_argument("--size", type=int, default=None, help="message bytes (default 64; tls-bulk: 1 MiB)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--server-cpus", default="0", help="CPUs the server may use (taskset list, default 0)")
    ap.add_argument("--client-cpus", default="1", help="CPUs the load generator may use (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write each round's figures, by server, to FILE")
    args = ap.parse_intermixed_args()
    if args.conns is None:
        args.conns = {"idle": 5000, "udp-echo": 20, "tls-bulk": 8}.get(args.mode, 50)
    if args.size is None:
        args.size = 1 << 20 if args.mode == "tls-bulk" else 64
    build()
    if args.mode.startswith("tls-") and not (BUILD / "tlsload").exists():
        print(f"{args.mode}: skipped: tlsload needs OpenSSL's headers to build (Debian: libssl-dev)")
        return 0
    with tempfile.TemporaryDirectory(prefix="sockd-bench-tls-") as tls:
        if args.mode.startswith("tls-"):
            make_certificate(tls)
        args.tls = tls
        return compare(ap, args)


def compare(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    servers: list[tuple[str, str]] = []
    for spec in args.servers:
        name, _, command = spec.partition("=")
        servers.append((name, command or PEERS[args.mode][name]))
    if args.peers:
        servers += [(n, c) for n, c in PEERS[args.mode].items() if n not in dict(servers)]
    present = []
    for name, command in servers:
        program = shlex.split(command.format(port=0, sock="x", build=BUILD, tls=args.tls))[0]
        if shutil.which(program):
            present.append((name, command))
        else:
            print(f"{name}: skipped: no {program}")
    servers = present
    if not servers:
        ap.error("no servers to measure")
    results: dict[str, list[dict[str, float]]] = {n: [] for n, _ in servers}
    for _ in range(args.rounds):
        for name, command in servers:
            r = run_one(args.mode, command, args)
            if r is not None:
                results[name].append(r)
    ref = servers[0][0]
    unit = "per_conn_bytes" if args.mode == "idle" else "rps"
    print(
        f"{args.mode}: conns={args.conns} size={args.size} seconds={args.seconds} rounds={args.rounds} reference={ref}"
    )
    print(
        f"{'server':<28}{unit:>14}{'ratio':>8}{'cpu_us/req':>12}{'cpu_ratio':>10}{'p50_us':>9}{'p99_us':>9}"
        f"{'errors':>8}"
    )
    for name, _ in servers:
        rs = results[name]
        if not rs:
            print(f"{name:<28}{'did not start':>14}")
            continue
        med = statistics.median(r[unit] for r in rs)
        pairs = [r[unit] / q[unit] for r, q in zip(rs, results[ref], strict=False) if q[unit]]
        ratio = statistics.median(pairs) if pairs else float("nan")
        cpu = statistics.median(r["cpu_us"] for r in rs)
        cpu_pairs = [q["cpu_us"] / r["cpu_us"] for r, q in zip(rs, results[ref], strict=False) if r["cpu_us"]]
        cpu_ratio = statistics.median(cpu_pairs) if cpu_pairs else float("nan")
        print(
            f"{name:<28}{med:>14.0f}{ratio:>8.2f}{cpu:>12.2f}{cpu_ratio:>10.2f}"
            f"{statistics.median(r['p50_us'] for r in rs):>9.0f}"
            f"{statistics.median(r['p99_us'] for r in rs):>9.0f}{sum(r['errors'] for r in rs):>8.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "unit": unit, "rounds": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

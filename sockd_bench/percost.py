"""What one server process costs per request, in figures that other work on the machine does not
change: user-space instructions and syscalls; and its user and system CPU time, which it does.

    .venv/bin/python -m sockd_bench.percost [--load echo|conn|udp] [--seconds 5] [--mode M ...] \\
        -- COMMAND ... {port} ...

COMMAND is a process that serves the requests itself (a peer of bench/compare.py, bench's C
echo server, one sockd model run in-process; not a supervisor whose workers serve: only the
process started is measured). It is started once per mode, {port} replaced by a free port. A
one-second load warms it (imports, first allocations); then bench's load generator (compare.py
builds it) runs for --seconds against it: echoload, 50 persistent connections of 64 bytes each
(tcp-echo), or connload, a connection per request (timestamp), or echoload over UDP, 20 flows of
one 64-byte datagram each (udp-echo; a UDP COMMAND is ready once it echoes a datagram). Every
figure is divided by the requests the load completed:

- cpu: user and system time (utime and stime of /proc/PID/stat: the kernel splits the exact
  on-CPU time by sampling at each tick, so the split is a statistic of some thousand ticks) and
  the exact on-CPU time (schedstat, summed over every thread). A busy machine raises all three
  (shared caches), so compare only figures taken side by side, and several times.
- syscalls: `strace -c -f` attached for the load: calls per request, all and the most frequent.
- instructions: COMMAND under `valgrind --tool=callgrind --instr-atstart=no`, instrumentation
  switched on for the load alone (callgrind_control), so start-up does not count: Ir per
  request, user space only. The profile is kept (--keep DIR) for callgrind_annotate. Under
  callgrind a reply takes some 50 times longer: what depends on the time a request took
  (a latency histogram's bucket) may take another path than natively.

The ratio of two servers' CPU per request is the ratio of their throughputs when each saturates
a core, which is how issue 26 states its goals; the share of system time says how much of that
no user-space change can remove while the syscalls stay the same.

Prints one line per mode.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sockd_bench.healthz import load_generators

CONNECTIONS, SIZE = 50, 64  # the tcp-echo and timestamp workloads'
FLOWS = 20  # the udp-echo workload's (compare.py's default for it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, server: subprocess.Popen[str], udp: bool, timeout: float = 120.0) -> None:
    """Until the port accepts, or over UDP echoes a datagram (a server under callgrind takes many
    seconds to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if udp:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.settimeout(1.0)
                    probe.connect(("127.0.0.1", port))
                    probe.send(b"x")
                    probe.recv(1)
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not listen on {port}")


def cpu_times(pid: int) -> tuple[int, int, int]:
    """utime and stime (ticks) and the exact on-CPU time (ns) of every thread of `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    exact = sum(int(Path(task, "schedstat").read_text().split()[0]) for task in glob.glob(f"/proc/{pid}/task/*"))
    return int(fields[11]), int(fields[12]), exact


def measure(mode: str, command: Sequence[str], load: str, seconds: float, keep: Path) -> str:
    generators = load_generators()
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in command]
    profile = keep / f"callgrind.{port}.%p"
    if mode == "instructions":
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={profile}", *argv]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_listening(port, server, udp=load == "udp")
        generator = "connload" if load == "conn" else "echoload"
        kind, flows = ("udp", FLOWS) if load == "udp" else ("tcp", CONNECTIONS)
        run = [str(generators.BUILD / generator), kind, f"127.0.0.1:{port}", str(flows), str(SIZE)]
        subprocess.run([*run, "1"], capture_output=True, check=True)  # the warm-up
        tracer = None
        trace = keep / f"strace.{port}"
        if mode == "instructions":
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], capture_output=True, check=True)
        elif mode == "syscalls":
            strace = ["strace", "-c", "-f", "-p", str(server.pid), "-o", str(trace)]
            tracer = subprocess.Popen(strace, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached to every thread before the load starts
        before = cpu_times(server.pid)
        out = subprocess.run([*run, str(seconds)], capture_output=True, text=True, check=True).stdout
        after = cpu_times(server.pid)
        found = re.search(r"requests=(\d+)", out)
        if not found or not int(found[1]):
            raise SystemExit(f"no requests: {out!r}")
        requests = int(found[1])
        if mode == "instructions":
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], capture_output=True, check=True)
            subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True, check=True)
        if tracer:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return describe(mode, requests, before, after, trace=trace, profile=profile)


def describe(
    mode: str, requests: int, before: tuple[int, int, int], after: tuple[int, int, int], *, trace: Path, profile: Path
) -> str:
    """One mode's figures per request, as a line."""
    line = f"{mode}: {requests} requests"
    if mode == "cpu":
        tick = os.sysconf("SC_CLK_TCK")
        user, system = ((after[i] - before[i]) / tick / requests * 1e6 for i in (0, 1))
        exact = (after[2] - before[2]) / 1e3 / requests
        line += f", per request: user {user:.2f} us, system {system:.2f} us, on CPU {exact:.2f} us"
    elif mode == "syscalls":
        calls: dict[str, int] = {}
        for row in trace.read_text().splitlines():
            cells = row.split()
            if len(cells) >= 5 and cells[0][0].isdigit() and cells[-1] != "total":
                calls[cells[-1]] = int(cells[3])
        most = sorted(calls.items(), key=lambda item: -item[1])[:6]
        line += f", syscalls per request: {sum(calls.values()) / requests:.2f} (" + ", ".join(
            f"{name} {count / requests:.2f}" for name, count in most
        )
        line += ")"
    else:
        instructions = 0
        # The dump while running is part 1; the file of the exit holds nothing (instrumentation off).
        for path in glob.glob(str(profile).replace("%p", "*")):
            totals = re.search(r"^totals: (\d+)", Path(path).read_text(), re.MULTILINE)
            instructions += int(totals[1]) if totals else 0
        line += f", Ir per request: {instructions / requests:.0f} (profiles in {profile.parent})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", choices=("echo", "conn", "udp"), default="echo")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--mode", action="append", choices=("cpu", "syscalls", "instructions"))
    parser.add_argument("--keep", type=Path, help="directory for the profiles (default: a new temporary one)")
    parser.add_argument("command", nargs="+", help="the server's command, with {port}")
    args = parser.parse_args()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="percost-"))
    keep.mkdir(parents=True, exist_ok=True)
    for mode in args.mode or ("cpu", "syscalls", "instructions"):
        print(measure(mode, args.command, args.load, args.seconds, keep), flush=True)


if __name__ == "__main__":
    main()

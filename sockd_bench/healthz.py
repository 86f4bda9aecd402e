"""`make bench`'s `healthz` workload: how long sockd's /healthz takes to answer while a tcp-echo
load saturates the machine, since a balancer's health check that times out takes a busy but
healthy instance out.

sockd serves one echo listener (asyncio, `workers: 2` by default) and the metrics endpoint; the C
echoload (bench/echoload.c, built by compare.py's `build`) drives 50 connections of 64 bytes.
Nothing is pinned: the workers, the load generator, the supervisor and this prober share every
core, as on a host under load. The prober asks /healthz every 20 ms on a new connection, as
HAProxy's `option httpchk` does, and times each answer from the connect to its last byte: first
while sockd is idle, then under the load. Printed per run and phase: the probes, those answered
other than 200, p50, p99 and the longest in ms, the load's requests/s and how busy the CPUs were
(/proc/stat). The prober's own wait for a CPU counts in its times: they are an upper bound.

    .venv/bin/python -P -m sockd_bench.healthz [--runs 3] [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from sockd_bench.suite import COMPARE

INTERVAL = 0.02  # seconds between probes
PROBE_TIMEOUT = 5.0  # a probe not answered by then counts as a failure, at this time
CONNECTIONS, SIZE = 50, 64  # the tcp-echo workload's


def load_generators() -> ModuleType:
    """bench/compare.py (bench/ is not a package), once it has built the C load generators into
    its BUILD directory."""
    spec = importlib.util.spec_from_file_location("compare", COMPARE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build()
    return module


@dataclass
class Phase:
    """The probes of one phase: each answer's time in seconds, and the answers that were not 200."""

    times: list[float] = field(default_factory=list)
    failed: int = 0

    def line(self) -> str:
        ordered = sorted(self.times)
        p50, p99 = (ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e3 for q in (0.5, 0.99))
        return f"{len(ordered):>7}{self.failed:>9}{p50:>9.2f}{p99:>9.2f}{ordered[-1] * 1e3:>9.2f}"


def probe(port: int) -> tuple[bool, float]:
    """One GET /healthz on a new connection: whether it answered 200, and how long it took."""
    began = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sockd\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return False, time.perf_counter() - began
    return answer.startswith(b"HTTP/1.1 200 "), time.perf_counter() - began


def probe_for(port: int, seconds: float) -> Phase:
    phase = Phase()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ok, took = probe(port)
        phase.times.append(took)
        phase.failed += not ok
        time.sleep(INTERVAL)
    return phase


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


@contextlib.contextmanager
def serving(echo: int, metrics: int, workers: int) -> Iterator[None]:
    """sockd on the ports, until the block ends (SIGTERM): /healthz answers 200 on entry."""
    config = {
        "logging": {"level": "warning"},
        "metrics": {"port": metrics},
        "listeners": [
            {
                "name": "echo",
                "protocol": "tcp",
                "host": "127.0.0.1",
                "port": echo,
                "handler": "echo",
                "concurrency": "asyncio",
                "workers": workers,
            }
        ],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        json.dump(config, file)  # JSON is YAML
        file.flush()
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "sockd", "-c", file.name], stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while not probe(metrics)[0]:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("sockd did not become healthy")
                time.sleep(0.1)
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def run(compare: ModuleType, seconds: float, workers: int) -> tuple[Phase, Phase, float, float]:
    """One run: the idle phase, the loaded one, the load's requests/s and the CPUs' busy share."""
    echo, metrics = compare.free_port(), compare.free_port()
    with serving(echo, metrics, workers):
        idle = probe_for(metrics, seconds)
        command = [str(compare.BUILD / "echoload"), "tcp", f"127.0.0.1:{echo}", str(CONNECTIONS), str(SIZE)]
        load = subprocess.Popen([*command, str(seconds + 1)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # its connections open
        before = cpu_ticks()
        loaded = probe_for(metrics, seconds)
        after = cpu_ticks()
        out, _ = load.communicate(timeout=seconds + 30)
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    busy = (after[0] - before[0]) / max(1, after[1] - before[1])
    return idle, loaded, float(fields.get("rps", 0)), busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="of each phase (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="the echo listener's (default 2)")
    args = parser.parse_args()
    compare = load_generators()
    print(f"healthz: a probe every {INTERVAL * 1e3:g} ms; tcp-echo {CONNECTIONS} connections, workers={args.workers}")
    print(f"{'run':<5}{'phase':<8}{'probes':>7}{'not 200':>9}{'p50_ms':>9}{'p99_ms':>9}{'max_ms':>9}  load")
    p99s = []
    for number in range(1, args.runs + 1):
        idle, loaded, rps, busy = run(compare, args.seconds, args.workers)
        print(f"{number:<5}{'idle':<8}{idle.line()}", flush=True)
        print(f"{number:<5}{'loaded':<8}{loaded.line()}  {rps:.0f} req/s, CPUs {busy:.0%} busy", flush=True)
        p99s.append(sorted(loaded.times)[int(len(loaded.times) * 0.99)] * 1e3)
    print(f"loaded p99, median of the runs: {statistics.median(p99s):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

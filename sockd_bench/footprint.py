"""`make bench-footprint`: what sockd costs to run, in memory and in start-up time, on loopback.

Each measurement starts its own sockd as a service runs it (`python -P -m sockd -c FILE`, metrics
on), with a NOTIFY_SOCKET of its own, so READY=1 is seen the moment the supervisor sends it:

- matrix: one listener per protocol, model and handler (3 protocols, 5 models, 2 handlers: 30;
  busy_poll is left out, as it spins a core), each of which serves --requests connections
  (datagrams over UDP); then the memory of the supervisor and of every process below it, and the
  time from exec to READY=1.
- startup: --listeners asyncio tcp echo listeners: the time to READY=1, median of --runs runs,
  and their memory.

With each time to READY=1 comes the CPU time sockd's processes had used by then, which other
work on the machine lengthens far less (waiting for a CPU costs none; sharing its caches some).
- idle: one asyncio tcp echo listener holding 0, 2,000 and 8,000 idle connections, each of which
  has echoed a "ping" (as bench/compare.py's idle workload does). Bytes per connection
  are the slope of a least-squares line through the memory at each count: the heap sockd starts
  with is not per connection, so the total divided by the count would overstate it.

Memory is PSS (smaps_rollup), summed over the supervisor and all its descendants, found through
every process's parent in /proc: RSS would count the pages workers share once per worker, and
whatever process starts the workers, and wherever it sits below the supervisor, is counted.
PSS also shares a file's pages with every other process that maps the file (other Pythons), so
its anonymous part (the heaps: shared only by forking, within sockd's tree) is given as well, and
is the steadier figure. Start-up times take what CPU is left: the report gives how busy the CPUs
were just before it started, and figures from a busy machine do not compare with a quiet one's.

    .venv/bin/python -m sockd_bench.footprint [--runs 3] [SECTION ...]

Prints a table, then the same figures as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast, get_args

from sockd.config import ModelName, ProtocolName
from sockd.stdout import emit
from sockd_bench.client import RECV_SIZE, START_TIMEOUT, BenchError, Target, parse_target
from sockd_bench.report import warn
from sockd_bench.runner import HANDLERS, INTERRUPTED, POLL, json_object, stop

SECTIONS = ("matrix", "startup", "idle")
MODELS: tuple[ModelName, ...] = tuple(name for name in get_args(ModelName) if name != "busy_poll")
IDLE_COUNTS = (0, 2000, 8000)
# What the change to how workers start is judged by: matrix PSS (MiB), startup ready (s), and
# idle RSS per connection (B; "1.5 KB", read as 1,500 B).
TARGETS = {"matrix_pss_mib": 250.0, "startup_ready_s": 3.0, "idle_bytes_per_connection": 1500.0}
SETTLE = 0.5  # seconds between the last request and reading memory, as compare.py's idle waits
BATCH = 10  # matrix connections open at once: the threaded model has threads side by side
IO_TIMEOUT = 10.0  # seconds for any one socket operation
DESCRIPTORS_SPARE = 256  # beyond the idle connections: the interpreter's, the log, the listeners
MIB = 1 << 20
PAYLOAD = b"footprint"
LOOPBACK: dict[str, Any] = {"host": "127.0.0.1", "port": 0}  # a port the kernel picks; sockd logs it
ASYNCIO_ECHO: dict[str, Any] = {"protocol": "tcp", **LOOPBACK, "handler": "echo", "concurrency": "asyncio"}


# ---------------------------------------------------------------------------------------------
# A sockd and its memory


@dataclasses.dataclass(frozen=True)
class Running:
    pid: int
    ready_s: float  # from just before exec to READY=1
    cpu_s: float  # CPU time the processes had used by READY=1: less moved by a busy machine
    targets: dict[str, Target]  # by listener name, at the address sockd logged


@contextlib.contextmanager
def _sockd(label: str, listeners: list[dict[str, Any]], directory: Path) -> Iterator[Running]:
    """sockd on these listeners, started and ready; stopped with SIGTERM afterwards."""
    config = {
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": True, "port": 0},
        "listeners": listeners,
    }
    path = directory / f"{label}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = directory / f"{label}.log"
    notify_path = directory / f"{label}.notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        with log_path.open("w") as log:
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", "sockd", "-c", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,  # a file, not a pipe: sockd never blocks on a log line nobody reads
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                start_new_session=True,  # Ctrl-C is ours to handle: sockd gets its SIGTERM from stop()
            )
        try:
            # A second more per listener: room for a sockd whose workers each start an interpreter.
            deadline = started + START_TIMEOUT + len(listeners)
            ready_s = _await_ready(notify, process, deadline, label, log_path) - started
            cpu_s = _cpu_seconds(_tree(process.pid))
            yield Running(process.pid, ready_s, cpu_s, _targets(log_path, listeners, label))
        finally:
            # Found before the stop: once the supervisor is gone its workers are no longer below it.
            tree = _tree(process.pid)
            stop(process, label, START_TIMEOUT)
            _await_exit(tree, label)


def _await_exit(pids: list[int], label: str) -> None:
    """Until every process of a stopped sockd has exited: one still draining would share pages
    with the next sockd, lowering its PSS, and take CPU from its start."""
    deadline = time.monotonic() + START_TIMEOUT
    while left := [pid for pid in pids if _alive(pid)]:
        if time.monotonic() > deadline:
            warn(f"sockd ({label}): {len(left)} processes still running {START_TIMEOUT:g} s after it stopped")
            return
        time.sleep(POLL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie holds no memory, whoever is to reap it


def _await_ready(
    notify: socket.socket, process: subprocess.Popen[bytes], deadline: float, label: str, log_path: Path
) -> float:
    """When READY=1 arrived (time.monotonic())."""
    while (remaining := deadline - time.monotonic()) > 0:
        notify.settimeout(min(remaining, POLL))
        try:
            message = notify.recv(RECV_SIZE)
        except TimeoutError:
            if process.poll() is not None:
                lines = log_path.read_text(errors="replace").splitlines()
                said = "; ".join(line for line in lines[-3:] if line.strip()) or "nothing"
                raise BenchError(
                    f"sockd ({label}) exited with code {process.returncode} before READY=1: {said}"
                ) from None
            continue
        if "READY=1" in message.decode(errors="replace").splitlines():
            return time.monotonic()
    raise BenchError(f"sockd ({label}) sent no READY=1 in time (its log: {log_path})")


def _targets(log_path: Path, listeners: list[dict[str, Any]], label: str) -> dict[str, Target]:
    """Each listener's real address, from its "listening" log line (logged before READY=1)."""
    found: dict[str, Target] = {}
    protocols = {listener["name"]: listener["protocol"] for listener in listeners}
    for event in map(json_object, log_path.read_text(errors="replace").splitlines()):
        name = str(event.get("listener"))
        if event.get("event") == "listening" and name in protocols:
            found[name] = parse_target(f"{protocols[name]}://{event.get('address')}")
    if missing := protocols.keys() - found.keys():
        raise BenchError(f"sockd ({label}) logged no address for {', '.join(sorted(missing))}")
    return found


@dataclasses.dataclass(frozen=True)
class Memory:
    processes: int
    pss: int  # bytes, summed over the processes
    pss_anon: int
    rss: int
    supervisor_pss: int


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from every process's parent in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited since the listing
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # after the name, which may hold spaces
            children.setdefault(parent, []).append(int(entry.name))
    found = [root]
    for pid in found:  # grows as it goes: a breadth-first walk, finite as parents form a tree
        found.extend(children.get(pid, ()))
    return found


def _cpu_seconds(pids: list[int]) -> float:
    """User and system time of these processes, threads and reaped children included."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # exited since the walk
            total += sum(int(field) for field in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def _rollup(pid: int) -> tuple[int, int, int] | None:
    """(PSS, its anonymous part, RSS) in bytes; None for a process that has exited (a zombie has
    no mappings)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kib: dict[str, int] = {}
    for line in text.splitlines()[1:]:  # the first line is the address range
        key, _, value = line.partition(":")
        kib[key] = int(value.split()[0])
    if "Pss" not in kib:
        return None
    return kib["Pss"] * 1024, kib["Pss_Anon"] * 1024, kib["Rss"] * 1024


def _memory_of(supervisor: int) -> Memory:
    rollups = {pid: rollup for pid in _tree(supervisor) if (rollup := _rollup(pid)) is not None}
    return Memory(
        processes=len(rollups),
        pss=sum(pss for pss, _, _ in rollups.values()),
        pss_anon=sum(anon for _, anon, _ in rollups.values()),
        rss=sum(rss for _, _, rss in rollups.values()),
        supervisor_pss=rollups[supervisor][0] if supervisor in rollups else 0,
    )


# ---------------------------------------------------------------------------------------------
# The clients


def _answer_ok(handler: str, reply: bytes) -> bool:
    return reply == PAYLOAD if handler == "echo" else bool(reply)


def _serve_requests(target: Target, handler: str, count: int) -> None:
    """`count` requests answered by the listener at `target`: each a connection over a stream
    (send, half-close, read to EOF, as the seed's clients do), BATCH at a time; over UDP, datagrams."""
    deadline = time.monotonic() + count * IO_TIMEOUT
    if target.protocol == "udp":
        with socket.socket(target.family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect(target.address)
            for _ in range(count):
                sock.send(PAYLOAD)
                if not _answer_ok(handler, reply := sock.recv(RECV_SIZE)):
                    raise BenchError(f"{target.url} ({handler}) answered {reply!r}")
        return
    for first in range(0, count, BATCH):
        with contextlib.ExitStack() as open_now:
            batch = [open_now.enter_context(socket.socket(target.family)) for _ in range(min(BATCH, count - first))]
            for sock in batch:
                sock.settimeout(IO_TIMEOUT)
                sock.connect(target.address)
                sock.sendall(PAYLOAD)
                sock.shutdown(socket.SHUT_WR)
            for sock in batch:
                if not _answer_ok(handler, reply := _read_to_eof(sock, deadline)):
                    raise BenchError(f"{target.url} ({handler}) answered {reply!r}")


def _read_to_eof(sock: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise BenchError("a reply did not end in time")


def _hold_idle(target: Target, held: contextlib.ExitStack, count: int) -> None:
    """A connection, kept open in `held`, that has had one "ping" echoed, then sits idle."""
    for _ in range(count):
        sock = held.enter_context(socket.socket(target.family))
        sock.settimeout(IO_TIMEOUT)
        sock.connect(target.address)
        sock.sendall(b"ping")
        if sock.recv(16) != b"ping":
            raise BenchError(f"{target.url}: an idle connection's ping did not come back")


def _raise_descriptor_limit(needed: int) -> None:
    """Enough descriptors for the idle connections, here and in sockd (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"the idle run needs {needed} descriptors and the hard limit is {hard} (see `prlimit -n`)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# ---------------------------------------------------------------------------------------------
# The three measurements


def matrix(directory: Path, models: tuple[ModelName, ...], requests: int) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = []
    for protocol in get_args(ProtocolName):
        for model in models:
            for handler in HANDLERS:
                # Numbered Unix paths: a name would make them long, and they have at most 107 bytes.
                where = {"path": str(directory / f"{len(listeners)}.sock")} if protocol == "unix" else LOOPBACK
                name = f"{protocol}-{model}-{handler}"
                listeners.append(
                    {"name": name, "protocol": protocol, "handler": handler, "concurrency": model, **where}
                )
    with _sockd("matrix", listeners, directory) as running:
        for listener in listeners:
            _serve_requests(running.targets[listener["name"]], listener["handler"], requests)
        time.sleep(SETTLE)
        memory = _memory_of(running.pid)
    return {
        "listeners": len(listeners),
        "models": list(models),
        "requests_per_listener": requests,
        "ready_s": round(running.ready_s, 3),
        "cpu_s_to_ready": round(running.cpu_s, 2),
        "processes": memory.processes,
        "pss_mib": round(memory.pss / MIB, 1),
        "pss_per_process_mib": round(memory.pss / memory.processes / MIB, 2),
        "pss_anon_mib": round(memory.pss_anon / MIB, 1),
        "supervisor_pss_mib": round(memory.supervisor_pss / MIB, 1),
        "rss_mib": round(memory.rss / MIB, 1),
    }


def startup(directory: Path, count: int, runs: int) -> dict[str, Any]:
    listeners = [{"name": f"echo-{index}", **ASYNCIO_ECHO} for index in range(count)]
    ready: list[float] = []
    cpu: list[float] = []
    memories: list[Memory] = []
    for run in range(runs):
        with _sockd(f"startup-{run}", listeners, directory) as running:
            ready.append(running.ready_s)
            cpu.append(running.cpu_s)
            time.sleep(SETTLE)
            memories.append(_memory_of(running.pid))
    return {
        "listeners": count,
        "runs": runs,
        "ready_s_median": round(statistics.median(ready), 3),
        "ready_s": [round(seconds, 3) for seconds in ready],
        "cpu_s_to_ready_median": round(statistics.median(cpu), 2),
        "processes": max(memory.processes for memory in memories),
        "pss_mib_median": round(statistics.median(memory.pss for memory in memories) / MIB, 1),
        "pss_mib": [round(memory.pss / MIB, 1) for memory in memories],
        "pss_anon_mib_median": round(statistics.median(memory.pss_anon for memory in memories) / MIB, 1),
    }


def idle(directory: Path, counts: tuple[int, ...]) -> dict[str, Any]:
    _raise_descriptor_limit(max(counts) + DESCRIPTORS_SPARE)
    memories: list[Memory] = []
    with _sockd("idle", [{"name": "idle", **ASYNCIO_ECHO}], directory) as running, contextlib.ExitStack() as held:
        target = running.targets["idle"]
        # One connection served and closed first: what the first one loads or allocates once is
        # start-up, and would otherwise land between 0 and the next count.
        _serve_requests(target, "echo", 1)
        opened = 0
        for count in counts:
            _hold_idle(target, held, count - opened)
            opened = count
            time.sleep(SETTLE)
            memories.append(_memory_of(running.pid))
    return {
        "connections": list(counts),
        "rss_bytes": [memory.rss for memory in memories],
        "pss_bytes": [memory.pss for memory in memories],
        "pss_anon_bytes": [memory.pss_anon for memory in memories],
        "rss_bytes_per_connection": _slope(counts, [memory.rss for memory in memories]),
        "pss_bytes_per_connection": _slope(counts, [memory.pss for memory in memories]),
        "pss_anon_bytes_per_connection": _slope(counts, [memory.pss_anon for memory in memories]),
    }


def _slope(counts: tuple[int, ...], values: list[int]) -> float:
    return round(statistics.linear_regression(counts, values).slope, 1)


# ---------------------------------------------------------------------------------------------
# The report and the command line


def _against(value: float, target: float, unit: str) -> str:
    return f"(target ≤ {target:,g} {unit}: {'met' if value <= target else 'over'})"


def table(report: dict[str, Any]) -> str:
    """The report as a person reads it: a block per section, one figure a line."""
    machine = report["machine"]
    blocks = [f"machine: {machine['cpus']} CPUs, {machine['cpu_busy_before']:.0%} busy in the second before"]
    if found := report.get("matrix"):
        rows: list[tuple[str, object]] = [
            ("ready", f"{found['ready_s']:.3f} s"),
            ("CPU to ready", f"{found['cpu_s_to_ready']:.2f} s"),
            ("processes", found["processes"]),
            ("PSS", f"{found['pss_mib']:,.1f} MiB {_against(found['pss_mib'], TARGETS['matrix_pss_mib'], 'MiB')}"),
            ("PSS/process", f"{found['pss_per_process_mib']:,.2f} MiB"),
            ("PSS anonymous", f"{found['pss_anon_mib']:,.1f} MiB"),
            ("supervisor PSS", f"{found['supervisor_pss_mib']:,.1f} MiB"),
            ("RSS", f"{found['rss_mib']:,.1f} MiB"),
        ]
        caption = (
            f"matrix: {found['listeners']} listeners ({', '.join(get_args(ProtocolName))};"
            f" {', '.join(found['models'])};"
            f" {', '.join(HANDLERS)}), {found['requests_per_listener']} requests each"
        )
        blocks.append(_block(caption, rows))
    if found := report.get("startup"):
        runs = ", ".join(f"{seconds:.3f}" for seconds in found["ready_s"])
        sizes = ", ".join(f"{mib:,.1f}" for mib in found["pss_mib"])
        median = found["ready_s_median"]
        rows = [
            ("ready (median)", f"{median:.3f} s ({runs}) {_against(median, TARGETS['startup_ready_s'], 's')}"),
            ("CPU to ready", f"{found['cpu_s_to_ready_median']:.2f} s (median)"),
            ("processes", found["processes"]),
            ("PSS (median)", f"{found['pss_mib_median']:,.1f} MiB ({sizes})"),
            ("PSS anon (med.)", f"{found['pss_anon_mib_median']:,.1f} MiB"),
        ]
        blocks.append(_block(f"startup: {found['listeners']} asyncio tcp echo listeners, {found['runs']} runs", rows))
    if found := report.get("idle"):
        slope = found["rss_bytes_per_connection"]
        rows = [
            ("connections", "  ".join(f"{count:>9,}" for count in found["connections"])),
            ("RSS (MiB)", "  ".join(f"{size / MIB:>9,.1f}" for size in found["rss_bytes"])),
            ("PSS (MiB)", "  ".join(f"{size / MIB:>9,.1f}" for size in found["pss_bytes"])),
            ("PSS anon (MiB)", "  ".join(f"{size / MIB:>9,.1f}" for size in found["pss_anon_bytes"])),
            ("RSS/connection", f"{slope:,.1f} B {_against(slope, TARGETS['idle_bytes_per_connection'], 'B')}"),
            ("PSS/connection", f"{found['pss_bytes_per_connection']:,.1f} B"),
            ("PSS anon/conn.", f"{found['pss_anon_bytes_per_connection']:,.1f} B"),
        ]
        blocks.append(_block("idle: one asyncio tcp echo listener; per connection: the slope of a line fit", rows))
    return "\n\n".join(blocks)


def _block(caption: str, rows: list[tuple[str, object]]) -> str:
    return "\n".join([caption, *(f"  {name:<16} {value}" for name, value in rows)])


def _cpu_busy() -> float:
    """The share of all CPUs' time that went to anything but idling, over one second (/proc/stat)."""

    def sample() -> tuple[int, int]:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, and idle with iowait

    total, idle = sample()
    time.sleep(1)
    total_after, idle_after = sample()
    return round(1 - (idle_after - idle) / max(total_after - total, 1), 3)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if len(counts) < 2 or counts[0] < 0 or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError("at least two different counts, rising, from 0 up")
    return counts


def _models(text: str) -> tuple[ModelName, ...]:
    names = tuple(text.split(","))
    if unknown := [name for name in names if name not in get_args(ModelName)]:
        raise argparse.ArgumentTypeError(f"unknown model: {', '.join(unknown)}")
    return cast(tuple[ModelName, ...], names)  # each checked against ModelName above


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number above 0: {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"{', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--requests", type=_positive, default=100, help="matrix: per listener (default 100)")
    parser.add_argument("--models", type=_models, default=MODELS, help=f"matrix (default {','.join(MODELS)})")
    parser.add_argument("--listeners", type=_positive, default=100, help="startup (default 100)")
    parser.add_argument("--runs", type=_positive, default=3, help="startup: the median of (default 3)")
    parser.add_argument("--idle", type=_counts, default=IDLE_COUNTS, metavar="N,N,...", help="(default 0,2000,8000)")
    args = parser.parse_args(argv)
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"unknown section: {', '.join(sorted(unknown))}")
    runs: dict[str, Callable[[Path], dict[str, Any]]] = {
        "matrix": lambda directory: matrix(directory, args.models, args.requests),
        "startup": lambda directory: startup(directory, args.listeners, args.runs),
        "idle": lambda directory: idle(directory, args.idle),
    }
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "cpu_busy_before": _cpu_busy()}}
    # A short directory under /tmp: Unix socket paths have at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="fp", dir="/tmp"))
    try:
        for name in args.sections or SECTIONS:
            report[name] = runs[name](directory)
    except BenchError as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    emit(table(report))
    emit(json.dumps({**report, "targets": TARGETS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

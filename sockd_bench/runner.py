"""The command line of `sockd bench` (and of `sockd-bench`), a closed-loop load generator for one's
own sockd, as redis-benchmark is for Redis: its options and their checks, the load on one target,
and `--models`, which starts sockd once per concurrency model and runs the same load on each."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

from sockd.config import HandlerName, ModelName, ProtocolName
from sockd.stdout import emit
from sockd_bench.client import START_TIMEOUT, UDP_MAX, BenchError, Load, Mode, Target, measure, parse_target
from sockd_bench.report import models_table, summary, table, verdict, warn

# --models's handlers, a subset of the config's: echo for mode echo, timestamp for mode connect.
HANDLERS: tuple[HandlerName, ...] = ("echo", "timestamp")
POLL = 0.05  # seconds between looks at a starting sockd's log
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


# ---------------------------------------------------------------------------------------------
# --models: a sockd per concurrency model


@contextlib.contextmanager
def _serving(
    model: ModelName, protocol: ProtocolName, handler: HandlerName, delay: float, directory: Path
) -> Iterator[Target]:
    """sockd serving one listener under `model`, on a port the kernel picks or a new Unix path;
    stopped with SIGTERM afterwards."""
    where: dict[str, object] = (
        {"path": str(directory / f"{model}.sock")} if protocol == "unix" else {"host": "127.0.0.1", "port": 0}
    )
    config = {
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": True, "port": 0},
        "shutdown_timeout": delay + 1,
        # A blocking model's heartbeat pauses while a thread sleeps through `delay`: room for it.
        "worker_timeout": max(30.0, 4 * delay),
        "listeners": [
            {"name": "bench", "protocol": protocol, "handler": handler, "concurrency": model, "delay": delay, **where}
        ],
    }
    path = directory / f"{model}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = directory / f"{model}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "sockd", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,  # a file, not a pipe: sockd never blocks on a log line nobody reads
            start_new_session=True,  # Ctrl-C is ours to handle: sockd gets its SIGTERM below
        )
    try:
        address = _await_listening(process, log_path, model)
        yield parse_target(f"{protocol}://{address}")
    finally:
        stop(process, model, delay + 1 + START_TIMEOUT)


def _await_listening(process: subprocess.Popen[bytes], log_path: Path, model: ModelName) -> str:
    """The address sockd logs for its listener, once it has logged that it is ready."""
    for _ in range(round(START_TIMEOUT / POLL)):
        lines = log_path.read_text(errors="replace").splitlines()
        address = None
        for event in map(json_object, lines):
            if event.get("event") == "listening":
                address = event.get("address")
            elif event.get("event") == "ready" and address is not None:
                return str(address)
        if process.poll() is not None:
            said = "; ".join(line for line in lines[-3:] if line.strip()) or "nothing"
            raise BenchError(f"sockd ({model}) exited with code {process.returncode} before it was ready: {said}")
        time.sleep(POLL)
    raise BenchError(f"sockd ({model}) was not ready within {START_TIMEOUT:g} s (its log: {log_path})")


def json_object(line: str) -> dict[str, Any]:
    """A JSON log line as a dict; {} for anything else (a line that is not JSON, or not an object)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def stop(process: subprocess.Popen[bytes], label: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is not gone within `timeout`; warns unless it exited 0."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # its workers exit by themselves when their supervisor is gone
        code = process.wait(timeout)
    if code != 0:
        warn(f"sockd ({label}) exited with code {code} when stopped")


def _run_models(args: argparse.Namespace) -> int:
    protocol: ProtocolName = args.protocol or "tcp"
    handler: HandlerName = args.handler or "echo"
    delay: float = args.delay or 0.0
    # A timestamp server answers once and closes: a request per connection, except over UDP.
    mode: Mode = "connect" if handler == "timestamp" and protocol != "udp" else "echo"
    reports: list[dict[str, Any]] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="sockd-models-") as directory:
        for model in get_args(ModelName):
            with _serving(model, protocol, handler, delay, Path(directory)) as target:
                load = Load(
                    target,
                    mode,
                    args.connections,
                    args.size,
                    args.duration,
                    args.processes,
                    args.timeout or (1.0 + delay),
                    check_echo=handler == "echo",
                )
                tally = measure(load, f"{model}: ")
            reports.append({"model": model, **summary(load, tally)})
            status = max(status, verdict(load, tally, f"{model}: "))
    if args.json:
        emit(json.dumps(reports))
    else:
        caption = (
            f"{protocol} {handler} (mode {mode}), delay {delay:g} s: {args.connections} connections, "
            f"{args.size} bytes, {args.duration:g} s per model, {min(args.processes, args.connections)} processes"
        )
        emit(models_table(caption, reports))
    return status


# ---------------------------------------------------------------------------------------------
# The command line


def _count(high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from 1 to {high}")
        return value

    return convert


def _seconds(high: float, zero: bool = False) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (value >= 0 if zero else value > 0) or value > high:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be {'at least 0' if zero else 'above 0'} and at most {high:g}")
        return value

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockd bench",
        description="Measure a sockd on this machine: closed-loop requests over many connections, "
        "from one client process per core; requests per second and latency percentiles.",
        epilog="Exit status: 0, 1 when not one request succeeded, 2 for a usage error.",
    )
    parser.add_argument("target", nargs="?", help="tcp://HOST:PORT, tcp://[::1]:PORT, udp://HOST:PORT or unix:///PATH")
    parser.add_argument(
        "--mode",
        choices=get_args(Mode),
        help="echo (default): each connection sends SIZE bytes, waits for them to come back, again; "
        "connect: a connection per request (connect, send, half-close, read to EOF), tcp and unix only",
    )
    parser.add_argument(
        "--connections",
        type=_count(100_000),
        default=50,
        metavar="N",
        help="(default 50; those the server never answers are reported as unanswered)",
    )
    parser.add_argument("--size", type=_count(1 << 24), default=64, metavar="BYTES", help="(default 64)")
    parser.add_argument("--duration", type=_seconds(86400), default=10.0, metavar="SECONDS", help="(default 10)")
    parser.add_argument(
        "--processes",
        type=_count(1024),
        default=os.cpu_count() or 1,
        metavar="N",
        help="client processes (default: one per core)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds(3600),
        metavar="SECONDS",
        help="UDP: a reply not back by then is lost: an error, and the request is sent again "
        "(default 1, plus --delay with --models)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list with --models)")
    models = parser.add_argument_group("--models: start sockd once per concurrency model and compare them")
    models.add_argument("--models", action="store_true", help="instead of a target")
    models.add_argument("--protocol", choices=get_args(ProtocolName), help="(default tcp)")
    models.add_argument("--handler", choices=HANDLERS, help="echo (default; mode echo) or timestamp (mode connect)")
    models.add_argument(
        "--delay", type=_seconds(3600, zero=True), metavar="SECONDS", help="the listener's simulated work (default 0)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """`sockd bench ARGV`; returns the exit status (argparse exits 2 by itself on a usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.models:
            _check_models_usage(parser, args)
            return _run_models(args)
        return _run_one(args, _check_usage(parser, args))
    except BenchError as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED


def cli() -> int:
    """The `sockd-bench` console script: `sockd bench` under a name of its own."""
    return main(sys.argv[1:])


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Target:
    given = [f"--{name}" for name in ("protocol", "handler", "delay") if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)}: only with --models")
    if args.target is None:
        parser.error("a target is required (tcp://HOST:PORT, udp://HOST:PORT, unix:///PATH), or --models")
    try:
        target = parse_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if args.mode == "connect" and target.protocol == "udp":
        parser.error("--mode connect needs a stream (tcp or unix): UDP has no connection to open; use --mode echo")
    _check_size(parser, target.protocol, args.size)
    return target


def _check_models_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.target is not None:
        parser.error("--models starts its own sockd: give no target")
    if args.mode is not None:
        parser.error("--models takes the mode from --handler: echo for echo, connect for timestamp")
    _check_size(parser, args.protocol or "tcp", args.size)


def _check_size(parser: argparse.ArgumentParser, protocol: ProtocolName, size: int) -> None:
    if protocol == "udp" and size > UDP_MAX:
        parser.error(f"--size: at most {UDP_MAX} bytes over UDP (one datagram)")


def _run_one(args: argparse.Namespace, target: Target) -> int:
    load = Load(
        target,
        args.mode or "echo",
        args.connections,
        args.size,
        args.duration,
        args.processes,
        args.timeout or 1.0,
        check_echo=True,
    )
    tally = measure(load)
    report = summary(load, tally)
    emit(json.dumps(report) if args.json else table(report))
    return verdict(load, tally)

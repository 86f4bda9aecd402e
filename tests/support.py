"""What the tests share, as a plain module (`from support import ...`; conftest.py holds only the
fixtures): the real daemon as a subprocess, short Unix socket paths, loopback clients, metrics, and
config files checked in-process as `sockd --check` checks them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sockd.config import RELAYING_MODELS, Config, ConfigError, ModelName, load

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0  # seconds any single wait in a test may take before it fails
MODELS: list[str] = list(get_args(ModelName))  # every concurrency model, in the order sockd declares them
RELAY_MODELS: list[str] = list(RELAYING_MODELS)  # two sockets a client
# The asyncio model once more on the standard library's loop (uvloop is the default): a model
# name of the tests' own, which model_options turns into the config's.
STDLIB_LOOP = "asyncio-stdlib-loop"
PUBLISHED_WITHIN = 10.0  # seconds to wait for workers' counts to reach the endpoint
# What an old worker logs once it accepts no more: its retirement taken (at debug level), or its exit.
RETIRED_OR_EXITED = ("retired: serving the open connections on", "worker exited")


def require(program: str) -> str:
    """The path of an external program a test needs: skipped on a developer machine without it,
    a failure in CI, where .ci/run installs everything (so nothing is silently not tested)."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed; .ci/run should have installed it")
        pytest.skip(f"{program} is not installed")
    return path


def model_options(model: str) -> tuple[str, dict[str, Any]]:
    """A model name of the tests' (STDLIB_LOOP too) as a listener's `concurrency` and options."""
    return ("asyncio", {"event_loop": "asyncio"}) if model == STDLIB_LOOP else (model, {})


def sockd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sockd", *args]


def run_sockd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command of sockd that exits by itself (--check, --schema, a failing start)."""
    return subprocess.run(sockd_command(*args), capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Daemon:
    """A running `sockd -c FILE`, with its stderr JSON log lines collected as they come."""

    process: subprocess.Popen[str]
    config_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    other_lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def start_reading(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    self.other_lines.append(line)
                self._changed.notify_all()

    def wait_for(
        self, event: str | tuple[str, ...], timeout: float = TIMEOUT, after: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first log event named `event` (or any of several names) from index `after` on whose
        fields match `fields`."""
        names = (event,) if isinstance(event, str) else event
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for entry in self.events[after:]:
                    if entry.get("event") in names and all(entry.get(k) == v for k, v in fields.items()):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._pending()):
                    raise AssertionError(f"no {event!r} {fields} in the log: {self.events}{self.other_lines}")
                self._changed.wait(min(remaining, 0.1))

    def _pending(self) -> bool:
        return self.process.stderr is not None and not self.process.stderr.closed

    def address(self, listener: str) -> str:
        return str(self.wait_for("listening", listener=listener)["address"])

    def worker_pid(self, listener: str, after: int = 0) -> int:
        return int(self.wait_for("worker started", listener=listener, after=after)["pid"])

    def worker_pids(self, listener: str) -> list[int]:
        """Every worker ever started for a listener, oldest first (its "worker started" lines)."""
        with self._changed:
            started = [e for e in self.events if e.get("event") == "worker started" and e.get("listener") == listener]
        return [int(e["pid"]) for e in started]

    def write_config(self, listeners: list[dict[str, Any]], **settings: Any) -> None:
        """Replace the config file it was started with (it takes it up at the next SIGHUP), as
        the README asks: a new file renamed over the old, so a HUP never finds it half written."""
        new = self.config_path.with_suffix(".new")
        new.write_text(config_text(listeners, **settings))
        new.replace(self.config_path)

    def reload(self, listeners: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
        """Write a new config, send SIGHUP and return the "reloaded" event (its plan), once every
        listener it restarted or moved is served by its new workers alone: each old worker has taken
        its retirement (it accepts no more), or has exited."""
        self.write_config(listeners, **settings)
        mark = len(self.events)
        self.process.send_signal(signal.SIGHUP)
        plan = self.wait_for("reloaded", after=mark, timeout=30)
        for name in [*plan.get("restarted", []), *plan.get("rebound", [])]:
            replaced = self.wait_for("replaced", listener=name, after=mark, timeout=30)
            for pid in replaced["retired"]:
                self.wait_for(RETIRED_OR_EXITED, pid=pid, after=mark, timeout=30)
        return plan

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback TCP port held by a client connection alone, no server on it, until the block
    ends: sockd's start waits to bind it (see sockd.bind_retry), which holds sockd with
    its modules imported and its signals caught, before anything serves. The connection is then
    reset (SO_LINGER 0: no TIME-WAIT), and sockd binds the port within a retry."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as client:
        client.bind(("127.0.0.1", 0))  # no SO_REUSEADDR: sockd's bind conflicts with it
        client.connect(server.getsockname())
        try:
            yield client.getsockname()[1]
        finally:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# What sockd logs while it waits for a held port (see held_port).
WAITING_FOR_CONNECTIONS = "address in use by connections, not a server: waiting for them to end"


@contextlib.contextmanager
def short_directory() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sk", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# What systemd hands a service: a test sets the ones it means, and none leaks in from outside.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def config_text(listeners: list[dict[str, Any]], **settings: Any) -> str:
    """A config file for tests: debug JSON logs, and metrics on a port of the kernel's choosing
    so that daemons of parallel tests never collide."""
    config = {"logging": {"level": "debug", "format": "json"}, "metrics": {"port": 0}, **settings}
    return yaml.safe_dump({**config, "listeners": listeners})


class Launcher:
    """Starts daemons on configs written into `directory`; `finish` stops the ones still running,
    which must exit 0, and fails on any traceback a daemon printed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Daemon] = []

    def __call__(
        self,
        listeners: list[dict[str, Any]],
        wait: bool = True,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        program: tuple[str, ...] = (),
        **settings: Any,
    ) -> Daemon:
        """Start `sockd -c` on these listeners and top-level settings, with `env` added to the
        environment and `prefix` before the command (e.g. systemd-socket-activate); wait until
        it is ready. `program` is another sockd than this environment's (an installed one)."""
        path = self.directory / f"sockd-{len(self.started)}.yaml"
        path.write_text(config_text(listeners, **settings))
        environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        process = subprocess.Popen(
            [*prefix, *(program or sockd_command()), "-c", str(path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**environment, **(env or {})},
            start_new_session=True,  # its own process group, as a terminal would give it
        )
        daemon = Daemon(process, path)
        daemon.start_reading()
        self.started.append(daemon)
        if wait:
            daemon.wait_for("ready", timeout=30)
        return daemon

    def finish(self) -> None:
        """Stop every daemon it started, then check how each ended: a failure with one must not
        leave the others running."""
        codes = [daemon.stop() if daemon.process.poll() is None else 0 for daemon in self.started]
        for daemon, code in zip(self.started, codes, strict=True):
            assert code == 0, daemon.other_lines
            assert not any("Traceback" in line for line in daemon.other_lines), "".join(daemon.other_lines)


StartSockd = Launcher


def listener(
    name: str, protocol: str, handler: str, concurrency: str, where: str | Path = "127.0.0.1", **options: Any
) -> dict[str, Any]:
    """One listener's config: `where` is a host for tcp/udp (port 0) and a path for unix."""
    entry: dict[str, Any] = {"name": name, "protocol": protocol, "handler": handler, "concurrency": concurrency}
    entry.update({"path": str(where)} if protocol == "unix" else {"host": str(where), "port": 0})
    entry.update(options)
    return entry


def connect(address: str, timeout: float = TIMEOUT) -> socket.socket:
    """A stream connection to a listener's logged address: host:port, [v6]:port or a path."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    return socket.create_connection(inet(address), timeout=timeout)


def inet(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def listen_backlog(address: str) -> int:
    """The backlog of the socket listening at a listener's logged address (host:port or a Unix
    socket path), as the kernel holds it: ss(8) shows it as a listening socket's Send-Q."""
    query = ["-Hlx", "src", address] if address.startswith("/") else ["-Hltn", f"sport = :{inet(address)[1]}"]
    shown = subprocess.run([require("ss"), *query], capture_output=True, text=True, check=True, timeout=TIMEOUT)
    (line,) = shown.stdout.splitlines()
    fields = line.split()
    return int(fields[fields.index("LISTEN") + 2])  # State, Recv-Q, Send-Q


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def request(address: str, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read everything the server sends until it closes."""
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def datagram(address: str, payload: bytes, timeout: float = TIMEOUT) -> bytes:
    host, port = inet(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        reply, sender = sock.recvfrom(65536)
        assert sender[:2] == (host, port)
        return reply


@contextlib.contextmanager
def squatting(protocol: str) -> Iterator[str]:
    """A loopback port held by someone else, as a listener address."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def scrape(daemon: Daemon, path: str = "/metrics") -> str:
    address = daemon.wait_for("metrics")["address"]
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        return str(response.read().decode())


def samples(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scrape(daemon))
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def rejected(daemon: Daemon, name: str, reason: str) -> float:
    return value(samples(daemon), "sockd_connections_rejected_total", listener=name, reason=reason)


def requests(daemon: Daemon, name: str) -> float:
    return value(samples(daemon), "sockd_requests_total", listener=name)


def forge_datagram(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> None:
    """Send a UDP datagram over IPv4 that claims to come from `source`, any address and port, as
    an attacker would (CVE-1999-0103): a raw socket, so root only. The IP header's length and
    checksum are left to the kernel; the UDP checksum is 0, which IPv4 reads as none."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, a 20-byte header
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source[0]),
        socket.inet_aton(destination[0]),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:  # IP_HDRINCL implied
        raw.sendto(ip + udp, (destination[0], 0))


def eventually(check: Callable[[], bool], what: str, timeout: float = PUBLISHED_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------------------------------------
# Config files, checked in-process: `sockd --check -c FILE` prints `FILE: OK, N listeners`, or
# exactly ConfigError.problems of sockd.config.load(FILE), one per line, and exits 78 (test_cli.py
# pins that contract with the real command; the config tests read the same lines from `load`).

Expected = tuple[int, str, str]  # (line, field, message)

# One problem of a file shown as "c.yaml" (as `parse(text, "c.yaml")` names it), any problem.
PROBLEM = re.compile(
    r"c\.yaml:(?P<line>\d+): (?:"
    r"[^\n]+: [^\n]+"  # field: message
    r"|invalid YAML: [^\n]+"
    r"|the file must be a mapping with a `listeners` list"
    r")"
)


def yaml_text(text: str) -> str:
    """A test's YAML literal as a file: dedented, line 1 the first line after the opening quotes."""
    return textwrap.dedent(text).lstrip("\n")


def write_config(directory: Path, text: str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml_text(text))
    return path


def check(path: Path) -> tuple[Config | None, list[str]]:
    """What `sockd --check -c path` decides, in-process: (the config, []) or (None, the problems).
    Loading must print nothing and warn nothing, as the command's output is only its verdict; any
    other exception than ConfigError (the command's traceback) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("error")
        try:
            config = load(path)
        except ConfigError as exc:
            config, problems = None, exc.problems
        else:
            problems = []
    assert (out.getvalue(), err.getvalue()) == ("", "")
    return config, problems


def stderr_of(problems: list[str]) -> str:
    """The command's stderr for these problems (sockd.cli prints them joined by newlines)."""
    return "\n".join(problems) + "\n"


def assert_rejected(directory: Path, text: str, *expected: Expected) -> None:
    """Rejected with exactly the expected `FILE:LINE: FIELD: message` lines, in line-number order."""
    path = write_config(directory, text)
    config, problems = check(path)
    assert config is None
    assert problems == [f"{path}:{line}: {field}: {message}" for line, field, message in sorted(expected)]


def assert_rejected_raw(directory: Path, text: str, *lines: str) -> None:
    """Like `assert_rejected`, for the lines with no field: `{path}` in `lines` is the file."""
    path = write_config(directory, text)
    config, problems = check(path)
    assert config is None
    assert problems == [line.format(path=path) for line in lines]


def assert_accepted(directory: Path, text: str, listeners: int) -> None:
    config, problems = check(write_config(directory, text))
    assert problems == []
    assert config is not None
    assert len(config.listeners) == listeners


# ---------------------------------------------------------------------------------------------
# Persistent sessions and the processes that hold them: what a reload's old generation serves.


class SessionEnded(AssertionError):
    """The server ended a session's input (EOF) before the whole reply came back."""


class Session:
    """A persistent stream connection doing request/response on an echo (or a relay to one):
    every payload is unique, and every reply is read in full and compared byte for byte."""

    def __init__(self, address: str, name: str, timeout: float = TIMEOUT) -> None:
        self.name = name
        self.sock = connect(address, timeout=timeout)
        self.exchanges = 0

    def payload(self, size: int) -> bytes:
        head = f"{self.name}#{self.exchanges}|".encode()
        body = bytes((self.exchanges + i) % 251 for i in range(max(0, size - len(head))))
        return head + body

    def exchange(self, size: int = 64) -> None:
        """One request and its whole reply: SessionEnded at an EOF, AssertionError if the reply
        differs, OSError (a reset, a timeout) as the socket raises it."""
        payload = self.payload(size)
        self.sock.sendall(payload)
        reply = recv_exactly(self.sock, len(payload))
        if len(reply) < len(payload) and payload.startswith(reply):
            raise SessionEnded(f"{self.name}: EOF after {self.exchanges} replies and {len(reply)} bytes of the next")
        if reply != payload:
            raise AssertionError(f"{self.name}: sent {payload[:40]!r}…, got {reply[:40]!r}…")
        self.exchanges += 1

    def state(self) -> str:
        """Without sending anything: "open", "eof" (the server closed it) or "reset"."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)  # non-blocking: with a timeout, Python would wait for data
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return "open"
        except ConnectionResetError:
            return "reset"
        finally:
            self.sock.settimeout(timeout)
        return "eof" if data == b"" else f"unexpected {data!r}"

    def close(self) -> None:
        self.sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer if the peer ends its output first."""
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def live_workers(daemon: Daemon, listener: str) -> list[int]:
    """The listener's workers that are alive now, oldest first."""
    return [pid for pid in daemon.worker_pids(listener) if alive(pid)]


def _proc_net_address(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp spells it: the address in host byte order, in hex."""
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, sys.byteorder):08X}:{port:04X}"


def server_inode(local: tuple[str, int], remote: tuple[str, int]) -> str | None:
    """The socket inode of the server's end of the loopback IPv4 TCP connection from `local` to
    `remote` (as the client's getsockname and getpeername say): None if the kernel has no such
    end, "0" if it has but no process holds it (closed by the server, its FIN still in flight)."""
    client, server = _proc_net_address(*local), _proc_net_address(*remote)
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == server and fields[2] == client:  # the server's end: the mirror image
            inode = fields[9]
    return inode


def tcp_owner(client: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the server's end of a loopback IPv4 TCP connection (None: none)."""
    inode = server_inode(client.getsockname()[:2], client.getpeername()[:2])
    if inode is None:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None

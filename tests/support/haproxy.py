"""The real HAProxy (Debian's 2.6) in a test: `haproxy` runs it in the foreground (-db) with the
test's config, handed the sockets the test made if it wants (`bind fd@N`: no port to race other
tests for, and clients queue on them until HAProxy accepts), until the block ends; and it reads
a server's state from the stats socket. `balancer` is the common case: `mode tcp`, one frontend on
such a socket, one server, a sockd listener, sent the PROXY header (`send-proxy` for v1,
`send-proxy-v2`) and whatever else the test asks; `accepting_proxy` the other way round: behind a
sockd relay, reading the header the relay sends (`accept-proxy`) and logging the client it
learnt."""

from __future__ import annotations

import contextlib
import csv
import itertools
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from support.daemon import require
from support.net import read_to_eof
from support.waits import TIMEOUT, eventually

SEND_PROXY = {"v1": "send-proxy", "v2": "send-proxy-v2"}

_RUNS = itertools.count()  # names each run's files apart, for a test that runs more than one


class HAProxy:
    """A running HAProxy: what its config logs to stdout (`log stdout`), a line at a time as it
    comes, in `logged`; what it says itself (alerts, warnings, servers going up and down) in
    `output()`; the servers' states from its stats socket, if the config has one."""

    def __init__(self, process: subprocess.Popen[str], errors: Path, stats: Path | None) -> None:
        self.process = process
        self.errors = errors
        self.stats = stats
        self.logged: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout or ():
            self.logged.put(line.rstrip("\n"))

    def output(self) -> str:
        """What it said on stderr so far; all it said once the `haproxy` block has ended."""
        return self.errors.read_text()

    def ask(self, command: str) -> str:
        """The stats socket's answer to a runtime API command."""
        assert self.stats is not None, "the config has no stats socket"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(self.stats))
            sock.sendall(f"{command}\n".encode())
            return read_to_eof(sock).decode()

    def status(self, server: str) -> str:
        """`backend/server`'s status as `show stat` says it: UP, DOWN, "UP 1/2" (going down),
        MAINT, "DRAIN (agent)"..."""
        backend, name = server.split("/")
        rows = csv.DictReader(self.ask("show stat").removeprefix("# ").splitlines())
        for row in rows:
            if (row["pxname"], row["svname"]) == (backend, name):
                return row["status"]
        raise AssertionError(f"HAProxy has no server {server}")

    def serving(self) -> bool:
        """Whether its stats socket answers yet; a failure, with what it said, if it has exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"HAProxy exited with {self.process.returncode}:\n{self.output()}")
        try:
            self.ask("show info")
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit and for its stdout to end."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def haproxy(
    directory: Path, config: str | Path, fds: Sequence[int] = (), stats: Path | None = None
) -> Iterator[HAProxy]:
    """HAProxy run with `config` (its text, or its file), handed the descriptors `fds` (its
    `bind fd@N`), its stderr in a file in `directory`, until the block ends. The config is checked
    first (`-c`), so a mistake fails here and not as a hang. With `stats` (the path of the config's
    `stats socket`) it is serving once that socket answers: the block starts then. Without it, it
    needs no wait when its frontends are on the test's sockets, where clients queue until it
    accepts."""
    run = next(_RUNS)
    if isinstance(config, str):
        text, config = config, directory / f"haproxy-{run}.cfg"
        config.write_text(text)
    command = [require("haproxy"), "-f", str(config)]
    checked = subprocess.run(
        [*command, "-c"], pass_fds=fds, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    errors = directory / f"haproxy-{run}.err"
    with errors.open("w") as stderr:
        process = subprocess.Popen([*command, "-db"], pass_fds=fds, stdout=subprocess.PIPE, stderr=stderr, text=True)
    running = HAProxy(process, errors, stats)
    try:
        if stats is not None:
            eventually(running.serving, "HAProxy's stats socket answering", timeout=TIMEOUT)
        yield running
    finally:
        running.stop()


# One thread is all a test's few connections need. The unique ID is HAProxy's example format:
# the client's address and port, the frontend's, a timestamp, a counter and the pid.
CONFIG = """\
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend balancer
    bind fd@{fd}
    unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
    default_backend sockd
backend sockd
    server sockd {server} {options}
"""


@contextlib.contextmanager
def balancer(directory: Path, server: str, *options: str) -> Iterator[str]:
    """HAProxy in front of `server` (a sockd listener's host:port), its server line given
    `options` (send-proxy-v2, proxy-v2-options, check, ...): the frontend's address while it runs."""
    with socket.create_server(("127.0.0.1", 0)) as front:
        config = CONFIG.format(fd=front.fileno(), server=server, options=" ".join(options))
        with haproxy(directory, config, fds=(front.fileno(),)):
            yield f"127.0.0.1:{front.getsockname()[1]}"


# Each connection's line, logged as it ends: the client and the address it reached, as HAProxy
# learnt them from the PROXY header.
ACCEPTING = """\
global
    log stdout format raw local0
    nbthread 1
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend relayed
    bind fd@{fd} accept-proxy
    log-format "client=%ci:%cp reached=%fi:%fp"
    default_backend out
backend out
    server out {server}
"""


@contextlib.contextmanager
def accepting_proxy(directory: Path, server: str) -> Iterator[tuple[int, queue.Queue[str]]]:
    """HAProxy reading a PROXY header (v1 or v2) before each connection's bytes, in front of
    `server` (host:port): its port, and its log lines as they come."""
    with socket.create_server(("127.0.0.1", 0)) as front:
        config = ACCEPTING.format(fd=front.fileno(), server=server)
        with haproxy(directory, config, fds=(front.fileno(),)) as running:
            yield front.getsockname()[1], running.logged

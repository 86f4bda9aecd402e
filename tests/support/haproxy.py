"""HAProxy (Debian's 2.6), `mode tcp`, its frontend on a loopback socket the test made and hands
it as a descriptor (`bind fd@N`: no port to race other tests for, and clients queue on it until
HAProxy accepts): as the balancer in front of a sockd listener, sending it the PROXY header
(`send-proxy` for v1, `send-proxy-v2`) and whatever else the test asks (`balancer`); or behind a
sockd relay, reading the header the relay sends (`accept-proxy`) and logging the client it
learnt (`accepting_proxy`)."""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from support.daemon import require
from support.waits import TIMEOUT

SEND_PROXY = {"v1": "send-proxy", "v2": "send-proxy-v2"}

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
    `options` (send-proxy-v2, proxy-v2-options, check, ...): the frontend's address while it
    runs. Its config is checked first (`-c`), so a mistake fails here and not as a hang."""
    with socket.create_server(("127.0.0.1", 0)) as front:
        port = front.getsockname()[1]
        config = directory / f"haproxy-{port}.cfg"
        config.write_text(CONFIG.format(fd=front.fileno(), server=server, options=" ".join(options)))
        command = [require("haproxy"), "-f", str(config)]
        checked = subprocess.run(
            [*command, "-c"], pass_fds=(front.fileno(),), capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with (directory / f"haproxy-{port}.log").open("w") as log:
            process = subprocess.Popen([*command, "-db"], pass_fds=(front.fileno(),), stdout=log, stderr=log)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(TIMEOUT)


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
        port = front.getsockname()[1]
        config = directory / f"haproxy-{port}.cfg"
        config.write_text(ACCEPTING.format(fd=front.fileno(), server=server))
        with (directory / f"haproxy-{port}.err").open("w") as errors:
            process = subprocess.Popen(
                [require("haproxy"), "-db", "-f", str(config)],
                pass_fds=(front.fileno(),),
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in process.stdout or ():
                lines.put(line.strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield port, lines
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(TIMEOUT)
            reader.join(TIMEOUT)
            if process.stdout is not None:
                process.stdout.close()

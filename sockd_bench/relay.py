"""A relay in front of the C epoll echo server, for compare.py's echo loads: sockd's relay in one
model, or what a user would reach for instead: socat (`TCP-LISTEN,fork TCP:`), and, terminating
TLS with --tls (compare.py's {tls} directory, its cert.pem and key.pem), socat `OPENSSL-LISTEN`,
stunnel 5 and HAProxy (one thread, TCP mode, timeouts 60 s; plain TCP without --tls, `nosplice`
unless --splice lets it move the bytes with splice(2)).

    compare.py tcp-echo "haproxy=python -P -m sockd_bench.relay {port} {build} haproxy" \\
        "socat=python -P -m sockd_bench.relay {port} {build} socat" \\
        "sockd=python -P -m sockd_bench.relay {port} {build} asyncio --build compiled"
    compare.py tls-echo "stunnel=python -P -m sockd_bench.relay {port} {build} stunnel --tls {tls}"

It starts the echo server on a free port, then becomes the relay (exec, same pid and process
group: compare.py measures the relay and the echo server together, and stops both). stunnel's and
HAProxy's configs (and HAProxy's certificate, which it wants with its key in one file) are
anonymous files the exec inherits: nothing is left on disk."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

from sockd_bench.serve import Build

MODELS = ["selector", "busy_poll", "asyncio"]  # sockd's relay under each of these
PEERS = ["socat", "stunnel", "haproxy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", help="where the relay listens")
    parser.add_argument("build", type=Path, help="compare.py's build directory, with c_epoll_echo")
    parser.add_argument("relay", choices=[*PEERS, *MODELS])
    parser.add_argument("--upstream-cpus", help="CPUs for the echo server (default: the relay's)")
    parser.add_argument("--tls", type=Path, metavar="DIR", help="terminate TLS with DIR/cert.pem and DIR/key.pem")
    parser.add_argument("--splice", action="store_true", help="HAProxy without `nosplice` (plain TCP only)")
    parser.add_argument(
        "--build", dest="sockd_build", default="pure", choices=get_args(Build), help="sockd's build (see serve.py)"
    )
    args = parser.parse_args()
    if args.relay == "stunnel" and args.tls is None:
        parser.error("stunnel needs --tls")
    if args.splice and (args.relay != "haproxy" or args.tls is not None):
        parser.error("--splice: HAProxy's, over plain TCP")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        upstream = probe.getsockname()[1]
    echo = subprocess.Popen([str(args.build / "c_epoll_echo"), str(upstream)])
    if args.upstream_cpus:
        os.sched_setaffinity(echo.pid, {int(cpu) for cpu in args.upstream_cpus.split(",")})
    for _ in range(100):  # at most 5 s for it to listen
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", upstream)) == 0:
                break
        time.sleep(0.05)
    command = _relay(args.relay, args.port, upstream, args.tls, splice=args.splice, build=args.sockd_build)
    os.execvp(command[0], command)


def _relay(relay: str, port: str, upstream: int, tls: Path | None, *, splice: bool, build: Build) -> list[str]:
    """The command line that relays 127.0.0.1:`port` to the echo server."""
    if relay == "socat":
        # backlog: socat's default of 5 drops SYNs under a connection per request (1 s retransmits)
        listen = f"{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"
        if tls is None:
            return ["socat", f"TCP-LISTEN:{listen}", f"TCP:127.0.0.1:{upstream}"]
        listen += f",cert={tls / 'cert.pem'},key={tls / 'key.pem'},verify=0,nodelay"
        return ["socat", f"OPENSSL-LISTEN:{listen}", f"TCP:127.0.0.1:{upstream},nodelay"]
    if relay == "stunnel":
        assert tls is not None  # main() checked
        # -fd: stunnel reads its config from a descriptor (it refuses a /proc/self/fd path).
        config = _anonymous(
            "stunnel.conf",
            "foreground = yes\npid =\nsyslog = no\ndebug = err\n[relay]\n"
            f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\n"
            f"cert = {tls / 'cert.pem'}\nkey = {tls / 'key.pem'}\n",
        )
        os.lseek(config, 0, os.SEEK_SET)
        return ["stunnel", "-fd", str(config)]
    if relay == "haproxy":
        bind = f"bind 127.0.0.1:{port}"
        if tls is not None:
            pem = _anonymous("server.pem", (tls / "cert.pem").read_text() + (tls / "key.pem").read_text())
            bind += f" ssl crt /proc/self/fd/{pem}"
        copy = "" if splice else "    nosplice\n"  # splice(2) moves the bytes in the kernel, not through a buffer
        config = _anonymous(
            "haproxy.cfg",
            f"global\n    nbthread 1\n    maxconn 5000\n{copy}"
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
            f"frontend relay\n    {bind}\n    default_backend echo\n"
            f"backend echo\n    server echo 127.0.0.1:{upstream}\n",
        )
        return ["haproxy", "-db", "-f", f"/proc/self/fd/{config}"]
    command = [sys.executable, "-P", "-m", "sockd_bench.serve", port, "--handler", "relay", "--concurrency", relay]
    command += ["--option", f"upstream=tcp://127.0.0.1:{upstream}", "--build", build]
    return command + (["--tls", str(tls)] if tls is not None else [])


def _anonymous(name: str, text: str) -> int:
    """A file in memory with `text`, as a descriptor the exec inherits."""
    fd = os.memfd_create(name, 0)
    os.write(fd, text.encode())
    return fd


if __name__ == "__main__":
    main()

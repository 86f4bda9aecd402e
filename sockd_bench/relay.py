"""A relay in front of the C epoll echo server, for compare.py's tcp-echo load: sockd's relay in
one model, or socat (`TCP-LISTEN,fork TCP:`), the relay a user would reach for instead.

    compare.py tcp-echo c "socat=python -P -m sockd_bench.relay {port} {build} socat" \\
        "sockd=python -P -m sockd_bench.relay {port} {build} asyncio"

It starts the echo server on a free port, then becomes the relay (exec, same pid and process
group: compare.py measures the relay and the echo server together, and stops both)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", help="where the relay listens")
    parser.add_argument("build", type=Path, help="compare.py's build directory, with c_epoll_echo")
    parser.add_argument("relay", choices=["socat", "selector", "busy_poll", "asyncio"])
    parser.add_argument("--upstream-cpus", help="CPUs for the echo server (default: the relay's)")
    args = parser.parse_args()

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
    if args.relay == "socat":
        command = ["socat", f"TCP-LISTEN:{args.port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"]
        command.append(f"TCP:127.0.0.1:{upstream}")
    else:
        command = [sys.executable, "-P", "-m", "sockd_bench.serve", args.port, "--handler", "relay"]
        command += ["--concurrency", args.relay, "--option", f"upstream=tcp://127.0.0.1:{upstream}"]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()

"""A program per connection, its stdin and stdout the connection, for compare.py's timestamp load
(connect, send, read to EOF): what a user has for this without sockd's `exec` handler. xinetd
(Debian `xinetd`), `systemd-socket-activate --accept --inetd`, or socat (`TCP-LISTEN,fork EXEC:`),
each on 127.0.0.1:PORT running PROGRAM (default `/usr/bin/head -c 64`, which echoes the load's
64 bytes and exits: the connection then ends by itself).

    compare.py timestamp --conns 20 "xinetd=python -P -m sockd_bench.inetd {port} xinetd" \\
        "sockd=python -P -m sockd_bench.serve {port} --exec '/usr/bin/head -c 64'"

This becomes the server (exec, same pid), but for xinetd, which closes every descriptor but
stderr as it starts: its config is a file in a temporary directory, removed once xinetd listens
(it has read it by then), while this waits for xinetd (which compare.py stops with the rest of the
process group) and exits as it does. compare.py's CPU per connection counts the program's
children too: each of these servers (and sockd's worker) waits for the children it forks, so the
kernel adds their CPU time to its own cutime and cstime in /proc/PID/stat, which compare.py reads
once they have been reaped (socat's forked child waits for its program, then socat for that child:
the times add up the chain). xinetd logs to /dev/null (nothing per connection: there is no syslog
here, and nothing is left on disk)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVERS = ["xinetd", "systemd", "socat"]
HEAD = ["/usr/bin/head", "-c", "64"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int, help="where the server listens, on 127.0.0.1")
    parser.add_argument("server", choices=SERVERS)
    parser.add_argument("program", nargs="*", default=HEAD, help="absolute path and arguments (default: %(default)s)")
    args = parser.parse_args()
    if args.server == "xinetd":
        sys.exit(_xinetd(args.port, args.program))
    command = _server(args.server, args.port, args.program)
    os.execvp(command[0], command)


def _xinetd(port: int, program: list[str]) -> int:
    """Run xinetd until it exits, its config removed once it listens; its exit status, as a shell's."""
    with tempfile.TemporaryDirectory(prefix="sockd-bench-xinetd-") as directory:
        config = Path(directory) / "xinetd.conf"
        config.write_text(_xinetd_config(port, program))
        xinetd = subprocess.Popen(["xinetd", "-dontfork", "-filelog", "/dev/null", "-f", str(config)])
        for _ in range(100):  # at most 5 s for it to listen
            with socket.socket() as sock:
                if xinetd.poll() is not None or sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
    status = xinetd.wait()
    return status if status >= 0 else 128 - status


def _server(server: str, port: int, program: list[str]) -> list[str]:
    """The command line of systemd-socket-activate or socat, running `program` per connection to
    127.0.0.1:`port`."""
    if server == "systemd":
        return ["systemd-socket-activate", "--accept", "--inetd", "-l", f"127.0.0.1:{port}", *program]
    # backlog: socat's default of 5 drops SYNs under a connection per request (1 s retransmits);
    # the others listen with 64 (xinetd) or more, above the load's connections.
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096"
    # EXEC: splits its command line on spaces itself, without a shell.
    return ["socat", listen, f"EXEC:{' '.join(program)}"]


def _xinetd_config(port: int, program: list[str]) -> str:
    """xinetd's config: one service with its rate and instance limits lifted, so
    that xinetd is measured rather than its defaults (`cps = 50 10` switches a service off for 10 s
    after 50 connections in a second; `instances` and `per_source` refuse beyond a count)."""
    server_args = f"    server_args = {' '.join(program[1:])}\n" if program[1:] else ""
    return (
        "defaults\n{\n    instances = UNLIMITED\n    per_source = UNLIMITED\n    cps = 1000000 1\n}\n"
        "service bench\n{\n    type = UNLISTED\n    socket_type = stream\n    protocol = tcp\n"
        f"    port = {port}\n    bind = 127.0.0.1\n    wait = no\n    user = root\n    flags = REUSE\n"
        f"    server = {program[0]}\n{server_args}    log_on_success =\n    log_on_failure =\n}}\n"
    )


if __name__ == "__main__":
    main()

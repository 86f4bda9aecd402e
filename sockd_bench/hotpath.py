"""One worker's model, in this process, for counting what a request costs the server (instructions
under callgrind, or CPU time), without the supervisor's fork server in the way.

    python -m sockd_bench.hotpath PORT [--protocol udp] [--handler timestamp] [--concurrency threaded]
           [--event-loop asyncio] [--no-metrics]

It runs the real classes as a worker does (sockd.worker): the listener's handler, its Stats over
a shared-memory counter file, its model from the registry; but no publisher thread (its cost is
per tenth of a second, not per request) and no supervisor. SIGTERM stops it; it prints the
requests its counters saw, so a measurement can check it counted every one.

    python -m sockd_bench.hotpath client PORT N [--protocol udp] [--per-connection]

drives exactly N requests of 64 bytes at it, one at a time on one connection (or a connection
per request, read until the server closes it), and waits for every reply. bench/README.md
("Instructions per request") shows the two under callgrind.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from typing import Any

from sockd import counters, handlers
from sockd.config import InetListener
from sockd.config.schema import DEFAULT_BUCKETS
from sockd.models import registry
from sockd.stopping import Stop

PAYLOAD = b"x" * 64


def serve(args: argparse.Namespace) -> None:
    fields: dict[str, Any] = {
        "name": "hot",
        "protocol": args.protocol,
        "host": "127.0.0.1",
        "port": args.port,
        "handler": args.handler,
        "concurrency": args.concurrency,
    }
    if args.event_loop:
        fields["event_loop"] = args.event_loop
    listener = InetListener(**fields)
    kind = socket.SOCK_DGRAM if args.protocol == "udp" else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    sock.setblocking(False)
    shared = counters.Shared(counters.create(len(DEFAULT_BUCKETS) + 1), len(DEFAULT_BUCKETS) + 1)
    stats = counters.Stats(shared, DEFAULT_BUCKETS, enabled=not args.no_metrics)
    stop = Stop()
    signal.signal(signal.SIGTERM, lambda *_: stop.end())
    model = registry.load(listener.concurrency)(listener, handlers.build(listener), stats, frozenset())
    print("ready", flush=True)
    model.serve(sock, stop)
    stats.publish()
    print("requests", shared.read().requests, flush=True)


def client(args: argparse.Namespace) -> None:
    address = ("127.0.0.1", args.port)
    if args.protocol == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            for _ in range(args.n):
                sock.send(PAYLOAD)
                sock.recv(65536)
        return
    if args.per_connection:
        for _ in range(args.n):
            with socket.create_connection(address) as sock:
                sock.sendall(PAYLOAD)
                while sock.recv(65536):
                    pass
        return
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(args.n):
            sock.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                got += len(sock.recv(65536))


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("port", type=int)
        parser.add_argument("n", type=int)
        parser.add_argument("--protocol", default="tcp")
        parser.add_argument("--per-connection", action="store_true")
        client(parser.parse_args(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--protocol", default="tcp", choices=("tcp", "udp"))
    parser.add_argument("--handler", default="echo")
    parser.add_argument("--concurrency", default="asyncio")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"))
    parser.add_argument("--no-metrics", action="store_true")
    serve(parser.parse_args())


if __name__ == "__main__":
    main()

"""Run sockd with one listener on a given port, for the load generators in bench/.

    compare.py tcp-echo "sockd=.venv/bin/python -P -m sockd_bench.serve {port} --concurrency asyncio"

The benchmark harness names a free port per run; sockd takes its port from the config file, so
this writes a one-listener config for that port into an anonymous file and becomes sockd (exec,
same pid: the harness measures sockd's own CPU, workers included; nothing is left on disk).
--exec gives the listener `handler: exec` with that command, split as a shell would (no shell
runs it): a program per connection, as inetd runs one (see inetd.py for the peers).

    compare.py timestamp "sockd=.venv/bin/python -P -m sockd_bench.serve {port} --exec '/usr/bin/head -c 64'"
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import get_args

import yaml

from sockd.config import HandlerName, ProtocolName


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", help="a TCP/UDP port, or a Unix socket path with --protocol unix")
    parser.add_argument("--protocol", default="tcp", choices=get_args(ProtocolName))
    parser.add_argument("--handler", default="echo", choices=get_args(HandlerName))
    parser.add_argument("--exec", metavar="COMMAND", help="handler: exec, with this command (overrides --handler)")
    parser.add_argument("--concurrency", default="asyncio")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="another listener key")
    parser.add_argument("--no-metrics", action="store_true", help="metrics.enabled: false")
    parser.add_argument("--tls", metavar="DIR", help="serve TLS with DIR/cert.pem and DIR/key.pem (compare.py's {tls})")
    args = parser.parse_args()

    listener: dict[str, object] = {"name": "bench", "protocol": args.protocol, "handler": args.handler}
    if args.exec:
        listener.update(handler="exec", command=shlex.split(args.exec))
    listener["concurrency"] = args.concurrency
    if args.protocol == "unix":
        listener["path"] = args.port
    else:
        listener.update(host="127.0.0.1", port=int(args.port))
    for option in args.option:
        key, _, value = option.partition("=")
        listener[key] = yaml.safe_load(value)
    if args.tls:
        listener["tls"] = {"cert": os.path.join(args.tls, "cert.pem"), "key": os.path.join(args.tls, "key.pem")}
    config = {
        "logging": {"level": "warning"},
        "metrics": {"enabled": not args.no_metrics, "port": 0},
        "listeners": [listener],
    }
    fd = os.memfd_create("sockd-bench.yaml", 0)  # inherited by the exec: sockd reads it by path
    os.write(fd, yaml.safe_dump(config).encode())
    os.execv(sys.executable, [sys.executable, "-P", "-m", "sockd", "-c", f"/proc/self/fd/{fd}"])


if __name__ == "__main__":
    main()

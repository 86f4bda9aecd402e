"""Run sockd with one listener on a given port, for the load generators in bench/.

    compare.py tcp-echo "sockd=.venv/bin/python -P -m sockd_bench.serve {port} --concurrency asyncio"

The benchmark harness names a free port per run; sockd takes its port from the config file, so
this writes a one-listener config for that port into an anonymous file and becomes sockd (exec,
same pid: the harness measures sockd's own CPU, workers included; nothing is left on disk).
--exec gives the listener `handler: exec` with that command, split as a shell would (no shell
runs it): a program per connection, as inetd runs one (see inetd.py for the peers).

    compare.py timestamp "sockd=.venv/bin/python -P -m sockd_bench.serve {port} --exec '/usr/bin/head -c 64'"

--build picks the build sockd runs: pure (the default) is the virtualenv's editable install;
compiled is `make compiled`'s build/mypyc, put first on PYTHONPATH (the fork server and the
workers inherit it). Before the exec, the chosen build is asked which it is (sockd.build.describe()
in a fresh interpreter with the same environment): a compiled row that would run pure Python, or
a pure row that would run compiled code, stops here with the reason on stderr instead of being
measured as the other.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args

import yaml

from sockd.config import HandlerName, ProtocolName

Build = Literal["compiled", "pure"]
MYPYC_BUILD = Path(__file__).resolve().parents[1] / "build" / "mypyc"  # the Makefile's `make compiled`
# What sockd.build.describe() says of each build (anything else, such as "partly compiled", is neither).
DESCRIBED: dict[Build, str] = {"compiled": "compiled with mypyc", "pure": "pure Python"}


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
    parser.add_argument("--build", default="pure", choices=get_args(Build), help="(default pure; see above)")
    args = parser.parse_args()
    environment = build_environment(args.build)

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
    os.execve(sys.executable, [sys.executable, "-P", "-m", "sockd", "-c", f"/proc/self/fd/{fd}"], environment)


def build_environment(build: Build) -> dict[str, str]:
    """The environment in which `python -P -m sockd` runs `build`, checked; exits with the reason
    if that is not the build it runs."""
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)  # the virtualenv's editable install: the pure build
    if build == "compiled":
        if not (MYPYC_BUILD / ".built").exists():
            sys.exit(f"sockd_bench.serve: no compiled build in {MYPYC_BUILD}: run `make compiled`")
        environment["PYTHONPATH"] = str(MYPYC_BUILD)
    describe = "from sockd import build; print(build.describe())"
    said = subprocess.run(
        [sys.executable, "-P", "-c", describe], env=environment, capture_output=True, text=True, check=False
    )
    runs = said.stdout.strip() or said.stderr.strip()
    if said.returncode or runs != DESCRIBED[build]:
        sys.exit(f"sockd_bench.serve: the {build} build was asked for, but sockd runs: {runs}")
    return environment


if __name__ == "__main__":
    main()

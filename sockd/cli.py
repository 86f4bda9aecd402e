"""The `sockd` command: run, --check and --schema, with sysexits-style exit codes; `sockd reload`
and `sockd bench`."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys

from setproctitle import setproctitle

from sockd import __version__, build, reloads
from sockd.config import Config
from sockd.errors import SockdError
from sockd.logging import configure, is_journal, one_line, priority
from sockd.stdout import emit
from sockd.supervisor import Supervisor
from sockd.tls.material import load_config

# Where a daemon's config is found unless the command says otherwise, as nginx and sshd do theirs.
DEFAULT_CONFIG = "/etc/sockd/sockd.yaml"


def main(argv: list[str] | None = None, signals: collections.deque[int] | None = None) -> int:
    """`signals`: those caught before (see sockd.__main__), for the supervisor to act on."""
    arguments = sys.argv[1:] if argv is None else argv
    # A subcommand with a parser of its own, dispatched first so the main parser stays as it is.
    if arguments[:1] == ["reload"]:
        return reloads.main(arguments[1:])
    if arguments[:1] == ["bench"]:
        from sockd_bench import runner  # noqa: PLC0415 (imported here: the daemon never needs it)

        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a closed terminal ends a benchmark

        return runner.main(arguments[1:])
    parser = argparse.ArgumentParser(
        prog="sockd",
        description="Serve sockets declared in a YAML file.",
        epilog="sockd reload PID: reload a running sockd and wait for the outcome (sockd reload --help). "
        "sockd bench: measure a sockd on this machine (sockd bench --help).",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG,
        help=f"the config file (YAML); default: {DEFAULT_CONFIG}",
    )
    parser.add_argument("--check", action="store_true", help="validate the config file and exit")
    parser.add_argument("--schema", action="store_true", help="print the config file's JSON Schema and exit")
    parser.add_argument("--version", action="version", version=f"sockd {__version__} ({build.describe()})")
    args = parser.parse_args(argv)

    if args.schema:
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Config.model_json_schema()}
        emit(json.dumps(schema, indent=2))
        return os.EX_OK
    try:
        return _run(args.config, args.check, signals)
    except SockdError as exc:
        print("\n".join(_error_prefix() + one_line(line) for line in exc.lines()), file=sys.stderr)
        return exc.exit_code


def _run(path: str, check: bool, signals: collections.deque[int] | None) -> int:
    loaded = load_config(path)
    if check:
        for line in loaded.warnings:  # on stderr, as a problem would be; the verdict stays OK
            print(line, file=sys.stderr)
        count = len(loaded.config.listeners)
        emit(f"{path}: OK, {count} listener{'s' if count != 1 else ''}")
        return os.EX_OK
    configure(loaded.config.logging)
    setproctitle(f"sockd: supervisor -c {path}")
    return Supervisor(loaded, path, signals).run()


def _error_prefix() -> str:
    """An error's priority, for journald, when stderr is the journal (see sockd.logging)."""
    return priority("error") if is_journal(sys.stderr) else ""

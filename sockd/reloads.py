"""How the supervisor's reloads went, for `sockd reload` to wait on: the unit's `ExecReload=`, so
that `systemctl reload` fails, with the reason, when a reload was refused or rolled back (systemd
252 has no Type=notify-reload, and a plain `kill -HUP` succeeds whatever follows).

The supervisor publishes its last outcome in a memfd named `sockd-reloads`, kept at one
descriptor number: each new outcome is written whole into a new memfd, then put in the old one's
place with dup2, so that a reader opening /proc/PID/fd/N sees one outcome or the next, never half
of one. Nothing on disk (the unit's file system is read-only but for /run/sockd, and a file
would outlive a killed sockd), no socket to squat: whoever may read the supervisor's descriptors
(its own user, root) may wait on its reloads.

`sockd reload PID` reads the outcome, sends SIGHUP, and waits for a reload begun after its own
signal to be done: HUPs coalesce (see Supervisor._loop), so that reload is the first one finished
whose number is past the count begun before the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace

import structlog

from sockd.logging import one_line
from sockd.stdout import emit

log = structlog.get_logger()

NAME = "sockd-reloads"
LINK = f"/memfd:{NAME} (deleted)"  # how /proc/PID/fd/N shows it
MAX_BYTES = 1 << 16  # an outcome is a status line; a longer file is not one
POLL = 0.05  # seconds between two looks at the outcome
EX_FAILED = 1  # the reload was refused or rolled back: its reason is on stderr
EX_UNAVAILABLE = 69  # sysexits.h: no sockd supervisor to reload at that pid
EX_TEMPFAIL = 75  # sysexits.h: the reload was not done in time; it may still be


@dataclass(frozen=True)
class Outcome:
    begun: int  # reloads begun
    done: int  # reloads done, the last of which `succeeded` and `status` describe
    succeeded: bool
    status: str


class Published:
    """The supervisor's side: its reloads' outcomes, published for `sockd reload`."""

    def __init__(self) -> None:
        self.outcome = Outcome(begun=0, done=0, succeeded=True, status="started")
        self.fd = _written(self.outcome)

    def begin(self) -> None:
        self._publish(replace(self.outcome, begun=self.outcome.begun + 1))

    def end(self, succeeded: bool, status: str) -> None:
        self._publish(Outcome(self.outcome.begun, self.outcome.begun, succeeded, status))

    def close(self) -> None:
        os.close(self.fd)

    def _publish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        try:
            fd = _written(outcome)
        except OSError as exc:  # a reload goes on without a reader: `sockd reload` then times out
            log.warning("cannot publish a reload's outcome for sockd reload", error=str(exc))
            return
        os.dup2(fd, self.fd, inheritable=False)
        os.close(fd)


def _written(outcome: Outcome) -> int:
    fd = os.memfd_create(NAME, os.MFD_CLOEXEC)
    try:
        os.write(fd, json.dumps(asdict(outcome)).encode())
    except OSError:
        os.close(fd)
        raise
    return fd


# -- the command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sockd reload",
        description="Reload a running sockd's config file (SIGHUP) and wait for the outcome: exit 0 once "
        f"it is applied, {EX_FAILED} with the reason on stderr if it was refused or rolled back.",
    )
    parser.add_argument("pid", type=int, help="the supervisor's process id ($MAINPID in a unit)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="how long to wait (default: %(default)g)"
    )
    args = parser.parse_args(argv)
    pid: int = args.pid
    try:
        path = _published_at(pid)
        before = _read(path)
    except (OSError, ValueError) as exc:
        print(f"sockd reload: no sockd supervisor with pid {pid}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:  # exited meanwhile
        print(f"sockd reload: cannot signal sockd (pid {pid}): {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            now = _read(path)
        except (OSError, ValueError):
            print(f"sockd reload: sockd (pid {pid}) exited before its reload was done", file=sys.stderr)
            return EX_FAILED
        if now.done > before.begun:
            break
        if time.monotonic() > deadline:
            print(f"sockd reload: no outcome from sockd (pid {pid}) within {args.timeout:g} s", file=sys.stderr)
            return EX_TEMPFAIL
        time.sleep(POLL)
    # One line each, whatever a path in the reason holds: ExecReload='s output goes to the journal.
    if not now.succeeded:
        print(one_line(f"sockd reload: {now.status}"), file=sys.stderr)
        return EX_FAILED
    emit(one_line(now.status))
    return os.EX_OK


def _published_at(pid: int) -> str:
    """The path through /proc of the supervisor's outcome (OSError if none: not sockd's pid)."""
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):  # closed while we looked
            if os.readlink(f"{directory}/{name}") == LINK:
                return f"{directory}/{name}"
    raise FileNotFoundError(f"it publishes no {NAME}: not a sockd supervisor, or an older sockd")


def _read(path: str) -> Outcome:
    """The outcome published at `path`: ValueError if it is not one (the pid was reused)."""
    with open(path, "rb") as file:
        fields = json.loads(file.read(MAX_BYTES))
    try:
        return Outcome(**fields)
    except TypeError:
        raise ValueError(f"{path} holds no reload's outcome") from None

"""The one base of the errors that end the `sockd` command: each carries its exit code and the
lines to print (h11's LocalProtocolError carries its status code the same way)."""

from __future__ import annotations

from typing import ClassVar

EX_CONFIG = 78  # sysexits.h: configuration error
# sysexits.h: an operating system error: an unbindable socket, too few descriptors, no fork server,
# a descriptor systemd passed that is no socket (as one of the wrong kind is: a bind error)
EX_OSERR = 71


class SockdError(Exception):
    """Why sockd cannot run (or go on running) as asked: one line of its own, said as is."""

    exit_code: ClassVar[int] = EX_OSERR

    def lines(self) -> list[str]:
        """What the command prints, a line each (sockd.logging.one_line makes sure)."""
        return [f"sockd: {self}"]

"""systemd integration with the standard library only: sd_notify, socket activation and the file
descriptor store.

The protocols are small and stable (sd_notify(3), sd_listen_fds(3)): a datagram of
newline-separated KEY=VALUE lines to $NOTIFY_SOCKET, and descriptors from 3 on described by
$LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES. A socket sent with FDSTORE=1 and FDNAME= (its
descriptor in the datagram, SCM_RIGHTS) is kept by systemd while the service runs and across a
`systemctl restart`, and passed again with that name at the next start, as a socket unit's
are; FDSTOREREMOVE=1 with its name drops it. systemd keeps only FileDescriptorStoreMax= of them,
and says nothing of the rest: the number is in $FDSTORE (set by systemd from 254 on, and by
sockd's unit for 252), and sockd stores nothing without it.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import stat
import time

from sockd.errors import SockdError
from sockd.logging import one_line

LISTEN_FDS_START = 3
# What a descriptor is, by its file type: in the error for one that is not a socket.
KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class NotASocket(SockdError):
    """systemd passed a descriptor (LISTEN_FDS) that is not a socket: a socket unit's ListenFIFO=,
    ListenSpecial= and the like, which no listener can serve on."""


class Notifier:
    """Tells systemd how the service is doing; does nothing when not run by systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in the abstract namespace: a leading NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None
        self.watchdog_interval = _watchdog_interval()
        room = os.environ.get("FDSTORE", "")
        self.store_room = int(room) if room.isdigit() and self.sock is not None else 0
        self.stored: set[str] = set()

    def send(self, *lines: str) -> None:
        """Each of `lines` one KEY=VALUE line: a newline in a value (a path in a STATUS=) must not
        start a line of its own, which systemd would read as another assignment."""
        if self.sock is None:
            return
        # OSError: systemd gone or not listening; the service itself must not care.
        with contextlib.suppress(OSError):
            self.sock.sendto("\n".join(one_line(line) for line in lines).encode(), self.address)

    def store(self, name: str, sock: socket.socket) -> None:
        """Put `sock` in systemd's file descriptor store under `name`, if there is room; systemd
        ignores a socket it already holds."""
        if name in self.stored or len(self.stored) >= self.store_room or self.sock is None:
            return
        with contextlib.suppress(OSError):
            # sendmsg, not socket.send_fds: Python 3.11's drops the address.
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))]
            self.sock.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()], rights, 0, self.address)
            self.stored.add(name)

    def unstore(self, name: str) -> None:
        """Drop the sockets stored under `name`: its listener is gone, or moved to another address."""
        if self.store_room:
            self.send("FDSTOREREMOVE=1", f"FDNAME={name}")
            self.stored.discard(name)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def _watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC, in seconds, when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1e6


def listen_fds() -> dict[str, socket.socket]:
    """The sockets systemd passed to this process, by name (their LISTEN_FDNAMES entry, else
    "unknown", as sd_listen_fds_with_names does), and clears the variables so no child sees them."""
    pid, count = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not count or pid != str(os.getpid()):
        return {}
    labels = names.split(":") if names else []
    sockets = {}
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        label = labels[index] if index < len(labels) else "unknown"
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise NotASocket(f"systemd passed descriptor {fd} ({label!r}), which is not open") from None
        if not stat.S_ISSOCK(mode):
            kind = KINDS.get(stat.S_IFMT(mode), "a file")
            raise NotASocket(f"systemd passed descriptor {fd} ({label!r}), {kind}, not a socket")
        os.set_inheritable(fd, False)
        sockets[label] = socket.socket(fileno=fd)
    return sockets

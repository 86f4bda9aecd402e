"""What /proc says about a process: alive, its CPU time and memory, the workers alive, and which
process holds the server end of a TCP connection; and a process held stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from support.daemon import Daemon
from support.waits import eventually


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """A process's children now, as the kernel lists them (zombies included)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found += [int(child) for child in listing.read().split()]
    return found


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """The processes SIGSTOPped for the block, every thread of each stopped before it begins: kill()
    returns before a thread running on another CPU has stopped, and one that got to accept()
    meanwhile would serve what the test meant to wait."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        eventually(lambda: all(_all_threads_stopped(pid) for pid in pids), "every thread stopped")
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _all_threads_stopped(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    return all((task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir())


def live_workers(daemon: Daemon, listener: str) -> list[int]:
    """The listener's workers that are alive now, oldest first."""
    return [pid for pid in daemon.worker_pids(listener) if alive(pid)]


def _proc_net_address(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp spells it: the address in host byte order, in hex."""
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, sys.byteorder):08X}:{port:04X}"


def server_inode(local: tuple[str, int], remote: tuple[str, int]) -> str | None:
    """The socket inode of the server's end of the loopback IPv4 TCP connection from `local` to
    `remote` (as the client's getsockname and getpeername say): None if the kernel has no such
    end, "0" if it has but no process holds it (closed by the server, its FIN still in flight)."""
    client, server = _proc_net_address(*local), _proc_net_address(*remote)
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == server and fields[2] == client:  # the server's end: the mirror image
            inode = fields[9]
    return inode


def tcp_owner(client: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the server's end of a loopback IPv4 TCP connection (None: none)."""
    inode = server_inode(client.getsockname()[:2], client.getpeername()[:2])
    if inode is None:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None

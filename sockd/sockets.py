"""Binding listeners: TCP and UDP over IPv4/IPv6, and Unix stream sockets with a stale-file probe."""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sockd.config import InetListener, Listener, UnixListener, passive_address
from sockd.errors import SockdError

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # <linux/in.h>; Python names it only on some builds
# What accept() (or socket()) fails with when descriptors or memory run out: a reason to pause
# and retry, never to spin or to die.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long accepting pauses when it fails for one of them, while the connections already open
# go on being served (rather than spinning, or dying).
RESOURCE_PAUSE = 0.1
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"


class BindError(SockdError):
    """A socket cannot be had; the message is one line naming what it is for, the address, the reason."""

    def __init__(self, what: str, address: str, reason: str, code: int | None = None) -> None:
        super().__init__(f"cannot bind {what} to {address}: {reason}")
        self.what, self.address, self.reason, self.errno = what, address, reason, code

    @classmethod
    def of(cls, listener: Listener, exc: OSError) -> BindError:
        why = reason(exc)
        if exc.errno == errno.EADDRINUSE and isinstance(listener, InetListener):
            why += _ephemeral_hint(listener.port)
        return cls(f"listener {listener.name!r}", f"{listener.protocol} {listener.address}", why, exc.errno)

    def noting(self, note: str) -> BindError:
        """The same error, with `note` after its reason."""
        return BindError(self.what, self.address, f"{self.reason}; {note}", self.errno)


def _ephemeral_hint(port: int) -> str:
    """Why a port may be in use with no server on it: the kernel gives the ports of
    ip_local_port_range to client connections (the tests', a browser's), and a client's
    TIME_WAIT holds one for a minute after it closed, even against SO_REUSEADDR."""
    try:
        low, high = map(int, Path(PORT_RANGE).read_text().split())
        reserved = Path(RESERVED_PORTS).read_text().strip()
    except (OSError, ValueError):
        return ""
    if not low <= port <= high or _listed(port, reserved):
        return ""
    return (
        f"; port {port} is in net.ipv4.ip_local_port_range ({low}-{high}), where the kernel picks the"
        f" ports of client connections: one may hold it; pick a port outside the range, or reserve it"
        f" (sysctl net.ipv4.ip_local_reserved_ports={port})"
    )


def _listed(port: int, ranges: str) -> bool:
    """Whether `ranges` ("20675,50000-50002") names `port`."""
    for part in filter(None, ranges.split(",")):
        first, _, last = part.partition("-")
        if int(first) <= port <= int(last or first):
            return True
    return False


@dataclass(frozen=True)
class Bound:
    """A bound listening socket and what a person needs to find it."""

    listener: Listener
    sock: socket.socket
    address: str  # the real address: the port the kernel chose for port 0
    file_id: tuple[int, int] | None = None  # (device, inode) of the Unix socket file sockd made
    activated: bool = False  # systemd passed it, and keeps it listening whatever we do

    def close(self) -> None:
        """Close the socket, and remove its Unix socket file if it is still the one sockd made.

        A TCP socket stops listening first: a reload's old workers still hold it while they
        serve their open connections, and a client connecting must be refused rather than wait
        in a backlog nobody accepts from. (A Unix socket's file is gone: nobody can connect.)"""
        if isinstance(self.listener, UnixListener):
            with contextlib.suppress(OSError):
                info = os.lstat(self.listener.path)
                if (info.st_dev, info.st_ino) == self.file_id:
                    os.unlink(self.listener.path)
        elif self.listener.protocol == "tcp" and not self.activated:
            with contextlib.suppress(OSError):  # on Linux, SHUT_RD ends a socket's listening
                self.sock.shutdown(socket.SHUT_RD)
        self.sock.close()

    def release(self) -> None:
        """Close our descriptor alone, at a stop: systemd holds the socket in its file descriptor
        store (see sockd.systemd), listening, its Unix socket file in place, for the next start."""
        self.sock.close()


def serves(listener: Listener, sock: socket.socket) -> bool:
    """Whether a socket systemd passed in is bound where `listener` says (at any port for port
    0): one from the file descriptor store may be the listener's before its address changed."""
    name = sock.getsockname()
    if isinstance(listener, UnixListener):
        return bool(name == listener.path)
    try:
        _, _, address = passive_address(listener.host, listener.port, listener.protocol)
    except OSError:
        return False
    return bool(name[0] == address[0] and listener.port in (0, name[1]))


def adopt(listener: Listener, sock: socket.socket) -> Bound:
    """A socket systemd passed in for `listener` (socket activation), once it is checked to be of
    the kind the listener declares."""
    kind = socket.SOCK_DGRAM if listener.protocol == "udp" else socket.SOCK_STREAM
    families = (socket.AF_UNIX,) if listener.protocol == "unix" else (socket.AF_INET, socket.AF_INET6)
    name = sock.getsockname()
    address = name if isinstance(name, str) else inet_address(sock.family, name[0], name[1])
    if sock.type != kind or sock.family not in families:
        what = f"{socket.AddressFamily(sock.family).name} {socket.SocketKind(sock.type).name} {address}"
        raise BindError(
            f"listener {listener.name!r}", f"the socket systemd passed ({what})", f"not a {listener.protocol} socket"
        )
    retune(sock, listener)  # the listener's backlog, not the socket unit's Backlog=, as after a reload
    return Bound(listener, sock, address, activated=True)


# The states of /proc/net/tcp (include/net/tcp_states.h), as `ss` names them. A socket that is
# bound and not listening is in neither of the tables it lists.
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN-SENT",
    "03": "SYN-RECV",
    "04": "FIN-WAIT-1",
    "05": "FIN-WAIT-2",
    "06": "TIME-WAIT",
    "07": "CLOSE",
    "08": "CLOSE-WAIT",
    "09": "LAST-ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def tcp_port(listener: Listener) -> int:
    """The TCP port a listener binds; 0 if it binds none, or lets the kernel choose."""
    return listener.port if isinstance(listener, InetListener) and listener.protocol == "tcp" else 0


def connections_holding(port: int) -> str | None:
    """What holds a TCP port when it is connections alone, which end by themselves (a client's
    TIME-WAIT within a minute), as "2 TIME-WAIT, 1 ESTABLISHED"; None when a server may hold
    it (a LISTEN socket, or one bound that /proc/net/tcp does not list), or for port 0."""
    if port == 0:
        return None
    states: collections.Counter[str] = collections.Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                _, local, _, state, *_ = line.split()
                if int(local.rpartition(":")[2], 16) == port:
                    states[TCP_STATES.get(state, state)] += 1
    if not states or "LISTEN" in states:
        return None
    return ", ".join(f"{count} {state}" for state, count in states.most_common())


def udp_ports(bounds: Iterable[Bound]) -> frozenset[int]:
    """The ports the UDP sockets among `bounds` are bound to, and the ports their UDP relays send
    to (see lifecycle.REFLECTORS): a relay's upstream answers whatever it is sent, so a datagram
    forged from it to a relay would have the two answer each other forever."""
    ports: set[int] = set()
    for bound in bounds:
        listener = bound.listener
        if listener.protocol == "udp":
            ports.add(bound.sock.getsockname()[1])
            if listener.upstream is not None and isinstance(upstream := listener.upstream_endpoint[1], tuple):
                ports.add(upstream[1])
    return frozenset(ports)


def tune(sock: socket.socket, listener: Listener) -> None:
    """The options that may be set on a bound socket (also one systemd passed in). Linux hands a
    listening socket's TCP_NODELAY, SO_KEEPALIVE and buffer sizes on to every connection accepted
    from it, so no model pays a setsockopt() per connection for them."""
    if listener.protocol == "tcp":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, listener.nodelay)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, listener.keepalive)
    if listener.recv_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listener.recv_buffer)
    if listener.send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, listener.send_buffer)


def retune(sock: socket.socket, listener: Listener) -> None:
    """Apply a listener's options and backlog to a socket already listening: the one a reload
    keeps, or one systemd passed in."""
    tune(sock, listener)
    if listener.streams:
        sock.listen(listener.backlog)  # Linux takes a second listen() as a new backlog


def bind(listener: Listener) -> Bound:
    try:
        if isinstance(listener, UnixListener):
            return _bind_unix(listener)
        return _bind_inet(listener)
    except OSError as exc:
        raise BindError.of(listener, exc) from None


def _bind_inet(listener: InetListener) -> Bound:
    kind = socket.SOCK_STREAM if listener.protocol == "tcp" else socket.SOCK_DGRAM
    family, proto, address = passive_address(listener.host, listener.port, listener.protocol)
    sock = socket.socket(family, kind, proto)
    with _closed_on_error(sock):
        if kind == socket.SOCK_STREAM:
            # A restarted sockd must not wait out TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listener.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and listener.ipv6_only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, listener.ipv6_only)
        if listener.freebind:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        tune(sock, listener)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(listener.backlog)
        host, port = sock.getsockname()[:2]
    return Bound(listener, sock, inet_address(family, host, port))


def inet_address(family: int, host: str, port: int) -> str:
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _bind_unix(listener: UnixListener) -> Bound:
    path = listener.path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _check_directory(directory)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _closed_on_error(sock):
        # bind() gives the file its socket's mode (0777) less the umask: with the umask narrowed
        # for the call, the file is made with `mode` exactly, and no chmod() (which would follow
        # a symlink put in its place) is needed.
        old = os.umask(0o777 & ~listener.mode_bits)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        info = os.lstat(path)
        # Its directory is checked (_check_directory): nobody else can have put a link at the
        # path since bind() made the file, and lchown() would not follow one anyway.
        _chown(path, info, listener, follow_symlinks=False)
        tune(sock, listener)
        sock.listen(listener.backlog)
    return Bound(listener, sock, path, (info.st_dev, info.st_ino))


def _check_directory(directory: str) -> None:
    """Refuse a socket directory another user could swap files in: one owned by another user
    (not root), writable by all without the sticky bit, or reached through a symlink another
    user owns. In any other, the socket file stays what sockd made, so its removal and a
    reload's change of its mode touch nothing else (as OpenSSH's StrictModes reasons)."""
    trusted = {0, os.geteuid()}
    for place in (directory, *(str(parent) for parent in Path(directory).parents)):
        info = os.lstat(place)
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in trusted:
            raise OSError(f"{place} is a symlink owned by another user (uid {info.st_uid})")
    info = os.stat(directory)
    if info.st_uid not in trusted:
        raise OSError(f"its directory {directory} belongs to another user (uid {info.st_uid})")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise OSError(f"its directory {directory} is writable by every user and not sticky")


def set_file(bound: Bound, listener: UnixListener) -> None:
    """Give the Unix socket file sockd made the listener's mode, and its owner and owner_group if
    it names them, if it is still that file: through a descriptor of its own (O_PATH, never
    following a link), checked by device and inode, so neither a symlink nor another file put at
    the path meanwhile gets them."""
    if bound.activated:
        raise OSError("systemd made the socket file: its mode and owner are the socket unit's SocketMode=, SocketUser=")
    fd = os.open(bound.address, os.O_PATH | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or (info.st_dev, info.st_ino) != bound.file_id:
            raise OSError("the socket file was replaced by something else")
        # fchmod() and fchown() refuse an O_PATH descriptor; its /proc link is the file itself.
        os.chmod(f"/proc/self/fd/{fd}", listener.mode_bits)
        _chown(f"/proc/self/fd/{fd}", info, listener, follow_symlinks=True)
    finally:
        os.close(fd)


def _chown(path: str, info: os.stat_result, listener: UnixListener, *, follow_symlinks: bool) -> None:
    """The owner and group the listener names, if the file (as `info` saw it) has others: no
    chown() otherwise (one that changes nothing is still refused where chown is, as in the
    systemd unit's sandbox)."""
    uid = info.st_uid if listener.owner is None else listener.owner
    gid = info.st_gid if listener.owner_group is None else listener.owner_group
    if (uid, gid) != (info.st_uid, info.st_gid):
        os.chown(path, uid, gid, follow_symlinks=follow_symlinks)


def _clear_stale(path: str) -> None:
    """Unlink a socket file nobody answers on; refuse a live socket or anything that is not a socket."""
    try:
        info = os.lstat(path)  # lstat: a symlink is "not a socket", never followed
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError("something that is not a socket is at this path; sockd will not remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a process that died without cleaning up
            return
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:  # a datagram socket that is in use
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
            raise
    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))


@contextlib.contextmanager
def _closed_on_error(sock: socket.socket) -> Iterator[None]:
    try:
        yield
    except BaseException:
        sock.close()
        raise


def reason(exc: OSError) -> str:
    """An OSError in words that fit after a colon: "address already in use"."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]

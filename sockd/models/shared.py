"""The I/O every model does the same way: admitting an accepted socket, surviving accept()'s
running out of descriptors, ending a connection's input for a drain, sending datagram replies."""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
import struct
from typing import Any, cast

from sockd.counters import RESOURCES, Recorder
from sockd.lifecycle import Address, Connection, Datagrams, Service
from sockd.limits import Credentials, Ticket
from sockd.logging import Throttled
from sockd.sockets import OUT_OF_RESOURCES

# accept() failing for want of descriptors or memory (OUT_OF_RESOURCES): pause accepting this
# long and retry, while the connections already open go on being served (rather than spinning, or
# dying).
RESOURCE_PAUSE = 0.1

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# What a refused client may have sent already, read away before its connection is closed (see
# refuse): at most this many reads of READ_AWAY bytes, never waiting. 256 KiB holds what Linux
# lets a client queue unaccepted by default; a client that sent more is reset.
READS_AWAY = 4
READ_AWAY = 65536

out_of_resources = Throttled("cannot accept: out of resources; pausing")


def accept_failed(exc: OSError, recorder: Recorder) -> None:
    """Re-raise what accept() failed with, unless it is running out of resources (then count it
    and say so) or the socket listens no more (EINVAL: a reload closed it, and this worker's
    retirement is on its way); the caller pauses accepting for RESOURCE_PAUSE in its own idiom."""
    if exc.errno == errno.EINVAL:
        return
    if exc.errno not in OUT_OF_RESOURCES:
        raise exc
    recorder.errors[RESOURCES] += 1
    out_of_resources(error=exc.strerror, pause=RESOURCE_PAUSE)


def stop_listening(sock: socket.socket) -> None:
    """Close a stream listener's socket once this worker accepts no more. The supervisor and a
    next generation hold their own copies; but when they have let go (a listener removed or
    moved), a client still queued on it must be reset now, not wait for shutdown_timeout. (A
    datagram socket stays: the replies still due go out through it.)"""
    if sock.type == socket.SOCK_STREAM:
        sock.close()


def admit(conn: _socket.socket, address: Address, service: Service, recorder: Recorder) -> Ticket | None:
    """The ticket of a just-accepted connection, or None if a limit refused it: it is closed then."""
    ticket = _ticket(conn, address, service, recorder)
    if ticket is None:
        refuse(conn.fileno())
        conn.close()
    return ticket


def admitted(connection: Connection, transport: asyncio.Transport) -> bool:
    """Whether a connection a loop's server made may stay (the asyncio model's admit): its
    ticket had, or it is closed at once, its protocol swapped for one that hears nothing of it
    (it never opened), and the service told it is gone."""
    service = connection.service
    sock = cast(_socket.socket, transport.get_extra_info("socket"))  # a stand-in with getsockopt
    ticket = _ticket(sock, transport.get_extra_info("peername"), service, connection.recorder)
    if ticket is None:
        transport.set_protocol(asyncio.Protocol())
        refuse(sock.fileno())
        transport.abort()
        service.forget(connection)
        return False
    connection.ticket = ticket
    return True


def refuse(fd: int) -> None:
    """Make a refused connection's close an end of file to its client, not a reset: a socket
    closed with unread data resets its connection (RFC 1122, 4.2.2.13; AF_UNIX does the same),
    and a client usually sends its request before it is accepted. So, before the caller closes
    it: shut it both ways (over TCP the FIN goes out now, before any reset what the client sends
    later may bring; over AF_UNIX the client can send nothing more), then read away what had come,
    bounded (READS_AWAY), without waiting. On the bare descriptor, as shutdown_read does."""
    try:
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):  # already closed
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
        for _ in range(READS_AWAY):
            if len(sock.recv(READ_AWAY, socket.MSG_DONTWAIT)) < READ_AWAY:
                break
    except OSError:  # nothing (more) to read, or the client has gone already
        pass
    finally:
        sock.detach()  # the descriptor stays its owner's, to close


def _ticket(sock: _socket.socket, address: Address, service: Service, recorder: Recorder) -> Ticket | None:
    """What the listener's limits say of a new connection from `address` (its Unix peer's
    credentials read from `sock` if they are asked for)."""
    admission = service.admission
    credentials = peer_credentials(sock) if admission.wants_credentials else None
    return admission.admit(address, credentials, recorder)


def peer_credentials(conn: _socket.socket) -> Credentials:
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def peer_of(sock: Any) -> dict[str, object]:
    """Who a connection's client is, for its log line (see lifecycle.Logged): `source` and
    `port`, or a Unix peer's credentials (its socket has no name). `sock`: a socket, or uvloop's
    stand-in for one. Empty if the client has gone already."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = peer_credentials(sock)
            return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
        host, port = sock.getpeername()[:2]
    except OSError:
        return {}
    return {"source": host, "port": port}


def shutdown_read(fd: int) -> None:
    """End a connection's input (see Connection.end_input). On the bare descriptor, because
    uvloop's transport sockets refuse shutdown(), and without dup(), which fails when descriptors
    have run out (when a drain matters most)."""
    try:
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):  # already closed (its fileno() is -1 then)
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # reset: nothing is left to drain
        pass
    finally:
        sock.detach()  # the descriptor stays its owner's


def end_transport_input(transport: asyncio.BaseTransport) -> None:
    """shutdown_read for an asyncio connection, through its transport's socket (if it has one left)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        shutdown_read(sock.fileno())


class SocketDatagrams(Datagrams):
    """Datagram replies sent straight through the listening socket (the blocking and selector
    models); a full send buffer drops a reply, as the network may."""

    def __init__(self, service: Service, recorder: Recorder, sock: socket.socket) -> None:
        super().__init__(service, recorder)
        self.sock = sock

    def send(self, reply: bytes, address: Address) -> bool:
        try:
            self.sock.sendto(reply, address)
        except OSError as exc:
            self.send_failed(exc)
            return False
        return True

"""What every model does the same way at its listening socket: surviving accept()'s running out
of descriptors, and letting go of the socket once it accepts no more. (A connection's own socket
I/O is sockd.transports'.)"""

from __future__ import annotations

import errno
import socket

from sockd.counters import RESOURCES, Recorder
from sockd.logging import Throttled
from sockd.sockets import OUT_OF_RESOURCES, RESOURCE_PAUSE

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

"""The seed's thread-per-connection server (and a thread per datagram for UDP, DATAGRAM_THREADS at
most at once)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from sockd.counters import RESOURCES, Recorder
from sockd.lifecycle import Address
from sockd.limits import Ticket
from sockd.logging import Throttled
from sockd.models.blocking import BlockingModel, Threads, accepted, received
from sockd.stopping import Stop
from sockd.transports import admit

# Threads answering datagrams at once, per worker: past this, a datagram is dropped and counted
# (a flood must not start a thread for each).
DATAGRAM_THREADS = 256

_no_thread = Throttled("cannot start a thread; dropped what it was for")
_busy = Throttled("every datagram thread is busy; dropped a datagram")


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        self.stopping_on(stop, sock)
        threads = Threads()
        # The accepting thread counts what it refuses on a recorder of its own; each thread it
        # starts counts on another: no lock on the hot path, no lost update.
        with self.stats.recorder() as recorder:
            if sock.type == socket.SOCK_DGRAM:
                slots = threading.BoundedSemaphore(DATAGRAM_THREADS)
                for data, sender in received(sock, stop, recorder):
                    if not slots.acquire(blocking=False):
                        recorder.errors[RESOURCES] += 1
                        _busy(limit=DATAGRAM_THREADS)
                    elif not _started(threads, recorder, self._answer, sock, data, sender, slots):
                        slots.release()
            else:
                for conn, address in accepted(sock, stop, recorder):
                    # Refused before a thread is started for it: a flood costs no threads.
                    ticket = admit(conn, address, self.service.admission, recorder)
                    if ticket is not None and not _started(threads, recorder, self._serve, conn, ticket):
                        conn.close()
                        ticket.release()
        threads.join()

    def _serve(self, conn: socket.socket, ticket: Ticket) -> None:
        with self.stats.recorder() as recorder:
            self.serve_admitted(conn, ticket, recorder)

    def _answer(self, sock: socket.socket, data: bytes, sender: Address, slots: threading.BoundedSemaphore) -> None:
        try:
            with self.stats.recorder() as recorder:
                self.answerer(self.datagrams(sock, recorder))(data, sender)
        finally:
            slots.release()


def _started(threads: Threads, recorder: Recorder, target: Callable[..., object], *args: object) -> bool:
    """Start a thread; False, counted and said, if none can be had (out of memory or of a limit)."""
    try:
        threads.start(target, *args)
    except RuntimeError as exc:  # "can't start new thread"
        recorder.errors[RESOURCES] += 1
        _no_thread(error=str(exc))
        return False
    return True

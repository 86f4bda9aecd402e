"""The seed's thread-per-connection server (and a thread per datagram for UDP)."""

from __future__ import annotations

import socket

from sockd.counters import RESOURCES, Recorder
from sockd.lifecycle import Address
from sockd.limits import Ticket
from sockd.logging import Throttled
from sockd.models import Stop
from sockd.models.blocking import BlockingModel, Threads, accepted, received
from sockd.models.shared import SocketDatagrams, admit

_no_thread = Throttled("cannot start a thread for a connection; closed it")


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        self.stopping_on(stop, sock)
        threads = Threads()
        # The accepting thread counts what it refuses on a recorder of its own; each thread it
        # starts counts on another: no lock on the hot path, no lost update.
        with self.stats.recorder() as recorder:
            if sock.type == socket.SOCK_DGRAM:
                for data, sender in received(sock, stop, recorder):
                    threads.start(self._answer, sock, data, sender)
            else:
                for conn, address in accepted(sock, stop, recorder):
                    # Refused before a thread is started for it: a flood costs no threads.
                    ticket = admit(conn, address, self.service, recorder)
                    if ticket is not None:
                        self._start(threads, conn, ticket, recorder)
        threads.join()

    def _start(self, threads: Threads, conn: socket.socket, ticket: Ticket, recorder: Recorder) -> None:
        try:
            threads.start(self._serve, conn, ticket)
        except RuntimeError as exc:  # "can't start new thread": out of memory or of a limit
            recorder.errors[RESOURCES] += 1
            _no_thread(error=str(exc))
            conn.close()
            ticket.release()

    def _serve(self, conn: socket.socket, ticket: Ticket) -> None:
        with self.stats.recorder() as recorder:
            self.serve_admitted(conn, ticket, recorder)

    def _answer(self, sock: socket.socket, data: bytes, sender: Address) -> None:
        with self.stats.recorder() as recorder:
            self.answer(SocketDatagrams(self.service, recorder, sock), data, sender)

"""The seed's thread-per-connection server (and a thread per datagram for UDP)."""

from __future__ import annotations

import socket
import time

from sockd.counters import RESOURCES, Recorder
from sockd.limits import Throttled, released
from sockd.models import Address, Stop
from sockd.models.blocking import BlockingModel, OpenConnections, Threads, accepted, received

_no_thread = Throttled("cannot start a thread for a connection; closed it")


class Model(BlockingModel):
    def serve(self, sock: socket.socket, stop: Stop) -> None:
        threads = Threads()
        # The accepting thread counts what it refuses on a recorder of its own; each thread it
        # starts counts on another: no lock on the hot path, no lost update.
        with self.stats.recorder() as recorder:
            if sock.type == socket.SOCK_DGRAM:
                for data, sender in received(sock, stop, recorder):
                    threads.start(self._answer, sock, data, sender, time.monotonic())
            else:
                connections = OpenConnections(self, stop)
                for conn, address in accepted(sock, stop, recorder):
                    # Refused before a thread is started for it: a flood costs no threads.
                    source = connections.admit(conn, address, recorder)
                    if source is not None:
                        self._start(threads, connections, conn, source, recorder)
        threads.join()

    def _start(
        self, threads: Threads, connections: OpenConnections, conn: socket.socket, source: str, recorder: Recorder
    ) -> None:
        try:
            threads.start(self._serve, connections, conn, source)
        except RuntimeError as exc:  # "can't start new thread": out of memory or of a limit
            recorder.errors[RESOURCES] += 1
            _no_thread(error=str(exc))
            conn.close()
            released(self.admission, source)

    def _serve(self, connections: OpenConnections, conn: socket.socket, source: str) -> None:
        with self.stats.recorder() as recorder:
            connections.serve_admitted(conn, source, recorder)

    def _answer(self, sock: socket.socket, data: bytes, sender: Address, started: float) -> None:
        with self.stats.recorder() as recorder:
            self.answer(sock, data, sender, recorder, started)

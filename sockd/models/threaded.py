"""The seed's thread-per-connection server (and a thread per datagram for UDP)."""

from __future__ import annotations

import socket

from sockd.config import Listener
from sockd.handlers import Handler
from sockd.models import Stop
from sockd.models.blocking import OpenConnections, Threads, accepted, answer, received


class Model:
    def __init__(self, listener: Listener, handler: Handler) -> None:
        self.handler = handler
        self.delay = listener.delay

    def serve(self, sock: socket.socket, stop: Stop) -> None:
        threads = Threads()
        if sock.type == socket.SOCK_DGRAM:
            for data, sender in received(sock, stop):
                threads.start(answer, sock, self.handler, self.delay, data, sender)
        else:
            connections = OpenConnections(stop)
            for conn in accepted(sock, stop):
                threads.start(connections.serve, conn, self.handler, self.delay, stop)
        threads.join()

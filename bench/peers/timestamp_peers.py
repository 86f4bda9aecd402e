"""Reference peers for the timestamp handler: read one message, answer the time, close.

Usage: python timestamp_peers.py PORT {asyncio,uvloop,seed-iterative,seed-thread}
"""

import asyncio
import datetime
import socket
import sys
import threading
from typing import cast


class Stamp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(str(datetime.datetime.now()).encode())
        self.transport.close()


def seed_server(port: int, threaded: bool) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(4096)

    def handle(client: socket.socket) -> None:
        client.recv(4096)
        client.sendall(str(datetime.datetime.now()).encode())
        client.close()

    while True:
        client, _ = server.accept()
        if threaded:
            threading.Thread(target=handle, args=(client,)).start()
        else:
            handle(client)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Stamp, "127.0.0.1", port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, kind = int(sys.argv[1]), sys.argv[2]
    if kind.startswith("seed"):
        seed_server(port, kind == "seed-thread")
    else:
        if kind == "uvloop":
            import uvloop

            uvloop.install()
        asyncio.run(main(port))

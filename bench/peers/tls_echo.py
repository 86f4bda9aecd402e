"""Reference peer for the tls-* modes: an asyncio TLS echo server (protocol API), optionally on uvloop.

The certificate and key are compare.py's throwaway ones ({tls}: a directory with cert.pem and
key.pem); the SSLContext is the stdlib's server default (TLS 1.2 and 1.3, OpenSSL's default
ciphers and groups).

Usage: python tls_echo.py PORT TLSDIR [uvloop]
"""

import asyncio
import socket
import ssl
import sys
from pathlib import Path
from typing import cast


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # once the handshake is done
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def main(port: int, tls: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, ssl=context, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, tls = int(sys.argv[1]), Path(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(port, tls))

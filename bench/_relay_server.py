"""A bare relay for bench/proxy_relay.py: TCP on 127.0.0.1:PORT to a PostgreSQL unix
socket, one of `strata.proxy.relay`'s ways; no startup handling or authentication beyond
answering an SSLRequest with TLS (the proxy's context, --tls-dir holds its pair)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
from pathlib import Path

from strata.common import eventloop
from strata.proxy import relay
from strata.proxy.sockmap import Sockmap
from strata.proxy.tls import server_context
from strata.proxy.tlsrelay import TlsStream


def _copy_loop(src: int, dst: int) -> None:
    """recv/send through a user-space buffer instead of splice (for comparison)."""
    buf = bytearray(relay.PIPE_BYTES)
    view = memoryview(buf)
    s = socket.socket(fileno=os.dup(src))
    d = socket.socket(fileno=os.dup(dst))
    try:
        while True:
            n = s.recv_into(buf)
            if n == 0:
                return
            d.sendall(view[:n])
    finally:
        s.close()
        d.close()


SSL_REQUEST = struct.pack("!ii", 8, 80877103)


async def main(mode: str, port: int, socket_path: str, tls_dir: Path) -> None:
    if mode == "threads-copy":
        relay._splice_loop = _copy_loop
    context = server_context(tls_dir / "server.crt", tls_dir / "server.key")
    kernel = Sockmap.open() if mode == "sockmap" else None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(8)
        except asyncio.IncompleteReadError:
            return  # bench/proxy_relay.py's check that the relay listens
        raw = None
        if first == SSL_REQUEST and mode == "threads":  # the proxy's own TLS session
            writer.write(b"S")
            await relay.wait_writes_flushed(writer)
            stream, received = TlsStream.take_over(reader, writer, context)
            await stream.handshake(received)
            c_reader, c_writer = await asyncio.open_unix_connection(socket_path)
            await stream.relay(*relay.take_over(c_reader, c_writer))
            return
        if first == SSL_REQUEST and mode != "protocols":
            writer.write(b"N")  # TLS: the protocols or the TLS threads only
            writer.close()
            return
        if first == SSL_REQUEST:
            writer.write(b"S")
            await writer.drain()
            raw = writer.transport
            await writer.start_tls(context)
            first = b""
        c_reader, c_writer = await asyncio.open_unix_connection(socket_path)
        c_writer.write(first)
        ready = b""
        if kernel is not None:  # as the proxy: the startup, ReadyForQuery held back
            length = struct.unpack("!i", first[:4])[0]
            c_writer.write(await reader.readexactly(length - 8))
            while True:
                header = await c_reader.readexactly(5)
                body = await c_reader.readexactly(struct.unpack("!i", header[1:])[0] - 4)
                if header[:1] == b"Z":
                    ready = header + body
                    break
                writer.write(header + body)
        await relay.wait_writes_flushed(writer, c_writer, raw=raw)
        if kernel is not None:
            await relay.relay_threads(reader, writer, c_reader, c_writer, ready=ready,
                                      kernel=kernel)
        elif mode == "protocols":
            await relay.relay_protocols(reader, writer, c_reader, c_writer)
        else:
            await relay.relay_threads(reader, writer, c_reader, c_writer)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True,
                        choices=("protocols", "threads", "threads-copy", "sockmap"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--tls-dir", required=True, type=Path)
    args = parser.parse_args()
    eventloop.run(main(args.mode, args.port, args.socket, args.tls_dir))

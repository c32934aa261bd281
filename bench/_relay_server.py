"""A bare relay for bench/proxy_relay.py: TCP on 127.0.0.1:PORT to a PostgreSQL unix
socket, no startup handling or authentication, one of `strata.proxy.relay`'s ways."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from strata.common import eventloop
from strata.proxy import relay


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


async def main(mode: str, port: int, socket_path: str) -> None:
    if mode == "threads-copy":
        relay._splice_loop = _copy_loop
    how = relay.relay_protocols if mode == "protocols" else relay.relay_threads

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c_reader, c_writer = await asyncio.open_unix_connection(socket_path)
        await how(reader, writer, c_reader, c_writer)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    eventloop.run(main(args.mode, args.port, args.socket))

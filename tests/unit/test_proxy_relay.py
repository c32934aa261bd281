"""strata.proxy.relay over real sockets (TCP client side, unix socket compute side, as in
the proxy): both ways relay every byte in order, with more in flight than a pipe or a
socket buffer holds; bytes the stream readers read ahead go first; either side's close
ends the relay, closes the other side and leaves no thread behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from strata.common import eventloop
from strata.proxy import relay

Relay = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader,
                  asyncio.StreamWriter], Awaitable[None]]
WAYS: dict[str, Relay] = {"threads": relay.relay_threads, "protocols": relay.relay_protocols}


class _EchoCompute:
    """The 'compute': answers its first line, then echoes every byte until EOF, and
    keeps the SHA-256 of all it received."""

    def __init__(self) -> None:
        self.digests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ready\n")
        digest = hashlib.sha256()
        try:
            while chunk := await reader.read(65536):
                digest.update(chunk)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        self.digests.append(digest.digest())
        writer.close()


async def _proxy_once(listener: socket.socket, compute_path: str, how: Relay) -> None:
    """Accept one client, forward its first line to the compute and the compute's first
    line back (as the proxy does the startup), then relay."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    reader, writer = await asyncio.open_connection(sock=conn)
    c_reader, c_writer = await asyncio.open_unix_connection(compute_path)
    c_writer.write(await reader.readline())
    writer.write(await c_reader.readline())
    await relay.wait_writes_flushed(writer, c_writer)
    await how(reader, writer, c_reader, c_writer)


def _client(port: int, payload: bytes) -> bytes:
    """Send a line (read ahead by the proxy together with the first payload bytes), then
    the payload while reading the echo, until all of it came back; then close. Returns
    the echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"hello\n" + payload[:1000])
        received = bytearray()
        sender = threading.Thread(target=s.sendall, args=(payload[1000:],))
        sender.start()
        while len(received) < 6 + len(payload):
            chunk = s.recv(1 << 20)
            assert chunk, len(received)
            received += chunk
        sender.join(60)
    assert received[:6] == b"ready\n", bytes(received[:20])
    return bytes(received[6:])


@pytest.mark.parametrize("way", sorted(WAYS))
def test_relay_both_ways_in_order(way: str, tmp_path: Path) -> None:
    """20 MB each way through the relay arrive whole and in order, with the bytes read
    ahead during the 'startup'; the client's close ends the relay, closes the compute's
    side, and the relay's threads are gone."""
    payload = os.urandom(20 * 1024 * 1024)
    compute_path = str(tmp_path / "compute.sock")
    threads_before = threading.active_count()

    echo_compute = _EchoCompute()

    async def main() -> bytes:
        compute = await asyncio.start_unix_server(echo_compute.serve, compute_path)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        async with compute:
            proxy = asyncio.ensure_future(_proxy_once(listener, compute_path, WAYS[way]))
            result = await asyncio.to_thread(_client, port, payload)
            await asyncio.wait_for(proxy, 60)
            while not echo_compute.digests:  # the compute sees its side closed
                await asyncio.sleep(0.01)
        listener.close()
        return result

    echo = eventloop.run(asyncio.wait_for(main(), 120))
    assert echo == payload
    assert echo_compute.digests == [hashlib.sha256(payload).digest()]
    assert threading.active_count() == threads_before, threading.enumerate()


@pytest.mark.parametrize("way", sorted(WAYS))
def test_compute_close_closes_client(way: str, tmp_path: Path) -> None:
    """The compute going away (a FATAL, a crash) closes the client's connection."""
    compute_path = str(tmp_path / "compute.sock")

    async def closing_compute(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ready\nbye")
        await writer.drain()
        writer.close()

    async def main() -> bytes:
        compute = await asyncio.start_unix_server(closing_compute, compute_path)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(b"hello\n")
                got = b""
                while chunk := s.recv(100):
                    got += chunk
                return got

        async with compute:
            proxy = asyncio.ensure_future(_proxy_once(listener, compute_path, WAYS[way]))
            got = await asyncio.to_thread(client)
            await asyncio.wait_for(proxy, 60)
        listener.close()
        return got

    assert eventloop.run(main()) == b"ready\nbye"

"""strata.proxy.relay over real sockets (TCP client side, plain or TLS, unix socket compute
side, as in the proxy): both ways relay every byte in order, with more in flight than a
pipe or a socket buffer holds; bytes the stream readers read ahead go first; either
side's close ends the relay, closes the other side and leaves no thread behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import ssl
import threading
from pathlib import Path

import pytest

from proxy_peers import ComputeGoneWhileClientSends, tls_contexts
from strata.common import eventloop
from strata.proxy import relay
from strata.proxy.tlsrelay import TlsStream

WAYS = ("threads", "protocols", "protocols-tls", "threads-tls")


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the proxy's server context, as strata.proxy.tls makes it; a client context that
    does not check the self-signed certificate)."""
    return tls_contexts(tmp_path_factory.mktemp("tls"))


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


async def _proxy_once(listener: socket.socket, compute_path: str, way: str,
                      tls: ssl.SSLContext | None) -> None:
    """Accept one client (TLS from its first byte if `tls`), forward its first line to
    the compute and the compute's first line back (as the proxy does the startup), then
    relay."""
    served: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = None
            if way == "threads-tls":  # as the proxy: its own session from the handshake on
                assert tls is not None
                writer.write(b"S")
                await relay.wait_writes_flushed(writer)
                stream, received = TlsStream.take_over(reader, writer, tls)
                await stream.handshake(received)
                c_reader, c_writer = await asyncio.open_unix_connection(compute_path)
                c_writer.write(await stream.readexactly(6))
                stream.write(await c_reader.readline())
                await relay.wait_writes_flushed(c_writer)
                await stream.relay(*relay.take_over(c_reader, c_writer))
                served.set_result(None)
                return
            if tls is not None:  # as after an SSLRequest: 'S', then the client's hello
                writer.write(b"S")
                await writer.drain()
                raw = writer.transport
                await writer.start_tls(tls)
            c_reader, c_writer = await asyncio.open_unix_connection(compute_path)
            c_writer.write(await reader.readline())
            writer.write(await c_reader.readline())
            await relay.wait_writes_flushed(writer, c_writer, raw=raw)
            if way.startswith("protocols"):
                await relay.relay_protocols(reader, writer, c_reader, c_writer)
            else:
                await relay.relay_threads(reader, writer, c_reader, c_writer)
            served.set_result(None)
        except BaseException as err:
            served.set_exception(err)

    server = await asyncio.start_server(serve, sock=listener)
    async with server:
        await served


def _tls_client(port: int, payload: bytes, context: ssl.SSLContext) -> bytes:
    """As `_client` over TLS, in lockstep (an SSLSocket is not for two threads): chunks
    of up to 100 kB, each echoed before the next; the first line and bytes in one record."""
    rng = random.Random(7)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as tcp:
        assert tcp.recv(1) == b"S"
        s = context.wrap_socket(tcp, server_hostname="x.localhost")
        s.sendall(b"hello\n" + payload[:1000])
        received = bytearray()
        sent = 1000
        while len(received) < 6 + len(payload):
            if len(received) >= 6 + sent and sent < len(payload):
                n = rng.randrange(1, 100_000)
                s.sendall(payload[sent:sent + n])
                sent += n
            chunk = s.recv(1 << 20)
            assert chunk, len(received)
            received += chunk
    assert received[:6] == b"ready\n", bytes(received[:20])
    return bytes(received[6:])


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


@pytest.mark.parametrize("way", WAYS)
def test_relay_both_ways_in_order(way: str, tmp_path: Path,
                                  tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """20 MB each way through the relay arrive whole and in order, with the bytes read
    ahead during the 'startup'; the client's close ends the relay, closes the compute's
    side, and the relay's threads are gone."""
    tls = way.endswith("-tls")
    payload = os.urandom((5 if tls else 20) * 1024 * 1024)
    compute_path = str(tmp_path / "compute.sock")
    threads_before = threading.active_count()

    echo_compute = _EchoCompute()

    async def main() -> bytes:
        compute = await asyncio.start_unix_server(echo_compute.serve, compute_path)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        async with compute:
            proxy = asyncio.ensure_future(_proxy_once(
                listener, compute_path, way, tls_pair[0] if tls else None))
            if tls:
                result = await asyncio.to_thread(_tls_client, port, payload, tls_pair[1])
            else:
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


@pytest.mark.parametrize("way", WAYS)
def test_compute_close_closes_client(way: str, tmp_path: Path,
                                     tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """The compute going away (a FATAL, a crash) closes the client's connection (over
    TLS with a close_notify: the client reads a clean end)."""
    tls = way.endswith("-tls")
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
            with socket.create_connection(("127.0.0.1", port), timeout=60) as tcp:
                assert not tls or tcp.recv(1) == b"S"
                s = tls_pair[1].wrap_socket(tcp, server_hostname="x.localhost",
                                            suppress_ragged_eofs=False) if tls else tcp
                s.sendall(b"hello\n")
                got = b""
                while chunk := s.recv(100):
                    got += chunk
                return got

        async with compute:
            proxy = asyncio.ensure_future(_proxy_once(
                listener, compute_path, way, tls_pair[0] if tls else None))
            got = await asyncio.to_thread(client)
            await asyncio.wait_for(proxy, 60)
        listener.close()
        return got

    assert eventloop.run(main()) == b"ready\nbye"


def test_compute_gone_while_client_sends(tmp_path: Path) -> None:
    """(Plain threads; TLS: test_proxy_tlsrelay.py.) A compute that stops reading, then
    sends its last bytes and closes (as a terminated backend's FATAL): the client's bytes
    sent meanwhile fail to reach it, yet the client still gets the last bytes."""
    with ComputeGoneWhileClientSends(str(tmp_path / "compute.sock")) as compute:

        async def main() -> bytes:
            async def serve(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
                c_reader, c_writer = await asyncio.open_unix_connection(
                    sock=compute.connect())
                await relay.wait_writes_flushed(writer, c_writer)
                await relay.relay_threads(reader, writer, c_reader, c_writer)

            srv = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]

            def client() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                    return compute.client_exchange(s)

            async with srv:
                return await asyncio.to_thread(client)

        assert eventloop.run(asyncio.wait_for(main(), 60)) == compute.EXPECTED

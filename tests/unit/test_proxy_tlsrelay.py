"""strata.proxy.tlsrelay over real sockets: the proxy's own TLS session (handshake, reads
and writes on the event loop) ends with a close_notify when the proxy closes it, and in
the relay threads a client's corrupted record ends the relay and closes the compute's
side. (Both directions' bytes in order: tests/unit/test_proxy_relay.py, way
`threads-tls`.)"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

import pytest

from proxy_peers import ComputeGoneWhileClientSends, tls_contexts
from strata.common import eventloop
from strata.proxy import relay
from strata.proxy.tlsrelay import TlsStream


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return tls_contexts(tmp_path_factory.mktemp("tls"))


def _sni_of(context: ssl.SSLContext, names: dict[int, str]) -> None:
    def on_sni(obj: object, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name:
            names[id(obj)] = name
    context.sni_callback = on_sni


def test_startup_phase_and_close_notify(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """The proxy reads the client's bytes and answers through its own session (the SNI
    host name seen by the context's callback), then closes: the client reads a clean TLS
    end (close_notify), not a bare EOF (which libpq reports as an error)."""
    server, client_ctx = contexts
    names: dict[int, str] = {}
    _sni_of(server, names)

    async def main() -> tuple[bytes, str | None]:
        seen: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"S")
            await relay.wait_writes_flushed(writer)
            stream, received = TlsStream.take_over(reader, writer, server)
            await stream.handshake(received)
            seen.set_result(names.pop(id(stream.ssl_object), None))
            got = await stream.readexactly(5)
            stream.write(got.upper() + b"!" * 100_000)
            await stream.drain()
            stream.close()
            assert stream.is_closing()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as tcp:
                assert tcp.recv(1) == b"S"
                s = client_ctx.wrap_socket(tcp, server_hostname="ep1.localhost",
                                           suppress_ragged_eofs=False)
                s.sendall(b"hello")
                got = b""
                while chunk := s.recv(65536):  # SSLEOFError on a bare end
                    got += chunk
                return got

        async with srv:
            got = await asyncio.to_thread(client)
        return got, await seen

    got, name = eventloop.run(asyncio.wait_for(main(), 60))
    assert got == b"HELLO" + b"!" * 100_000
    assert name == "ep1.localhost"


def test_bad_record_ends_the_relay(tmp_path: Path,
                                   contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Bytes that are not a record of the session (here: garbage on the TCP connection
    after the handshake) end the relay: the compute's side is closed, the relay returns,
    and nothing of the garbage reaches the compute."""
    server, client_ctx = contexts
    compute_path = str(tmp_path / "compute.sock")

    async def main() -> bytes:
        compute_got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def compute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
                if data == b"before":
                    writer.write(b"ok")
            compute_got.set_result(data)
            writer.close()

        relayed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"S")
            await relay.wait_writes_flushed(writer)
            stream, received = TlsStream.take_over(reader, writer, server)
            await stream.handshake(received)
            c_reader, c_writer = await asyncio.open_unix_connection(compute_path)
            await stream.relay(*relay.take_over(c_reader, c_writer))
            relayed.set_result(None)

        comp = await asyncio.start_unix_server(compute, compute_path)
        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]

        def client() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as tcp:
                assert tcp.recv(1) == b"S"
                s = client_ctx.wrap_socket(tcp, server_hostname="x.localhost")
                s.sendall(b"before")
                assert s.recv(2) == b"ok"
                # A record header and a body the session cannot authenticate.
                # (wrap_socket took over `tcp`'s descriptor.)
                os.write(s.fileno(), b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
                try:
                    while s.recv(100):
                        pass
                except (OSError, ssl.SSLError):
                    pass  # reset or a bare end: the connection is over either way

        async with comp, srv:
            await asyncio.to_thread(client)
            await asyncio.wait_for(relayed, 30)
            return await asyncio.wait_for(compute_got, 30)

    assert eventloop.run(asyncio.wait_for(main(), 60)) == b"before"


def test_compute_gone_while_client_sends(tmp_path: Path,
                                         contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A compute that stops reading and then sends its last bytes and closes (as a
    terminated backend's FATAL): the client's bytes sent meanwhile fail to reach it, yet
    the client still gets the last bytes and a clean TLS end."""
    server, client_ctx = contexts
    with ComputeGoneWhileClientSends(str(tmp_path / "compute.sock")) as compute:

        async def main() -> bytes:
            async def serve(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
                writer.write(b"S")
                await relay.wait_writes_flushed(writer)
                stream, received = TlsStream.take_over(reader, writer, server)
                await stream.handshake(received)
                c_reader, c_writer = await asyncio.open_unix_connection(
                    sock=compute.connect())
                await stream.relay(*relay.take_over(c_reader, c_writer))

            srv = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]

            def client() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as tcp:
                    assert tcp.recv(1) == b"S"
                    # No ragged EOFs: a bare end (no close_notify) raises SSLEOFError.
                    return compute.client_exchange(client_ctx.wrap_socket(
                        tcp, server_hostname="x.localhost", suppress_ragged_eofs=False))

            async with srv:
                return await asyncio.to_thread(client)

        assert eventloop.run(asyncio.wait_for(main(), 60)) == compute.EXPECTED

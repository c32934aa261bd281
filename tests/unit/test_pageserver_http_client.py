"""`PageserverClient` against a pageserver that misbehaves at the socket level: each way
of not answering (refused, hung, closed mid-request, garbled) is one `Unavailable` that
names the pageserver and the request, never a raw `OSError` or `http.client` exception
(those used to escape through `strata` commands as tracebacks)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from strata.common.errors import Unavailable
from strata.pageserver.client import AsyncPageserverClient, PageserverClient


def _serve(listener: socket.socket, behave: Callable[[socket.socket], None],
           stop: threading.Event) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.recv(65536)  # the request
            behave(conn)


def _hang(conn: socket.socket) -> None:
    conn.recv(65536)  # until the client gives up and closes


@pytest.fixture
def fake_pageserver() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(behave: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        thread = threading.Thread(target=_serve, args=(listener, behave, stop), daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)
    for listener in listeners:
        listener.close()


@pytest.mark.parametrize("behave, reason", [
    (lambda conn: None, "RemoteDisconnected"),  # closes without an answer (it died)
    (lambda conn: conn.sendall(b"garbage\r\n\r\n"), "BadStatusLine"),
    (_hang, "no answer within 0.5s"),
])
def test_no_answer_is_one_unavailable(fake_pageserver: Callable[..., int],
                                      behave: Callable[[socket.socket], None],
                                      reason: str) -> None:
    port = fake_pageserver(behave)
    client = PageserverClient("127.0.0.1", port, 0, timeout_s=0.5)
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port} did not answer GET /v1/tenant "
                                          rf"\({reason}"):
        client.list_tenants()


def test_refused_is_unavailable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    client = PageserverClient("127.0.0.1", port, 0, timeout_s=5)
    with pytest.raises(Unavailable, match="ConnectionRefusedError"):
        client.status()


async def _http_server(close_after_answer: bool) -> tuple[asyncio.Server, list[int]]:
    """A real HTTP/1.1 server on a socket that answers every GET with `{"n": <count>}`
    and counts the connections it accepted; with `close_after_answer`, it closes each
    connection after one answer without saying so (a pageserver restarted between polls)."""
    connections = [0]
    answered = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while (await reader.readuntil(b"\r\n\r\n")):
                answered[0] += 1
                body = json.dumps({"n": answered[0]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, connections


@pytest.mark.parametrize("close_after_answer", [False, True])
def test_async_client_keeps_the_callers_session(close_after_answer: bool) -> None:
    """With the caller's session, requests share one kept-alive connection (the
    walproposer's pageserver polls); a connection the server closed in between is
    replaced, not an error. Without a session, each request opens its own."""
    import aiohttp

    async def main() -> tuple[list[object], int, int]:
        server, connections = await _http_server(close_after_answer)
        port = server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                client = AsyncPageserverClient("127.0.0.1", port, 0, timeout_s=5,
                                               session=session)
                answers = []
                for _ in range(3):
                    answers.append(await client.request("GET", "/v1/status"))
                    await asyncio.sleep(0.05)  # the server's close arrives in between
                assert not session.closed
            shared = connections[0]
            plain = AsyncPageserverClient("127.0.0.1", port, 0, timeout_s=5)
            for _ in range(2):
                await plain.request("GET", "/v1/status")
            return answers, shared, connections[0] - shared
        finally:
            server.close()
            await server.wait_closed()

    answers, shared, unshared = asyncio.run(main())
    assert answers == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert shared == (3 if close_after_answer else 1)
    assert unshared == 2

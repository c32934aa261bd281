"""`PageserverClient` against a pageserver that misbehaves at the socket level: each way
of not answering (refused, hung, closed mid-request, garbled) is one `Unavailable` that
names the pageserver and the request, never a raw `OSError` or `http.client` exception
(those used to escape through `strata` commands as tracebacks)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from strata.common.errors import Unavailable
from strata.pageserver.client import PageserverClient


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

"""`strata.common.httpjson` against a socket server that answers with fixed bytes: each
body framing (Content-Length, chunked, to the end of the connection), the request it
sends, and each way of not answering as its own exception."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from strata.common import httpjson


class _OneShot:
    """Accepts one connection, records the request, sends `answer`, closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.request = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(65536)
            head, _, body = self.request.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            while length and len(body) < length[0]:
                body += conn.recv(65536)
            self.request = head + b"\r\n\r\n" + body
            conn.sendall(self.answer)

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[type[_OneShot]]:
    servers: list[_OneShot] = []

    class Server(_OneShot):
        def __init__(self, answer: bytes) -> None:
            super().__init__(answer)
            servers.append(self)

    yield Server
    for server in servers:
        server.close()


def test_content_length_body_and_request(serve: type[_OneShot]) -> None:
    server = serve(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 11\r\n\r\n{\"a\": 1}xyzIGNORED")
    resp = httpjson.request("127.0.0.1", server.port, "POST", "/v1/x?y=1", body=b'{"k": 2}',
                            headers={"Authorization": "Bearer t"}, timeout_s=5)
    assert (resp.status, resp.reason, resp.body) == (201, "Created", b'{"a": 1}xyz')
    assert resp.headers["content-type"] == "application/json"
    server.close()
    head, _, body = server.request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?y=1 HTTP/1.1"
    assert b"Authorization: Bearer t" in lines
    assert b"Connection: close" in lines
    assert b"Content-Length: 8" in lines
    assert body == b'{"k": 2}'


def test_chunked_body(serve: type[_OneShot]) -> None:
    server = serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\n\r\n")
    resp = httpjson.request("127.0.0.1", server.port, "GET", "/", timeout_s=5)
    assert resp.body == b"Wikipedia in \r\n\r\nchunks."


def test_body_to_the_end_and_error_status(serve: type[_OneShot]) -> None:
    server = serve(b"HTTP/1.0 404 Not Found\r\n\r\n{\"error\": \"no such tenant\"}")
    resp = httpjson.request("127.0.0.1", server.port, "GET", "/v1/tenant/x", timeout_s=5)
    assert (resp.status, resp.body) == (404, b'{"error": "no such tenant"}')


@pytest.mark.parametrize("answer, error", [
    (b"", httpjson.RemoteDisconnected),
    (b"garbage\r\n\r\n", httpjson.BadStatusLine),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", httpjson.BadResponse),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", httpjson.BadResponse),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", httpjson.BadResponse),
    (b"HTTP/1.1 200 OK\r\nContent-Le", httpjson.BadResponse),
])
def test_broken_answers(serve: type[_OneShot], answer: bytes,
                        error: type[Exception]) -> None:
    server = serve(answer)
    with pytest.raises(error):
        httpjson.request("127.0.0.1", server.port, "GET", "/", timeout_s=5)


def test_refused_is_the_socket_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        httpjson.request("127.0.0.1", port, "GET", "/", timeout_s=5)

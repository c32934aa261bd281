"""A minimal blocking HTTP/1.1 client for Strata's own JSON APIs (the pageserver's and the
safekeepers' HTTP ports): one request per connection (`Connection: close`), plain TCP.

It exists so that the CLI's start path does not import `urllib.request` and
`http.client`, which bring `ssl` and most of `email` with them (~15 ms of a ~130 ms
import on a quiet machine; issue 13). The answer is read whole: a `Content-Length` body,
a chunked one, or up to the end of the connection.

Failures: no connection, a reset or a timeout are the `OSError` the socket raised
(`ConnectionRefusedError`, `TimeoutError`, ...); a server that closes without an answer
is `RemoteDisconnected` (an `OSError` too); an answer that is not HTTP is
`BadStatusLine` or `BadResponse` (`HttpProtocolError`). Error statuses are not
exceptions: the caller reads `Response.status`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 256 << 20


class RemoteDisconnected(ConnectionResetError):
    """The server closed the connection without answering."""


class HttpProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it."""


class BadStatusLine(HttpProtocolError):
    """The answer's first line is not an HTTP status line."""


class BadResponse(HttpProtocolError):
    """Malformed headers, chunk sizes or a body shorter than announced."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


def request(host: str, port: int, method: str, path: str, *, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout_s: float = 60) -> Response:
    """Send one request and read its whole answer (`timeout_s` bounds the connection
    and each read)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             "Accept-Encoding: identity"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(head + body if body else head)
        return _read_response(sock, method)


def _read_response(sock: socket.socket, method: str) -> Response:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEADER_BYTES:
            raise BadResponse(f"answer headers longer than {MAX_HEADER_BYTES} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            if not buf:
                raise RemoteDisconnected("the server closed the connection without an answer")
            if b"\r\n" not in buf and not buf.startswith(b"HTTP/"):
                raise BadStatusLine(repr(bytes(buf[:80])))
            raise BadResponse("the answer ended inside its headers")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1")
    rest = bytes(buf[end + 4:])
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() \
            or len(parts[1]) != 3:
        raise BadStatusLine(repr(status_line[:80]))
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadResponse(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Response(status, reason, headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(sock, rest)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise BadResponse(f"bad Content-Length {headers['content-length']!r}") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise BadResponse(f"Content-Length {length} out of range")
        body = _read_exactly(sock, rest, length)
    else:
        body = _read_to_end(sock, rest)
    return Response(status, reason, headers, body)


def _read_exactly(sock: socket.socket, have: bytes, length: int) -> bytes:
    buf = bytearray(have)
    while len(buf) < length:
        chunk = sock.recv(min(1 << 20, length - len(buf)))
        if not chunk:
            raise BadResponse(f"the answer ended after {len(buf)} of {length} body bytes")
        buf += chunk
    return bytes(buf[:length])


def _read_to_end(sock: socket.socket, have: bytes) -> bytes:
    buf = bytearray(have)
    while chunk := sock.recv(1 << 20):
        buf += chunk
        if len(buf) > MAX_BODY_BYTES:
            raise BadResponse(f"answer body longer than {MAX_BODY_BYTES} bytes")
    return bytes(buf)


def _read_chunked(sock: socket.socket, have: bytes) -> bytes:
    buf = bytearray(have)
    out = bytearray()
    pos = 0

    def need(n: int) -> None:
        while len(buf) - pos < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise BadResponse("the answer ended inside a chunked body")
            buf.extend(chunk)

    while True:
        while (eol := buf.find(b"\r\n", pos)) < 0:
            need(len(buf) - pos + 1)
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadResponse(f"bad chunk size {size_text[:20]!r}") from None
        pos = eol + 2
        if size == 0:
            return bytes(out)  # trailers, if any, are not read (the connection closes)
        need(size + 2)
        out += buf[pos:pos + size]
        pos += size + 2
        if len(out) > MAX_BODY_BYTES:
            raise BadResponse(f"answer body longer than {MAX_BODY_BYTES} bytes")

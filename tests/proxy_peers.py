"""Real socket peers for the proxy relay's unit tests (tests/unit/test_proxy_relay.py,
test_proxy_tlsrelay.py): the TLS contexts of the proxy and its client, and the compute
that goes away while the client sends. Import as `from proxy_peers import ...` (pytest
puts `tests/` on sys.path through the root conftest).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from types import TracebackType

from strata.proxy.tls import make_self_signed, server_context


def tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the proxy's server context, as strata.proxy.tls makes it, for a self-signed
    certificate written to `directory`; a client context that does not check it)."""
    cert, key = make_self_signed(directory, "localhost")
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server_context(cert, key), client


class ComputeGoneWhileClientSends:
    """A compute on a unix socket (a plain socket peer, no PostgreSQL) that reads the
    client's `hello`, stops reading (its peer's sends now fail), answers `ready`, waits
    until the client sent more, then sends its last bytes `FATAL` and closes, as a
    terminated backend does. Serves one connection in a thread while in a `with` block;
    leaving the block joins it and raises what failed in it.

    The client side is `client_exchange`; through a relay that delivers the compute's
    last bytes it returns `EXPECTED`."""

    EXPECTED = b"readyFATAL"

    def __init__(self, path: str) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(path)
        self._listener.listen()
        self._client_sent = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="compute", daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                assert conn.recv(5) == b"hello"
                conn.shutdown(socket.SHUT_RD)  # gone for the client's bytes: they fail
                conn.sendall(b"ready")
                assert self._client_sent.wait(30), "the client never sent its bytes"
                time.sleep(0.3)  # (ordering only: the relay's send of 'more' fails first)
                conn.sendall(b"FATAL")
        except BaseException as err:
            self._error = err

    def __enter__(self) -> ComputeGoneWhileClientSends:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:  # the test failed already: do not leave the thread waiting
            self._client_sent.set()
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes its accept()
        self._thread.join(30)
        self._listener.close()
        if kind is None:
            assert not self._thread.is_alive(), "the compute did not finish"
            if self._error is not None:
                raise self._error

    def connect(self) -> socket.socket:
        """A new connection to the compute (the proxy's side)."""
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.path)
        return sock

    def client_exchange(self, s: socket.socket) -> bytes:
        """The client on its connection to the proxy (plain, or TLS after the handshake):
        `hello`, the 5-byte answer, then `more` while the compute no longer reads; then
        everything until the end. Returns all it got."""
        s.sendall(b"hello")
        got = s.recv(5)
        s.sendall(b"more")
        self._client_sent.set()
        while chunk := s.recv(100):  # over TLS without ragged EOFs: SSLEOFError on a bare end
            got += chunk
        return got

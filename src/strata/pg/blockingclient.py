"""A blocking PostgreSQL v3 client for the few exchanges on `strata endpoint start`'s path:
start-up (trust, cleartext or md5 password), a command answered with CopyOut (the
pageserver's `basebackup`) or CopyBoth (a safekeeper's `proposer` stream), and a simple
query answered with text rows (the application role's check on a compute).

Why not `strata.pg.pgclient`: that one runs on asyncio over `strata.pg.wire`'s message
classes, and importing the two (~30 ms of CPU, several times that on a busy machine) was
a tenth of the CLI's start (issue 13). This client frames messages itself and decodes
only what the happy path needs; anything unexpected (an ErrorResponse, a message out of
place) is decoded with `strata.pg.wire`, imported then, and raised as the asyncio
client would (`ServerError`, `ProtocolError`), so callers see the same errors.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from strata.common.errors import CorruptionError, ProtocolError, Unavailable, UserError

PROTOCOL_VERSION_3 = 196608  # PG_PROTOCOL(3, 0), as strata.pg.wire.PROTOCOL_VERSION_3
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # strata.pg.wire.DEFAULT_MAX_MESSAGE_BYTES
_READ_CHUNK_BYTES = 256 * 1024
_HEADER = struct.Struct("!cI")
_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
# Authentication request codes (pqcomm.h AUTH_REQ_*).
_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5 = 0, 3, 5


def md5_password(user: str, password: str, salt: bytes) -> str:
    """'md5' + md5(md5(password + user) + salt), as in PostgreSQL's `pg_md5_encrypt`."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def _cstr(text: str) -> bytes:
    raw = text.encode()
    assert b"\0" not in raw, f"NUL inside protocol string {text!r}"
    return raw + b"\0"


def _typed(tag: bytes, body: bytes) -> bytes:
    return tag + _I32.pack(len(body) + 4) + body


def copy_data(payload: bytes) -> bytes:
    """A CopyData message ('d') carrying `payload`."""
    return _typed(b"d", payload)


def _data_row(body: bytes) -> tuple[str | None, ...]:
    """The text values of a DataRow ('D') body: int16 count, then per column an int32
    length (-1: NULL) and that many bytes."""
    count = _I16.unpack_from(body)[0]
    offset = 2
    values: list[str | None] = []
    for _ in range(count):
        length = _I32.unpack_from(body, offset)[0]
        offset += 4
        if length < 0:
            values.append(None)
            continue
        values.append(body[offset:offset + length].decode())
        offset += length
    if offset != len(body):
        raise ProtocolError(f"DataRow of {len(body)} bytes holds {offset} bytes of columns")
    return tuple(values)


class BlockingPgConnection:
    """One connection; every read waits at most until the deadline given to it."""

    def __init__(self, sock: socket.socket, describe: str) -> None:
        self.sock = sock
        self.describe = describe
        self._buf = bytearray()
        self._closed = False

    @classmethod
    def connect(cls, host: str, port: int, *, user: str, database: str | None = None,
                application_name: str | None = None, password: str | None = None,
                timeout_s: float = 10) -> BlockingPgConnection:
        """Open a connection and authenticate, within `timeout_s`. Unavailable if the
        server cannot be reached or does not answer, ServerError if it refuses us."""
        describe = f"postgres at {host}:{port} as {user}"
        deadline = time.monotonic() + timeout_s
        try:
            if host.startswith("/"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout_s)
                try:
                    sock.connect(f"{host}/.s.PGSQL.{port}")
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((host, port), timeout=timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as err:
            raise Unavailable(f"cannot connect to {describe}: {err}; is it running?") from err
        conn = cls(sock, describe)
        try:
            conn._startup(user, database, application_name, password, deadline)
        except BaseException:
            conn.close()
            raise
        return conn

    def _startup(self, user: str, database: str | None, application_name: str | None,
                 password: str | None, deadline: float) -> None:
        params = [("user", user)]
        if database is not None:
            params.append(("database", database))
        if application_name is not None:
            params.append(("application_name", application_name))
        body = _I32.pack(PROTOCOL_VERSION_3) + b"".join(
            _cstr(k) + _cstr(v) for k, v in params) + b"\0"
        self.send(_I32.pack(len(body) + 4) + body)
        while True:
            tag, body = self.read_message(deadline, "the startup packet")
            if tag == b"R" and len(body) >= 4:
                code = _I32.unpack_from(body)[0]
                if code == _AUTH_OK:
                    continue
                if code == _AUTH_CLEARTEXT:
                    self.send(_typed(b"p", _cstr(self._need(password))))
                    continue
                if code == _AUTH_MD5 and len(body) == 8:
                    answer = md5_password(user, self._need(password), body[4:8])
                    self.send(_typed(b"p", _cstr(answer)))
                    continue
                raise UserError(f"{self.describe} asks for authentication method {code} "
                                "(SASL/GSS/SSPI), which Strata's client does not speak; "
                                "use trust, password or md5 in pg_hba.conf")
            if tag in (b"S", b"K", b"N"):  # ParameterStatus, BackendKeyData, NoticeResponse
                continue
            if tag == b"Z":
                return
            self._unexpected(tag, body, f"{self.describe} refused the connection",
                             "during start-up")

    def _need(self, password: str | None) -> str:
        if password is None:
            raise UserError(f"{self.describe} asks for a password and none was given")
        return password

    # --- I/O ------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as err:
            raise Unavailable(f"connection to {self.describe} lost while sending: {err}") \
                from err

    def read_message(self, deadline: float | None, waiting_for: str) -> tuple[bytes, bytes]:
        """The next backend message as (tag, body); Unavailable once `deadline` (a
        time.monotonic() value; None: no limit) passes or the connection ends."""
        buf = self._buf
        while True:
            if len(buf) >= 5:
                tag, length = _HEADER.unpack_from(buf)
                if length < 4 or length > MAX_MESSAGE_BYTES:
                    raise ProtocolError(f"{self.describe}: message {tag!r} of length {length}")
                if len(buf) >= length + 1:
                    body = bytes(buf[5:length + 1])
                    del buf[:length + 1]
                    return tag, body
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"{self.describe}: no answer to {waiting_for} in time")
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(_READ_CHUNK_BYTES)
            except TimeoutError as err:
                raise Unavailable(f"{self.describe}: no answer to {waiting_for} in "
                                  "time") from err
            except OSError as err:
                raise Unavailable(f"connection to {self.describe} lost: {err}") from err
            if not chunk:
                raise Unavailable(f"{self.describe} closed the connection")
            buf += chunk

    def _unexpected(self, tag: bytes, body: bytes, context: str, where: str) -> None:
        """Raise what the asyncio client raises for this message: ServerError(context)
        for an ErrorResponse (decoded by strata.pg.wire), else ProtocolError."""
        from strata.pg import wire
        from strata.pg.pgclient import ServerError

        msg = wire._decode_backend(tag[0], body)
        if isinstance(msg, wire.ErrorResponse):
            raise ServerError(msg, context)
        raise ProtocolError(f"{self.describe}: unexpected {type(msg).__name__} {where}")

    # --- commands -------------------------------------------------------------------
    def copy_out(self, command: str, out: BinaryIO, deadline: float | None) -> int:
        """Run `command`, which answers with CopyOut; write its data to `out` and return
        its size. An error from the server is raised once it is ready again (XX001, data
        corruption, as CorruptionError)."""
        size = 0

        def on_data(body: bytes) -> None:
            nonlocal size
            out.write(body)
            size += len(body)
        try:
            self._run(command, deadline, b"d", on_data, (b"H", b"c", b"C", b"N", b"S"))
        except UserError as err:
            if getattr(err, "code", None) == "XX001":
                raise CorruptionError(str(err)) from None
            raise
        return size

    def simple_query(self, command: str, deadline: float | None) -> list[tuple[str | None, ...]]:
        """Run `command` (one statement, simple protocol) and return its rows as text
        (None for NULL). An error from the server is raised once it is ready again."""
        rows: list[tuple[str | None, ...]] = []
        self._run(command, deadline, b"D", lambda body: rows.append(_data_row(body)),
                  (b"T", b"C", b"I", b"N", b"S"))
        return rows

    def _run(self, command: str, deadline: float | None, data_tag: bytes,
             on_data: Callable[[bytes], object], ignored: tuple[bytes, ...]) -> None:
        """Send `command` as a simple Query and read up to ReadyForQuery: each `data_tag`
        message's body goes to `on_data`, `ignored` tags are skipped, and an ErrorResponse
        is raised once the server is ready again (the connection stays usable)."""
        self.send(_typed(b"Q", _cstr(command)))
        error: tuple[bytes, bytes] | None = None
        while True:
            tag, body = self.read_message(deadline, repr(command))
            if tag == data_tag:
                on_data(body)
            elif tag in ignored:
                pass
            elif tag == b"E":
                error = (tag, body)
            elif tag == b"Z":
                if error is not None:
                    self._unexpected(*error, f"{command!r} on {self.describe}", "")
                return
            else:
                self._unexpected(tag, body, f"{command!r} on {self.describe}",
                                 f"in the reply to {command!r}")

    def start_copy_both(self, command: str, deadline: float | None) -> None:
        """Send `command`, which answers with CopyBothResponse; ServerError if refused."""
        self.send(_typed(b"Q", _cstr(command)))
        while True:
            tag, body = self.read_message(deadline, repr(command))
            if tag == b"W":
                return
            if tag in (b"N", b"S"):
                continue
            if tag == b"E":
                # The command failed, not the session: the server is ready again after it.
                while self.read_message(deadline, repr(command))[0] != b"Z":
                    pass
            self._unexpected(tag, body, f"{command!r} on {self.describe}",
                             f"instead of CopyBothResponse to {command!r}")

    def read_copy_data(self, command: str) -> bytes | None:
        """In CopyBoth: the next CopyData payload (waiting as long as it takes), None once
        the server sent CopyDone."""
        while True:
            tag, body = self.read_message(None, repr(command))
            if tag == b"d":
                return body
            if tag == b"c":
                return None
            if tag in (b"N", b"S"):
                continue
            self._unexpected(tag, body, f"{command!r} on {self.describe}",
                             f"in CopyBoth mode of {command!r}")

    def close(self) -> None:
        """Send Terminate (if the socket still takes it) and close."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.setblocking(False)
            self.sock.send(_typed(b"X", b""))
        except OSError:
            pass  # the peer is gone already; nothing to tell it
        self.sock.close()

    def abort(self) -> None:
        """Close at once; a thread blocked reading the socket gets an error."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

"""A small asyncio PostgreSQL client over `strata.pg.wire`: connect, simple queries, CopyBoth.

Enough for Strata's own processes to talk to PostgreSQL and to each other:
trust, cleartext and md5 authentication (no SCRAM: `scramp` is not a
dependency, and Strata's computes run with trust over loopback), simple-query
results as text, and the CopyBoth stream that START_REPLICATION opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol, cast

from strata.common.errors import ProtocolError, Unavailable, UserError
from strata.pg import wire

log = logging.getLogger(__name__)

_READ_CHUNK_BYTES = 256 * 1024
_READY_AFTER_ERROR_S = 5.0  # how long an ERROR in CopyBoth waits for ReadyForQuery


class ServerError(UserError):
    """The server answered with an ErrorResponse; `response` has its fields."""

    def __init__(self, response: wire.ErrorResponse, context: str) -> None:
        text = f"{context}: {response.severity} {response.code}: {response.message}"
        if response.detail:
            text += f" (detail: {response.detail})"
        if response.hint:
            text += f" (hint: {response.hint})"
        super().__init__(text)
        self.response = response

    @property
    def code(self) -> str:
        return self.response.code


@dataclass(frozen=True, slots=True)
class QueryResult:
    """The last result set of a simple query: column names, text rows, command tag."""

    columns: tuple[str, ...]
    rows: list[tuple[str | None, ...]]
    tag: str


def md5_password(user: str, password: str, salt: bytes) -> str:
    """'md5' + md5(md5(password + user) + salt), as in PostgreSQL's `pg_md5_encrypt`."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


class PgConnection:
    """One client connection. Not safe for concurrent use by several tasks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 *, max_message_bytes: int, describe: str) -> None:
        self._reader = reader
        self._writer = writer
        self._messages = wire.MessageReader("backend", max_message_bytes=max_message_bytes)
        self.describe = describe
        self.parameters: dict[str, str] = {}
        self.backend_pid = 0
        self.secret_key = 0
        self.notices: list[wire.NoticeResponse] = []
        self._pending: wire.BackendMessage | None = None  # decoded but not yet consumed
        self._closed = False

    # --- connect --------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int, *, user: str, database: str | None = None,
                      replication: str | None = None, application_name: str | None = None,
                      password: str | None = None, timeout_s: float = 10,
                      max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES) -> PgConnection:
        """Open a connection and authenticate. `replication="true"` asks for a physical
        walsender, `"database"` for a logical one. A `host` that starts with "/" is a
        unix socket directory (as in libpq: the socket is `host/.s.PGSQL.port`). Raises
        Unavailable if the server cannot be reached, ServerError if it refuses us."""
        describe = f"postgres at {host}:{port} as {user}"
        try:
            async with asyncio.timeout(timeout_s):
                if host.startswith("/"):
                    reader, writer = await asyncio.open_unix_connection(
                        f"{host}/.s.PGSQL.{port}")
                else:
                    reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as err:
            raise Unavailable(f"cannot connect to {describe}: {err}; is it running?") from err
        conn = cls(reader, writer, max_message_bytes=max_message_bytes, describe=describe)
        params = [("user", user)]
        if database is not None:
            params.append(("database", database))
        if replication is not None:
            params.append(("replication", replication))
        if application_name is not None:
            params.append(("application_name", application_name))
        try:
            async with asyncio.timeout(timeout_s):
                await conn._startup(wire.StartupMessage(tuple(params)), user, password)
        except TimeoutError as err:
            conn.abort()
            raise Unavailable(f"{describe}: no answer to the startup packet within "
                              f"{timeout_s}s") from err
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _startup(self, startup: wire.StartupMessage, user: str,
                       password: str | None) -> None:
        await self._send(startup.encode())
        while True:
            msg = await self._receive()
            match msg:
                case wire.AuthenticationOk():
                    pass
                case wire.AuthenticationCleartextPassword():
                    await self._send(wire.PasswordMessage(self._need(password)).encode())
                case wire.AuthenticationMD5Password(salt=salt):
                    answer = md5_password(user, self._need(password), salt)
                    await self._send(wire.PasswordMessage(answer).encode())
                case wire.AuthenticationOther(code=code):
                    raise UserError(f"{self.describe} asks for authentication method {code} "
                                    "(SASL/GSS/SSPI), which Strata's client does not speak; "
                                    "use trust, password or md5 in pg_hba.conf")
                case wire.ParameterStatus(name=name, value=value):
                    self.parameters[name] = value
                case wire.BackendKeyData(process_id=pid, secret_key=key):
                    self.backend_pid, self.secret_key = pid, key
                case wire.ErrorResponse():
                    raise ServerError(msg, f"{self.describe} refused the connection")
                case wire.NoticeResponse():
                    self.notices.append(msg)
                case wire.ReadyForQuery():
                    return
                case _:
                    raise ProtocolError(f"{self.describe}: unexpected {type(msg).__name__} "
                                        "during start-up")

    def _need(self, password: str | None) -> str:
        if password is None:
            raise UserError(f"{self.describe} asks for a password and none was given")
        return password

    # --- I/O ------------------------------------------------------------------------
    async def _send(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as err:
            raise Unavailable(f"connection to {self.describe} lost while sending: {err}") \
                from err

    def send_nowait(self, data: bytes) -> None:
        """Queue bytes without waiting for the socket buffer to drain."""
        self._writer.write(data)

    async def _receive(self) -> wire.BackendMessage:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        while True:
            msg = self._messages.next_backend()
            if msg is not None:
                return msg
            try:
                chunk = await self._reader.read(_READ_CHUNK_BYTES)
            except OSError as err:
                raise Unavailable(f"connection to {self.describe} lost: {err}") from err
            if not chunk:
                raise Unavailable(f"{self.describe} closed the connection")
            self._messages.feed(chunk)

    # --- queries --------------------------------------------------------------------
    async def simple_query(self, sql: str) -> QueryResult:
        """Run `sql` with the simple query protocol; return the last result set.

        An ErrorResponse becomes ServerError once the server is ready again, so the
        connection stays usable."""
        await self._send(wire.Query(sql).encode())
        columns: tuple[str, ...] = ()
        rows: list[tuple[str | None, ...]] = []
        tag = ""
        error: wire.ErrorResponse | None = None
        while True:
            msg = await self._receive()
            match msg:
                case wire.RowDescription(fields=fields):
                    columns, rows = tuple(fd.name for fd in fields), []
                case wire.DataRow(values=values):
                    rows.append(tuple(None if v is None else v.decode() for v in values))
                case wire.CommandComplete(tag=t):
                    tag = t
                case wire.EmptyQueryResponse():
                    tag = ""
                case wire.ErrorResponse():
                    error = msg
                case wire.NoticeResponse():
                    self.notices.append(msg)
                case wire.ParameterStatus(name=name, value=value):
                    self.parameters[name] = value
                case wire.ReadyForQuery():
                    if error is not None:
                        raise ServerError(error, f"query {sql!r} on {self.describe}")
                    return QueryResult(columns, rows, tag)
                case wire.CopyOutResponse() | wire.CopyBothResponse() | wire.CopyInResponse():
                    raise ProtocolError(f"query {sql!r} on {self.describe} started a COPY; "
                                        "use start_copy_both() for streaming commands")
                case _:
                    raise ProtocolError(f"{self.describe}: unexpected {type(msg).__name__} "
                                        f"in the reply to {sql!r}")

    async def start_copy_both(self, sql: str) -> CopyBothStream:
        """Send a command that answers with CopyBothResponse (START_REPLICATION,
        pagestream) and return the stream. ServerError if the server refuses."""
        await self._send(wire.Query(sql).encode())
        while True:
            msg = await self._receive()
            match msg:
                case wire.CopyBothResponse():
                    return CopyBothStream(self, sql)
                case wire.ErrorResponse():
                    await self._wait_ready()
                    raise ServerError(msg, f"{sql!r} on {self.describe}")
                case wire.NoticeResponse():
                    self.notices.append(msg)
                case wire.ParameterStatus(name=name, value=value):
                    self.parameters[name] = value
                case _:
                    raise ProtocolError(f"{self.describe}: expected CopyBothResponse to {sql!r},"
                                        f" got {type(msg).__name__}")

    async def _wait_ready(self) -> None:
        while not isinstance(await self._receive(), wire.ReadyForQuery):
            pass

    # --- close ----------------------------------------------------------------------
    async def close(self) -> None:
        """Send Terminate and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.write(wire.Terminate().encode())
            self._writer.close()
            await self._writer.wait_closed()
        except OSError:
            pass  # the peer is gone already; nothing to tell it

    def close_nowait(self) -> None:
        """Queue Terminate and close once it is sent; usable where we cannot await
        (cleanup after cancellation). A walsender exits quietly on Terminate."""
        if self._closed:
            return
        self._closed = True
        self._writer.write(wire.Terminate().encode())
        self._writer.close()

    def abort(self) -> None:
        """Close the socket at once, without Terminate."""
        self._closed = True
        self._writer.transport.abort()

    async def __aenter__(self) -> PgConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class CopyBothStream:
    """The CopyBoth phase of a connection: read and send CopyData payloads."""

    def __init__(self, conn: PgConnection, command: str) -> None:
        self._conn = conn
        self.command = command
        self.server_done = False
        self.client_done = False

    async def read(self) -> bytes | None:
        """The next CopyData payload, or None once the server has sent CopyDone."""
        if self.server_done:
            return None
        while True:
            msg = await self._conn._receive()
            match msg:
                case wire.CopyData(data=data):
                    return data
                case wire.CopyDone():
                    self.server_done = True
                    return None
                case wire.NoticeResponse():
                    self._conn.notices.append(msg)
                case wire.ParameterStatus(name=name, value=value):
                    self._conn.parameters[name] = value
                case wire.ErrorResponse():
                    self.server_done = True
                    error = ServerError(msg, f"{self.command!r} on {self._conn.describe}")
                    if msg.severity == "ERROR":
                        # The command failed, not the session: the server goes back to the
                        # query prompt, so read up to ReadyForQuery and the connection can
                        # run another command. (FATAL closes it: nothing to wait for.)
                        with contextlib.suppress(Unavailable, TimeoutError):
                            async with asyncio.timeout(_READY_AFTER_ERROR_S):
                                await self._conn._wait_ready()
                    raise error
                case _:
                    raise ProtocolError(f"{self._conn.describe}: unexpected "
                                        f"{type(msg).__name__} in CopyBoth mode")

    def next_buffered(self) -> bytes | None:
        """The next CopyData payload if it has already arrived, else None (no I/O).
        Lets a reader take a whole batch before acting on it (one fsync per batch)."""
        conn = self._conn
        if self.server_done or conn._pending is not None:
            return None
        msg = conn._messages.next_backend()
        if isinstance(msg, wire.CopyData):
            return msg.data
        conn._pending = msg
        return None

    def divert(self, sink: CopyDataSink) -> None:
        """From now on, hand the server's CopyData payloads to `sink` straight from the
        transport's data callback (`sink.copy_data(payloads)`: every whole payload of a
        chunk read, in order), instead of through `read()`; the end of the stream
        (CopyDone, an ErrorResponse, a lost connection, a malformed message) goes to
        `sink.stream_ended(error)`, once, after every payload before it. What was already
        received is handed over first, before this returns. After this, the connection
        only sends (`send_nowait`) and aborts; `pause_reading`/`resume_reading` hold the
        stream in the kernel's buffers while the sink is busy. For a receiver that acts on
        each batch synchronously (pull mode's safekeeper, safekeeper/pull.py)."""
        conn = self._conn
        transport = self._transport()
        protocol = _DivertedCopyBoth(self, sink)
        reader = conn._reader
        # What the StreamReader holds already (asyncio keeps it in `_buffer`).
        held: bytearray = reader._buffer  # type: ignore[attr-defined]
        buffered = bytes(held)
        held.clear()
        eof = reader.at_eof()
        transport.set_protocol(protocol)
        if not transport.is_reading():
            transport.resume_reading()  # the StreamReader may have paused it (its limit)
        if buffered:
            conn._messages.feed(buffered)
        protocol.process()
        if eof or reader.exception() is not None:
            protocol.end(Unavailable(f"{conn.describe} closed the connection"))

    def _transport(self) -> asyncio.Transport:
        return cast(asyncio.Transport, self._conn._writer.transport)

    def pause_reading(self) -> None:
        transport = self._transport()
        if not transport.is_closing() and transport.is_reading():
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._transport()
        if not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()

    async def send(self, payload: bytes) -> None:
        assert not self.client_done, "CopyData after our CopyDone"
        await self._conn._send(wire.CopyData(payload).encode())

    def send_nowait(self, payload: bytes) -> bool:
        """Queue one CopyData without waiting for the socket buffer to drain; False (and
        nothing sent) when the connection is closing. For senders whose protocol bounds
        what is in flight and treats a lost message as lost (the walproposer's links)."""
        return self.send_message_nowait(wire.CopyData(payload).encode())

    def send_message_nowait(self, message: bytes) -> bool:
        """`send_nowait` of a message already encoded whole (a CopyData with its header,
        e.g. `wire.encode_status_copy_data`: the per-batch status update of pull mode)."""
        assert not self.client_done, "CopyData after our CopyDone"
        if self._conn._writer.transport.is_closing():
            return False
        self._conn.send_nowait(message)
        return True

    async def finish(self) -> None:
        """Send CopyDone, drain the server's remaining CopyData, and wait until the
        command completes (the connection is then usable again)."""
        if not self.client_done:
            self.client_done = True
            await self._conn._send(wire.CopyDone().encode())
        while await self.read() is not None:
            pass
        while True:
            msg = await self._conn._receive()
            match msg:
                case wire.ReadyForQuery():
                    return
                case wire.ErrorResponse():
                    await self._conn._wait_ready()
                    raise ServerError(msg, f"{self.command!r} on {self._conn.describe}")
                case _:
                    pass  # CommandComplete, a result set of the timeline switch, notices


class CopyDataSink(Protocol):
    """Where `CopyBothStream.divert` hands a stream's payloads."""

    def copy_data(self, payloads: list[bytes]) -> None: ...

    def stream_ended(self, error: BaseException) -> None: ...


class _DivertedCopyBoth(asyncio.Protocol):
    """The transport's protocol once a CopyBoth stream is diverted to a sink."""

    def __init__(self, stream: CopyBothStream, sink: CopyDataSink) -> None:
        self.stream = stream
        self.sink = sink
        self.ended = False

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self.stream._conn._messages.feed(data)
        self.process()

    def process(self) -> None:
        """Hand over every whole message buffered (CopyData payloads in one call)."""
        conn = self.stream._conn
        payloads: list[bytes] = []
        error: BaseException | None = None
        try:
            msg = conn._pending
            conn._pending = None
            if msg is None:
                conn._messages.take_copy_data(payloads)
                msg = conn._messages.next_backend()
            while msg is not None:
                if isinstance(msg, wire.CopyData):
                    payloads.append(msg.data)
                elif isinstance(msg, wire.CopyDone):
                    self.stream.server_done = True
                    error = Unavailable(f"{self.stream.command!r}: the sender ended the "
                                        "replication stream (CopyDone)")
                    break
                elif isinstance(msg, wire.ErrorResponse):
                    self.stream.server_done = True
                    error = ServerError(msg, f"{self.stream.command!r} on {conn.describe}")
                    break
                elif isinstance(msg, wire.NoticeResponse):
                    conn.notices.append(msg)
                elif isinstance(msg, wire.ParameterStatus):
                    conn.parameters[msg.name] = msg.value
                else:
                    error = ProtocolError(f"{conn.describe}: unexpected "
                                          f"{type(msg).__name__} in CopyBoth mode")
                    break
                conn._messages.take_copy_data(payloads)
                msg = conn._messages.next_backend()
        except ProtocolError as err:
            error = err
        if payloads and not self.ended:
            self.sink.copy_data(payloads)
        if error is not None:
            self.end(error)

    def end(self, error: BaseException) -> None:
        if not self.ended:
            self.ended = True
            self.sink.stream_ended(error)

    def eof_received(self) -> bool | None:
        self.end(Unavailable(f"{self.stream._conn.describe} closed the connection"))
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {exc}" if exc is not None else ""
        self.end(Unavailable(f"connection to {self.stream._conn.describe} lost{detail}"))

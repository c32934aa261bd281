"""An asyncio server speaking the PostgreSQL protocol, answering simple queries through a handler.

The pageserver (and later the safekeeper) expose commands such as `basebackup`
and `pagestream` on a PostgreSQL-protocol port, so that libpq clients (psql,
psycopg, PostgreSQL itself) can reach them. This module owns the sockets and
the protocol states; the service supplies one async `QueryHandler` that maps a
query string to a reply:

- `Rows` (a result set) or `Command` (a tag only);
- raise an exception: it becomes an ErrorResponse and the connection stays usable
  (`SqlError` picks the SQLSTATE; other Strata errors get one by class);
- `CopyOut(run)` / `CopyBoth(run)`: `run` takes over the connection with a
  `CopyStream` for a tar stream or a request/response sub-protocol.

Authentication is trust, or with a `TokenVerifier` a JWT sent as the cleartext password
(strata.common.auth): a missing or invalid token gets FATAL 28P01 and the connection is
closed; the token's scope is in `Session.scope` for the handler to check against the
tenant a command names (`check_tenant`). SSL and GSS encryption requests are declined
('N'). A malformed or oversized message closes only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from strata.common.auth import AuthError, Forbidden, Scope, TokenVerifier
from strata.common.errors import (
    CorruptionError,
    NotFound,
    ProtocolError,
    StrataError,
    Unavailable,
    UserError,
)
from strata.pg import wire

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
_READ_CHUNK_BYTES = 256 * 1024


class SqlError(StrataError):
    """Raise from a handler to answer with this SQLSTATE, message, detail and hint."""

    def __init__(self, message: str, *, code: str = "XX000", detail: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail
        self.hint = hint


# SQLSTATEs (errcodes.txt) for Strata's error classes.
_SQLSTATE_BY_CLASS: tuple[tuple[type[BaseException], str], ...] = (
    (AuthError, "28P01"),        # invalid_password
    (Forbidden, "42501"),        # insufficient_privilege
    (NotFound, "42704"),         # undefined_object
    (UserError, "22023"),        # invalid_parameter_value
    (ProtocolError, "08P01"),    # protocol_violation
    (CorruptionError, "XX001"),  # data_corrupted
    (Unavailable, "57P03"),      # cannot_connect_now
)


def error_response(err: BaseException) -> wire.ErrorResponse:
    """The ErrorResponse a client sees for an exception raised by a handler."""
    if isinstance(err, SqlError):
        return wire.ErrorResponse(code=err.code, message=str(err), detail=err.detail,
                                  hint=err.hint)
    for cls, code in _SQLSTATE_BY_CLASS:
        if isinstance(err, cls):
            return wire.ErrorResponse(code=code, message=str(err))
    return wire.ErrorResponse(code="XX000", message=f"internal error: {type(err).__name__}: {err}")


@dataclass(frozen=True, slots=True)
class Rows:
    """A result set; values are text (str), raw bytes, or None for NULL."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str | bytes | int | None]]
    tag: str | None = None  # default "SELECT <n>"


@dataclass(frozen=True, slots=True)
class Command:
    """A command without a result set, e.g. Command("SET")."""

    tag: str


@dataclass(frozen=True, slots=True)
class CopyOut:
    """Stream CopyData to the client with `run(stream)`; then CopyDone, CommandComplete."""

    run: Callable[[CopyStream], Awaitable[None]]
    tag: str = "COPY 0"


@dataclass(frozen=True, slots=True)
class CopyBoth:
    """Exchange CopyData both ways with `run(stream)` until it returns."""

    run: Callable[[CopyStream], Awaitable[None]]
    tag: str = "COPY 0"


Reply = Rows | Command | CopyOut | CopyBoth


@dataclass(frozen=True, slots=True)
class Session:
    """What the handler knows about the connection."""

    connection_id: int
    peer: str
    parameters: dict[str, str] = field(hash=False)
    scope: Scope | None = None
    """The token's scope when the server checks tokens; None when it does not."""

    def check_tenant(self, tenant_id: object) -> None:
        """Forbidden unless the connection's token covers `tenant_id` (no-op without
        authentication)."""
        if self.scope is not None:
            self.scope.check_tenant(str(tenant_id))

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database", self.user)


QueryHandler = Callable[[Session, str], Awaitable[Reply]]


class _Conn:
    """Socket side of one connection: buffered reads into whole frontend messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_message_bytes: int) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = wire.MessageReader("frontend", max_message_bytes=max_message_bytes)

    async def receive(self) -> wire.StartupPacket | wire.FrontendMessage | None:
        """The next message, or None at end of stream."""
        while True:
            msg = self.messages.next_frontend()
            if msg is not None:
                return msg
            chunk = await self.reader.read(_READ_CHUNK_BYTES)
            if not chunk:
                if self.messages.buffered_bytes:
                    raise ProtocolError(f"connection closed inside a message "
                                        f"({self.messages.buffered_bytes} bytes buffered)")
                return None
            self.messages.feed(chunk)

    def write(self, *msgs: wire.BackendMessage) -> None:
        self.writer.write(b"".join(m.encode() for m in msgs))

    async def drain(self) -> None:
        await self.writer.drain()


class ClientGone(ConnectionError):
    """The client of a copy went away (a reset, a broken pipe) under a read or a write."""


class CopyStream:
    """A connection taken over by a CopyOut/CopyBoth handler. A client that went away
    raises `ClientGone` from `write` and `read` (a client that closed cleanly makes `read`
    return None); either way `client_gone` is set."""

    def __init__(self, conn: _Conn, *, both: bool) -> None:
        self._conn = conn
        self.both = both
        self.client_done = False  # client sent CopyDone (or CopyFail, or went away)
        self.client_gone = False
        # a message next_buffered took that is not CopyData (read() deals with it)
        self._pending: wire.StartupPacket | wire.FrontendMessage | None = None

    async def write(self, *payloads: bytes) -> None:
        """Send CopyData (one per payload, in one socket write) and wait for the socket
        buffer to drain (backpressure)."""
        if self._conn.writer.is_closing():
            # The loop closed the transport (a read or a write on it failed: the client
            # was killed); uvloop's write would raise RuntimeError, not an OSError.
            raise self._gone(ConnectionResetError("the connection is closed"))
        try:
            self._conn.write(*(wire.CopyData(p) for p in payloads))
            await self._conn.drain()
        except OSError as err:
            raise self._gone(err) from err

    def write_nowait(self, payload: bytes) -> None:
        """Queue one CopyData without waiting for the socket buffer to drain, for a message
        sent from outside the handler's own task (it cannot interleave with another
        message: each is written whole). `ClientGone` if the client went away."""
        if self.client_gone or self._conn.writer.is_closing():
            raise ClientGone("client gone")
        try:
            self._conn.write(wire.CopyData(payload))
        except OSError as err:
            raise self._gone(err) from err

    def next_buffered(self) -> bytes | None:
        """CopyBoth only: the client's next CopyData payload if it has already been read
        from the socket, else None (no I/O). Lets a handler take a whole batch of what
        arrived while it was busy before acting on it (one fsync for all of it)."""
        if self.client_done or self._pending is not None:
            return None
        msg = self._conn.messages.next_frontend()
        if isinstance(msg, wire.CopyData):
            return msg.data
        self._pending = msg  # read() deals with it next (None: nothing buffered)
        return None

    def _gone(self, err: OSError) -> ClientGone:
        self.client_done = self.client_gone = True
        return err if isinstance(err, ClientGone) else ClientGone(f"client gone: {err}")

    async def read(self) -> bytes | None:
        """CopyBoth only: the client's next CopyData payload, None once it is done."""
        assert self.both, "read() on a CopyOut stream"
        if self.client_done:
            return None
        msg, self._pending = self._pending, None
        try:
            if msg is None:
                msg = await self._conn.receive()
        except OSError as err:
            raise self._gone(err) from err
        match msg:
            case wire.CopyData(data=data):
                return data
            case wire.CopyDone() | wire.CopyFail():
                self.client_done = True
                return None
            case None | wire.Terminate():
                self.client_done = self.client_gone = True
                return None
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} in CopyBoth mode")


class PgProtocolServer:
    """Listens on host:port and serves each connection with `handler`."""

    def __init__(self, handler: QueryHandler, *, host: str = "127.0.0.1", port: int = 0,
                 server_version: str = "15.0 (strata)",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 startup_timeout_s: float = 30, name: str = "pgserve",
                 verifier: TokenVerifier | None = None) -> None:
        self.handler = handler
        self.verifier = verifier
        self.host = host
        self.port = port
        self.name = name
        self.server_version = server_version
        self.max_message_bytes = max_message_bytes
        self.startup_timeout_s = startup_timeout_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()  # waiting for the next query
        self._stopping = False
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Bind and listen; `port` is the bound port afterwards (0 picks a free one)."""
        assert self._server is None, "already started"
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    async def stop(self, grace_s: float = 5) -> None:
        """Stop listening and close idle connections at once; a connection running a
        query gets `grace_s` to finish it (then it is closed), and is cancelled after."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for task in self._idle:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # Only now: from Python 3.12 on this also waits for open connections.
        await self._server.wait_closed()
        self._server = None
        log.info("%s on port %d stopped", self.name, self.port)

    async def __aenter__(self) -> PgProtocolServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace_s=0)

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn_id = next(self._ids)
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        conn = _Conn(reader, writer, self.max_message_bytes)
        try:
            await self._serve(conn, conn_id, peer_text)
        except ProtocolError as err:
            log.info("%s connection %d from %s closed: %s", self.name, conn_id, peer_text, err)
            with contextlib.suppress(OSError):
                conn.write(wire.ErrorResponse(severity="FATAL", code="08P01", message=str(err)))
        except (ConnectionError, OSError) as err:
            log.info("%s connection %d from %s lost: %s", self.name, conn_id, peer_text, err)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Our own stop() cancelled this connection task, which is the top of its
            # stack: end it quietly. Re-raising makes Python 3.11's stream protocol log
            # the cancellation as an ERROR with a traceback.
            _say_shutting_down(conn)
        finally:
            self._tasks.discard(task)
            self._idle.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve(self, conn: _Conn, conn_id: int, peer: str) -> None:
        try:
            async with asyncio.timeout(self.startup_timeout_s):
                startup = await self._startup(conn)
                scope = await self._authenticate(conn) \
                    if startup is not None and self.verifier is not None else None
        except TimeoutError as err:
            raise ProtocolError(f"no startup packet within {self.startup_timeout_s}s") from err
        except AuthError as err:
            log.info("%s connection %d from %s refused: %s", self.name, conn_id, peer, err)
            conn.write(wire.ErrorResponse(severity="FATAL", code="28P01", message=str(err)))
            return
        if startup is None:
            return
        session = Session(conn_id, peer, dict(startup.parameters), scope)
        log.debug("%s connection %d from %s: %s", self.name, conn_id, peer, session.parameters)
        conn.write(wire.AuthenticationOk(),
                   *(wire.ParameterStatus(k, v) for k, v in self._parameter_status(session)),
                   wire.BackendKeyData(conn_id, secrets.randbits(31)),
                   wire.ReadyForQuery("I"))
        await conn.drain()
        await self._query_loop(conn, session)

    def _parameter_status(self, session: Session) -> list[tuple[str, str]]:
        # What libpq and psycopg look at after start-up.
        return [("server_version", self.server_version), ("server_encoding", "UTF8"),
                ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
                ("integer_datetimes", "on"), ("standard_conforming_strings", "on"),
                ("TimeZone", "UTC"), ("is_superuser", "off"),
                ("session_authorization", session.user),
                ("application_name", session.parameters.get("application_name", ""))]

    async def _startup(self, conn: _Conn) -> wire.StartupMessage | None:
        while True:
            msg = await conn.receive()
            match msg:
                case None:
                    return None
                case wire.SSLRequest() | wire.GSSENCRequest():
                    conn.writer.write(b"N")  # not supported; the client goes on in plain text
                    await conn.drain()
                case wire.CancelRequest():
                    return None  # nothing runs long enough to cancel yet
                case wire.StartupMessage():
                    if "user" not in dict(msg.parameters):
                        raise ProtocolError("startup packet has no user name")
                    return msg
                case _:
                    raise ProtocolError(f"unexpected {type(msg).__name__} before start-up")

    async def _authenticate(self, conn: _Conn) -> Scope:
        """Ask for the token as a cleartext password and verify it."""
        assert self.verifier is not None
        conn.write(wire.AuthenticationCleartextPassword())
        await conn.drain()
        msg = await conn.receive()
        match msg:
            case wire.PasswordMessage(password=token):
                return self.verifier.verify(token)
            case None | wire.Terminate():
                raise AuthError("the client left without sending a token")
            case _:
                raise ProtocolError(f"expected a password message, got {type(msg).__name__}")

    async def _query_loop(self, conn: _Conn, session: Session) -> None:
        task = asyncio.current_task()
        assert task is not None
        while True:
            if self._stopping:
                _say_shutting_down(conn)
                return
            self._idle.add(task)
            try:
                msg = await conn.receive()
            finally:
                self._idle.discard(task)
            match msg:
                case None | wire.Terminate():
                    return
                case wire.Query(sql=sql):
                    await self._query(conn, session, sql)
                case wire.ExtendedQueryMessage():
                    await self._refuse_extended(conn)
                case wire.Sync():
                    conn.write(wire.ReadyForQuery("I"))
                case wire.CopyData() | wire.CopyDone() | wire.CopyFail():
                    pass  # left over from a copy we already ended; the protocol says ignore
                case _:
                    raise ProtocolError(f"unexpected {type(msg).__name__} outside a query")
            await conn.drain()

    async def _refuse_extended(self, conn: _Conn) -> None:
        conn.write(wire.ErrorResponse(code="0A000", message=(
            "the extended query protocol is not supported; use simple queries "
            "(psycopg: prepare_threshold=None and no parameters)")))
        # As PostgreSQL does after an error: skip everything up to the next Sync.
        while True:
            msg = await conn.receive()
            if msg is None or isinstance(msg, wire.Terminate):
                raise ConnectionResetError("client left during extended query")
            if isinstance(msg, wire.Sync):
                conn.write(wire.ReadyForQuery("I"))
                return

    async def _query(self, conn: _Conn, session: Session, sql: str) -> None:
        if not sql.strip().rstrip(";").strip():
            conn.write(wire.EmptyQueryResponse(), wire.ReadyForQuery("I"))
            return
        try:
            reply = await self.handler(session, sql)
        except (StrataError, ValueError, LookupError) as err:
            conn.write(error_response(err), wire.ReadyForQuery("I"))
            return
        except Exception as err:
            log.exception("%s handler failed on %r", self.name, sql)
            conn.write(error_response(err), wire.ReadyForQuery("I"))
            return
        match reply:
            case Rows():
                conn.write(*_encode_rows(reply))
            case Command(tag=tag):
                conn.write(wire.CommandComplete(tag))
            case CopyOut() | CopyBoth():
                if not await self._copy(conn, reply):
                    raise ConnectionResetError("client left during copy")
        conn.write(wire.ReadyForQuery("I"))

    async def _copy(self, conn: _Conn, reply: CopyOut | CopyBoth) -> bool:
        """Run a copy sub-protocol; False if the client went away."""
        both = isinstance(reply, CopyBoth)
        conn.write(wire.CopyBothResponse() if both else wire.CopyOutResponse())
        await conn.drain()
        stream = CopyStream(conn, both=both)
        try:
            await reply.run(stream)
        except ProtocolError:
            raise  # the client broke the sub-protocol: close this connection
        except Exception as err:
            if stream.client_gone:
                # Whatever the handler made of it: the client went away (e.g. killed with
                # unread answers, so its socket was reset): not a failure of ours.
                log.info("%s copy ended: the client went away: %s", self.name, err)
                return False
            if not isinstance(err, StrataError | ValueError | LookupError):
                log.exception("%s copy handler failed", self.name)
            conn.write(error_response(err))
            return True
        if stream.client_gone:
            return False
        conn.write(wire.CopyDone())
        if both and not stream.client_done:
            # The client ends its half with CopyDone; discard what it still sends.
            await conn.drain()
            while await stream.read() is not None:
                pass
            if stream.client_gone:
                return False
        conn.write(wire.CommandComplete(reply.tag))
        return True


def _say_shutting_down(conn: _Conn) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        conn.write(wire.ErrorResponse(severity="FATAL", code="57P01", message=(
            "terminating connection because the server is shutting down")))


def _encode_rows(reply: Rows) -> list[wire.BackendMessage]:
    msgs: list[wire.BackendMessage] = [wire.RowDescription(tuple(
        wire.FieldDescription(name) for name in reply.columns))]
    for row in reply.rows:
        assert len(row) == len(reply.columns), (row, reply.columns)
        msgs.append(wire.DataRow(tuple(_text(v) for v in row)))
    msgs.append(wire.CommandComplete(reply.tag or f"SELECT {len(reply.rows)}"))
    return msgs


def _text(value: str | bytes | int | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()

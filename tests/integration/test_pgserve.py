"""The PostgreSQL-protocol server framework, driven by real clients: psycopg, psql, and
Strata's own client, including CopyOut/CopyBoth streams, errors and garbage."""

from __future__ import annotations

import asyncio
import io
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import uvloop

from polling import wait_until_async
from strata.common.errors import NotFound, ProtocolError
from strata.common.proc import pg_bindir
from strata.compute.pgserver import PgServer
from strata.pg import wire
from strata.pg.blockingclient import BlockingPgConnection, copy_data
from strata.pg.pgclient import PgConnection, ServerError
from strata.pg.pgserve import (
    Command,
    CopyBoth,
    CopyOut,
    CopyStream,
    PgProtocolServer,
    Rows,
    Session,
    SqlError,
)

SLEEPING = threading.Event()  # a `sleep` query has reached the handler
WAITING = threading.Event()  # a `wait` query has reached the handler
RELEASE = threading.Event()  # ... and returns once this is set


async def handler(session: Session, sql: str) -> Rows | Command | CopyOut | CopyBoth:
    words = sql.strip().rstrip(";").split()
    match [w.lower() for w in words]:
        case ["select", "1"]:
            return Rows(["?column?"], [["1"]])
        case ["whoami"]:
            return Rows(["user", "database", "application_name"],
                        [[session.user, session.database,
                          session.parameters.get("application_name")]])
        case ["numbers", n]:
            return Rows(["n", "null"], [[i, None] for i in range(int(n))])
        case ["sleep", seconds]:
            SLEEPING.set()
            await asyncio.sleep(float(seconds))
            return Rows(["slept"], [[seconds]])
        case ["wait"]:
            WAITING.set()
            while not RELEASE.is_set():
                await asyncio.sleep(0.01)
            return Rows(["waited"], [["released"]])
        case ["set", *_]:
            return Command("SET")
        case ["missing"]:
            raise NotFound("timeline 42 not found; see `strata timeline list`")
        case ["fail"]:
            raise SqlError("custom failure", code="22012", detail="why", hint="do this")
        case ["bug"]:
            raise RuntimeError("a handler bug")
        case ["tar", n]:
            async def send_chunks(stream: CopyStream) -> None:
                for i in range(int(n)):
                    await stream.write(f"chunk {i}\n".encode())
            return CopyOut(send_chunks)
        case ["badtar"]:
            async def fail_midway(stream: CopyStream) -> None:
                await stream.write(b"first")
                raise NotFound("layer file for key 7 is gone")
            return CopyOut(fail_midway)
        case ["closed"]:
            async def write_after_close(stream: CopyStream) -> None:
                await stream.write(b"first")
                # The transport closed under the handler, as the loop closes it when a
                # read or a write on it failed (the client was killed), before the
                # handler's next write.
                stream._conn.writer.transport.abort()  # noqa: SLF001
                await asyncio.sleep(0.05)
                await stream.write(b"second")
            return CopyBoth(write_after_close)
        case ["echo"]:
            async def echo(stream: CopyStream) -> None:
                while (data := await stream.read()) is not None:
                    await stream.write(data.upper())
            return CopyBoth(echo)
        case ["batches"]:
            async def batches(stream: CopyStream) -> None:
                while (first := await stream.read()) is not None:
                    batch = [first]
                    while (more := stream.next_buffered()) is not None:
                        batch.append(more)
                    await stream.write(*(b"%d:%s" % (len(batch), p) for p in batch))
            return CopyBoth(batches)
    raise SqlError(f"unknown command {sql!r}", code="42601")


class ServerThread:
    """The server on its own event loop in a thread, so blocking clients can use it."""

    def __init__(self, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = PgProtocolServer(handler, **kwargs)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    @property
    def port(self) -> int:
        return self.server.port

    def dsn(self, **extra: str) -> str:
        params = {"host": "127.0.0.1", "port": str(self.port), "user": "alice",
                  "dbname": "db1", "sslmode": "disable", **extra}
        return " ".join(f"{k}={v}" for k, v in params.items())

    def run(self, coro: Any, timeout_s: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.run(self.server.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    s = ServerThread(max_message_bytes=64 * 1024)
    try:
        yield s
    finally:
        s.close()


def test_psycopg_queries_rows_and_errors(server: ServerThread) -> None:
    """psycopg connects, gets rows, and an error leaves the connection usable."""
    with psycopg.connect(server.dsn(application_name="probe"), autocommit=True,
                         prepare_threshold=None) as conn:
        assert conn.execute("select 1").fetchall() == [("1",)]
        assert conn.execute("whoami").fetchall() == [("alice", "db1", "probe")]
        with pytest.raises(psycopg.errors.UndefinedObject, match="timeline 42"):
            conn.execute("missing")
        with pytest.raises(psycopg.errors.DivisionByZero) as info:
            conn.execute("fail")
        assert info.value.diag.message_detail == "why"
        assert info.value.diag.message_hint == "do this"
        with pytest.raises(psycopg.errors.InternalError_, match="a handler bug"):
            conn.execute("bug")
        # Still usable after three errors.
        assert conn.execute("numbers 3").fetchall() == [("0", None), ("1", None), ("2", None)]
        cur = conn.execute("set x = 1")
        assert cur.statusmessage == "SET"
        assert conn.info.parameter_status("server_version") is not None
        # Parameters force the extended protocol, which is refused without breaking anything.
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("select %s", [1])
        assert conn.execute("select 1").fetchall() == [("1",)]


def test_psql_runs_a_command(server: ServerThread) -> None:
    out = subprocess.run([str(pg_bindir() / "psql"), server.dsn(), "-X", "-A", "-t",
                          "-c", "numbers 2"], capture_output=True, timeout=30, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["0|", "1|"]
    err = subprocess.run([str(pg_bindir() / "psql"), server.dsn(), "-X", "-c", "missing"],
                         capture_output=True, timeout=30, text=True)
    assert err.returncode != 0
    assert "timeline 42 not found" in err.stderr


def test_garbage_closes_only_that_connection(server: ServerThread) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as good:
        async def send_garbage() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(wire.StartupMessage((("user", "mallory"),)).encode())
            writer.write(b"?\x00\x00\x00\x09garbage")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
            writer.close()
            return data

        received = server.run(send_garbage())
        assert b"unknown frontend message type" in received  # the FATAL it sent first
        assert good.execute("select 1").fetchall() == [("1",)]

        async def send_oversized() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(wire.StartupMessage((("user", "mallory"),)).encode())
            writer.write(wire.Query("x" * 70000).encode())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return data

        assert b"exceeds the limit" in server.run(send_oversized())
        assert good.execute("whoami").fetchall()[0][0] == "alice"


def test_own_client_copy_out_and_copy_both(server: ServerThread) -> None:
    async def scenario() -> None:
        conn = await PgConnection.connect("127.0.0.1", server.port, user="bob",
                                          database="db2", application_name="t")
        result = await conn.simple_query("whoami")
        assert result.rows == [("bob", "db2", "t")]
        assert result.tag == "SELECT 1"
        with pytest.raises(ServerError) as info:
            await conn.simple_query("missing")
        assert info.value.code == "42704"
        stream = await conn.start_copy_both("echo")
        for word in (b"get", b"page", b"x" * 10000):
            await stream.send(word)
            assert await stream.read() == word.upper()
        await stream.finish()
        assert (await conn.simple_query("select 1")).rows == [("1",)]
        await conn.close()

        # CopyOut: read the raw protocol with the codec.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(wire.StartupMessage((("user", "u"),)).encode() + wire.Query("tar 3").encode())
        messages = wire.MessageReader("backend")
        got: list[Any] = []
        while not got or not isinstance(got[-1], wire.ReadyForQuery) or len(got) < 3 + 6:
            messages.feed(await asyncio.wait_for(reader.read(4096), 10))
            got.extend(messages)
        copy = got[got.index(wire.CopyOutResponse()):]
        assert copy == [wire.CopyOutResponse(), *(wire.CopyData(f"chunk {i}\n".encode())
                                                  for i in range(3)),
                        wire.CopyDone(), wire.CommandComplete("COPY 0"), wire.ReadyForQuery()]
        writer.close()

    server.run(scenario())


def test_copy_both_handler_takes_what_arrived_together_as_one_batch(
        server: ServerThread) -> None:
    """`CopyStream.next_buffered` hands over the CopyData already read (no I/O), stops at
    the CopyDone, which `read` then reports; `write` sends several payloads in order."""
    async def scenario() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(wire.StartupMessage((("user", "u"),)).encode() +
                     wire.Query("batches").encode())
        messages = wire.MessageReader("backend")
        got: list[Any] = []

        async def until(kind: type) -> None:
            while not got or not isinstance(got[-1], kind):
                messages.feed(await asyncio.wait_for(reader.read(4096), 10))
                got.extend(messages)

        await until(wire.CopyBothResponse)
        # One socket write: the handler's first read takes all of it from the socket.
        writer.write(b"".join(wire.CopyData(p).encode() for p in (b"a", b"b", b"c")) +
                     wire.CopyDone().encode())
        del got[:]
        await until(wire.ReadyForQuery)
        data = [m.data for m in got if isinstance(m, wire.CopyData)]
        assert data == [b"3:a", b"3:b", b"3:c"], got
        writer.close()

    server.run(scenario())


def test_ssl_request_is_declined_and_shutdown_is_graceful() -> None:
    s = ServerThread()
    try:
        # sslmode=prefer sends SSLRequest first; 'N' makes libpq go on in plain text.
        with psycopg.connect(s.dsn(sslmode="prefer"), autocommit=True) as conn:
            assert conn.execute("select 1").fetchall() == [("1",)]
            assert conn.pgconn.ssl_in_use is False
    finally:
        s.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(s.dsn(connect_timeout="2"))


def test_stop_lets_a_running_query_finish_and_closes_idle_connections() -> None:
    """stop() waits for the running query, and no longer: with an hour of grace it returns
    as soon as the query is done (no timing asserted: a wait-out would hit the timeout)."""
    s = ServerThread()
    idle = psycopg.connect(s.dsn(), autocommit=True)
    busy = psycopg.connect(s.dsn(), autocommit=True)
    result: list[Any] = []
    query = threading.Thread(target=lambda: result.append(busy.execute("wait").fetchall()))
    try:
        WAITING.clear()
        RELEASE.clear()
        query.start()
        assert WAITING.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(s.server.stop(grace_s=3600), s.loop)
        assert not stopping.done()  # the query holds it
        RELEASE.set()
        stopping.result(20)
        query.join(5)
        assert result == [[("released",)]]
        with pytest.raises(psycopg.OperationalError, match="shutting down"):
            idle.execute("select 1")
    finally:
        RELEASE.set()
        s.close()
        idle.close()
        busy.close()


def _pg_with_password_roles(pg_factory: Callable[..., PgServer], name: str) -> PgServer:
    """A PostgreSQL 15 with role md5user (password s3cret, md5) and role textuser (password
    plain, cleartext), both allowed from 127.0.0.1 only with their password."""
    pg = pg_factory(name)
    pg.initdb()
    hba = pg.datadir / "pg_hba.conf"
    hba.write_text("host all md5user 127.0.0.1/32 md5\n"
                   "host all textuser 127.0.0.1/32 password\n" + hba.read_text())
    pg.start({"password_encryption": "md5"})
    pg.sql("create role md5user login password 's3cret'")
    pg.sql("create role textuser login password 'plain'")
    return pg


def test_own_client_against_postgres_md5_and_cleartext(
        pg_factory: Callable[..., PgServer]) -> None:
    """Strata's client authenticates to a real PostgreSQL 15 with md5 and cleartext
    passwords, and reads results and errors from it."""
    pg = _pg_with_password_roles(pg_factory, "auth")

    async def scenario() -> None:
        async with await PgConnection.connect(pg.host, pg.port, user="md5user",
                                              database="postgres", password="s3cret") as conn:
            result = await conn.simple_query("select current_user, null::text, 1 + 1 as two")
            assert result.columns == ("current_user", "text", "two")
            assert result.rows == [("md5user", None, "2")]
            with pytest.raises(ServerError) as info:
                await conn.simple_query("select * from no_such_table")
            assert info.value.code == "42P01"
            assert (await conn.simple_query("select 1")).rows == [("1",)]
            assert conn.parameters["server_version"].startswith("15")
        async with await PgConnection.connect(pg.host, pg.port, user="textuser",
                                              database="postgres", password="plain") as conn:
            assert (await conn.simple_query("select current_user")).rows == [("textuser",)]
        with pytest.raises(ServerError, match="28P01"):
            await PgConnection.connect(pg.host, pg.port, user="md5user", database="postgres",
                                       password="wrong")

    asyncio.run(scenario())


def test_blocking_client_against_postgres(pg_factory: Callable[..., PgServer]) -> None:
    """The blocking client (`endpoint start`'s basebackup and sync) authenticates to a real
    PostgreSQL 15 with md5 and cleartext passwords, reads CopyOut data, and raises the
    asyncio client's errors (an ErrorResponse keeps the connection usable)."""
    pg = _pg_with_password_roles(pg_factory, "blocking")
    for user, password in (("md5user", "s3cret"), ("textuser", "plain")):
        conn = BlockingPgConnection.connect(pg.host, pg.port, user=user, database="postgres",
                                            password=password, timeout_s=10)
        try:
            out = io.BytesIO()
            size = conn.copy_out("copy (select g, current_user from generate_series(1, 3000) g)"
                                 " to stdout", out, None)
            lines = out.getvalue().decode().splitlines()
            assert size == len(out.getvalue()) and len(lines) == 3000
            assert lines[0] == f"1\t{user}" and lines[-1] == f"3000\t{user}"
            with pytest.raises(ServerError) as info:
                conn.copy_out("copy no_such_table to stdout", io.BytesIO(), None)
            assert info.value.code == "42P01"
            with pytest.raises(ProtocolError, match="RowDescription"):
                conn.copy_out("select 1", io.BytesIO(), None)
        finally:
            conn.close()
    with pytest.raises(ServerError, match="28P01"):
        BlockingPgConnection.connect(pg.host, pg.port, user="md5user", database="postgres",
                                     password="wrong")
    # Over the unix socket (trust).
    conn = BlockingPgConnection.connect(str(pg.socket_dir), pg.port, user="postgres",
                                        database="postgres")
    out = io.BytesIO()
    conn.copy_out("copy (select 42) to stdout", out, None)
    assert out.getvalue() == b"42\n"
    # A simple query: text rows, NULL as None, an empty result, errors after ReadyForQuery.
    rows = conn.simple_query("select g, case when g = 2 then null else 'é' || g end "
                             "from generate_series(1, 3) g", None)
    assert rows == [("1", "é1"), ("2", None), ("3", "é3")]
    assert conn.simple_query("select 1 where false", None) == []
    assert conn.simple_query("set application_name = 'x'", None) == []
    with pytest.raises(ServerError) as info:
        conn.simple_query("select * from no_such_table", None)
    assert info.value.code == "42P01"
    assert conn.simple_query("select current_user", None) == [("postgres",)]
    conn.close()


def test_blocking_client_copy_both(server: ServerThread) -> None:
    conn = BlockingPgConnection.connect("127.0.0.1", server.port, user="bob", timeout_s=10)
    try:
        with pytest.raises(ServerError) as info:
            conn.start_copy_both("missing", None)
        assert info.value.code == "42704"
        conn.start_copy_both("echo", None)
        for word in (b"get", b"page", b"x" * 10000):
            conn.send(copy_data(word))
            assert conn.read_copy_data("echo") == word.upper()
    finally:
        conn.close()


def test_psycopg_reads_copy_out_and_a_failing_copy_keeps_the_connection(
        server: ServerThread) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("tar 4") as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        assert data == b"".join(f"chunk {i}\n".encode() for i in range(4))
        with pytest.raises(psycopg.errors.UndefinedObject, match="key 7 is gone"):
            with cur.copy("badtar") as copy:
                for _ in copy:
                    pass
        assert conn.execute("select 1").fetchall() == [("1",)]



def test_stop_with_an_open_copy_both_stream_logs_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A pagestream-like client connected at shutdown is ended without an ERROR log
    (Python 3.11's stream protocol logs a connection task that ends cancelled)."""

    async def scenario() -> None:
        srv = PgProtocolServer(handler, host="127.0.0.1", port=0)
        await srv.start()
        conn = await PgConnection.connect("127.0.0.1", srv.port, user="u")
        stream = await conn.start_copy_both("echo")
        await stream.send(b"ping")
        assert await stream.read() == b"PING"
        await srv.stop(grace_s=0.1)  # the stream is mid-copy: it gets cancelled
        await asyncio.sleep(0.3)  # the loop goes on, as a pageserver's does
        conn.abort()

    with caplog.at_level("DEBUG"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= 40]
    assert errors == [], [r.getMessage() for r in errors]


def _client_goes_away_then_another_is_served(
        start: Callable[[PgConnection], Any], pause_s: float, caplog: pytest.LogCaptureFixture,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop) -> None:
    """A client runs `start` (awaited), waits `pause_s`, then aborts its connection; the
    server's connection task ends with no WARNING or ERROR and no traceback logged, one
    line says the client went away, and the server goes on serving another client."""

    async def scenario() -> None:
        srv = PgProtocolServer(handler, host="127.0.0.1", port=0)
        await srv.start()
        try:
            conn = await PgConnection.connect("127.0.0.1", srv.port, user="u")
            await start(conn)
            await asyncio.sleep(pause_s)
            conn.abort()  # unread data in the receive buffer: the kernel sends a reset
            await wait_until_async(lambda: not srv._tasks, 30,  # noqa: SLF001
                                   "the connection task to end")
            other = await PgConnection.connect("127.0.0.1", srv.port, user="u")
            assert (await other.simple_query("select 1")).rows == [("1",)]
            await other.close()
        finally:
            await srv.stop(grace_s=0.1)

    with caplog.at_level("DEBUG"), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())
    problems = [r for r in caplog.records if r.levelno >= 30 or r.exc_info]
    assert problems == [], [r.getMessage() for r in problems]
    assert any("went away" in r.getMessage() or "lost" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("query", ["echo", "tar 200000"])
def test_client_reset_mid_copy_logs_no_error(query: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A client killed with answers unread (its socket is reset, as when a FUSE server
    is killed with -9 mid-scan) ends its copy with one INFO line, never an ERROR with a
    traceback; the server goes on serving."""

    async def start(conn: PgConnection) -> None:
        if query == "echo":
            stream = await conn.start_copy_both("echo")
            for _ in range(2000):
                await stream.send(b"x" * 1000)  # the echoes pile up unread
        else:
            conn.send_nowait(wire.Query(query).encode())  # the chunks pile up unread

    _client_goes_away_then_another_is_served(start, 0.5, caplog)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_a_copy_writing_to_a_client_that_is_gone_logs_no_error(
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
        caplog: pytest.LogCaptureFixture) -> None:
    """A copy handler that writes on its own schedule (a safekeeper's walsender) after the
    loop closed the transport of a client that was killed: with uvloop (the services' loop)
    the write raised RuntimeError, which ended the copy with an ERROR and a traceback
    (seen in CI: test_pageserver_kill9_with_a_torn_wal_log_tail); it is the client going
    away, one INFO line, and the server goes on serving."""

    async def start(conn: PgConnection) -> None:
        conn.send_nowait(wire.Query("closed").encode())

    _client_goes_away_then_another_is_served(start, 0.2, caplog, loop_factory)

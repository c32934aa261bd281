"""A pagestream client: asyncio `PageClient` (pipelined) and a blocking `PageClientSync`.

`PageClient` opens `pagestream <tenant> <timeline>` on a pageserver's pg port and
sends requests as callers make them; several tasks may share one connection: their
requests are pipelined and each response resolves the oldest outstanding request
(pagestream.ClientCore). An ErrorResponse is raised as the Strata error of its kind
(NotFound, UserError, Unavailable, CorruptionError), and the connection stays usable.
A lost connection or a protocol violation fails every outstanding request and closes
the client.

`PageClientSync` is for threads (the FUSE process, tests, the bench): it runs its own
event loop in a daemon thread and keeps one connection open across calls. When the
connection is lost or cannot be opened, a call reconnects at once, then keeps trying with
backoff for up to `outage_wait_s` (a pageserver restart: the lazy file system's reads wait
for it instead of failing, D6), then raises Unavailable. Requests are reads and leases:
repeating one is safe. An error the pageserver answered with is raised at once.

With `address` (a callable giving the pageserver's (host, pg port); `address(fresh=True)`
looks again now: the lazy file system reads it from the file `strata tenant relocate`
rewrites, stat'ed at most every 0.2 s), every call first asks it; when it changed, the
connection to the old pageserver is closed and the call goes to the new one, which also
gets the last lease again. After an error or a lost connection the address is asked
fresh: an error answered by the old pageserver after the address changed (it detached
the tenant) is retried at the new one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol, TypeVar

from strata.common.auth import default_token
from strata.common.errors import NotFound, ProtocolError, StrataError, Unavailable
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver import pagestream as ps
from strata.pg.pgclient import CopyBothStream, PgConnection, ServerError
from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_REQUEST_TIMEOUT_S = 120.0  # above the pageserver's wait for an LSN (60 s)
DEFAULT_LEASE_S = 600.0
RECONNECT_FIRST_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 2.0


class PageClient:
    """One pagestream connection (asyncio). Use `await PageClient.connect(...)`."""

    def __init__(self, conn: PgConnection, stream: CopyBothStream, describe: str,
                 request_timeout_s: float) -> None:
        self._conn = conn
        self._stream = stream
        self.describe = describe
        self.request_timeout_s = request_timeout_s
        self._core = ps.ClientCore()
        self._waiters: deque[asyncio.Future[ps.Response]] = deque()
        self._failure: StrataError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, tenant_id: TenantId, timeline_id: TimelineId,
                      *, user: str = "strata", timeout_s: float = 10.0,
                      request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                      token: str | None = None) -> PageClient:
        """Connect and start the pagestream; NotFound if the pageserver has no such timeline.
        `token` (None: `$STRATA_AUTH_TOKEN`) is the password when the pageserver checks
        tokens (strata.common.auth)."""
        conn = await PgConnection.connect(host, port, user=user, timeout_s=timeout_s,
                                          password=token or default_token(),
                                          max_message_bytes=ps.MAX_MESSAGE_BYTES + 16)
        describe = f"pagestream {tenant_id}/{timeline_id} at {host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                stream = await conn.start_copy_both(f"pagestream {tenant_id} {timeline_id}")
        except ServerError as err:
            await conn.close()
            if err.code == "42704":  # undefined_object: the pageserver's NotFound
                raise NotFound(f"{describe}: {err.response.message}") from err
            raise
        except BaseException:
            conn.abort()
            raise
        return cls(conn, stream, describe, request_timeout_s)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    # --- requests ----------------------------------------------------------------------
    async def request(self, request: ps.Request) -> ps.Response:
        """Send one request and return its (non-error) response; errors are raised."""
        if self._failure is not None:
            raise self._failure
        request, data = self._core.send(request)
        fut: asyncio.Future[ps.Response] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await self._stream.send(data)
        except StrataError as err:
            self._fail(Unavailable(f"{self.describe}: connection lost while sending: {err}"))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                response = await fut
        except TimeoutError as err:
            # The late response, if it comes, finds this future cancelled and is dropped.
            raise Unavailable(f"{self.describe}: no answer to {ps.describe(request)} within "
                              f"{self.request_timeout_s}s") from err
        if isinstance(response, ps.ErrorResponse):
            raise response.to_exception()
        return response

    async def get_page(self, rel: RelTag, blkno: int, lsn: Lsn) -> bytes:
        response = await self.request(ps.GetPageRequest(lsn, rel, blkno))
        assert isinstance(response, ps.GetPageResponse), response
        return response.page

    async def get_pages(self, blocks: Iterable[tuple[RelTag, int]], lsn: Lsn) -> list[bytes]:
        """Many blocks in round trips of up to MAX_BATCH_PAGES blocks each (pipelined)."""
        todo = list(blocks)
        batches = [todo[i:i + ps.MAX_BATCH_PAGES]
                   for i in range(0, len(todo), ps.MAX_BATCH_PAGES)]
        responses = await asyncio.gather(*(self.request(ps.GetPagesRequest(lsn, tuple(b)))
                                           for b in batches))
        pages: list[bytes] = []
        for response in responses:
            assert isinstance(response, ps.GetPagesResponse), response
            pages.extend(response.pages)
        assert len(pages) == len(todo), (len(pages), len(todo))
        return pages

    async def get_rel_pages(self, rel: RelTag, blknos: Iterable[int], lsn: Lsn) -> list[bytes]:
        return await self.get_pages(((rel, b) for b in blknos), lsn)

    async def nblocks(self, rel: RelTag, lsn: Lsn) -> int:
        response = await self.request(ps.NblocksRequest(lsn, rel))
        assert isinstance(response, ps.NblocksResponse), response
        return response.nblocks

    async def exists(self, rel: RelTag, lsn: Lsn) -> bool:
        response = await self.request(ps.ExistsRequest(lsn, rel))
        assert isinstance(response, ps.ExistsResponse), response
        return response.exists

    async def dbsize(self, dbnode: int, lsn: Lsn, spcnode: int = 1663) -> int:
        response = await self.request(ps.DbSizeRequest(lsn, dbnode, spcnode))
        assert isinstance(response, ps.DbSizeResponse), response
        return response.size_bytes

    async def slru_segment(self, kind: SlruKind, segno: int, lsn: Lsn) -> bytes:
        response = await self.request(ps.GetSlruSegmentRequest(lsn, kind, segno))
        assert isinstance(response, ps.GetSlruSegmentResponse), response
        return response.data

    async def lease(self, lsn: Lsn, duration_s: float = DEFAULT_LEASE_S) -> float:
        """Acquire or renew a lease on `lsn`; returns its expiry on the pageserver's clock."""
        response = await self.request(ps.LeaseRequest(lsn, duration_s))
        assert isinstance(response, ps.LeaseResponse), response
        return response.expires_at

    # --- the reader ---------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                payload = await self._stream.read()
                if payload is None:
                    raise Unavailable(f"{self.describe}: the pageserver ended the stream")
                _, response = self._core.receive(payload)
                fut = self._waiters.popleft()
                if not fut.done():  # a caller that timed out has gone
                    fut.set_result(response)
        except (StrataError, OSError) as err:
            if not isinstance(err, StrataError):
                err = Unavailable(f"{self.describe}: connection lost: {err}")
            elif isinstance(err, ServerError):
                # pgserve's FATAL: the server closed the connection (e.g. a protocol error).
                err = Unavailable(f"{self.describe}: the pageserver closed the connection: "
                                  f"{err}")
            self._fail(err)

    def _fail(self, err: StrataError) -> None:
        if self._failure is None:
            self._failure = err
            self._conn.abort()
            if not isinstance(err, ProtocolError):
                log.debug("%s: closed: %s", self.describe, err)
        self._core.fail_all()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(self._failure)
        if self._reader is not asyncio.current_task():
            self._reader.cancel()

    async def close(self) -> None:
        """End the stream politely (CopyDone) and close the connection."""
        if self._failure is None:
            self._failure = Unavailable(f"{self.describe}: the client was closed")
            # The reader must be gone before finish() reads the rest of the stream.
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            for fut in self._waiters:
                if not fut.done():
                    fut.set_exception(self._failure)
            self._waiters.clear()
            try:
                async with asyncio.timeout(5):
                    await self._stream.finish()
                    await self._conn.close()
            except (StrataError, OSError, TimeoutError):
                self._conn.abort()
        else:
            self._conn.abort()
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> PageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AddressSource(Protocol):
    """The pageserver's (host, pg port) now; `fresh`: no cached answer (after an error)."""

    def __call__(self, fresh: bool = False) -> tuple[str, int]: ...


class PageClientSync:
    """Blocking pagestream client for threads; one connection, reused and re-opened."""

    def __init__(self, host: str, port: int, tenant_id: TenantId, timeline_id: TimelineId,
                 *, user: str = "strata", timeout_s: float = 10.0,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 outage_wait_s: float = 0.0, token: str | None = None,
                 address: AddressSource | None = None) -> None:
        assert outage_wait_s >= 0, outage_wait_s
        self._args = (host, port, tenant_id, timeline_id)
        self._address = address
        self._lease: tuple[Lsn, float] | None = None  # the last one taken: moved along
        self._leased_at: tuple[str, int] | None = None  # the pageserver that has it
        self._kwargs: dict[str, Any] = {"user": user, "timeout_s": timeout_s,
                                        "request_timeout_s": request_timeout_s,
                                        "token": token}
        self.outage_wait_s = outage_wait_s
        # A call: an outage (its last connect attempt may start just before the end),
        # then a connect and a request.
        self._call_timeout_s = outage_wait_s + 2 * timeout_s + request_timeout_s + 5
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"page-client-{port}")
        self._thread.start()
        self._client: PageClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        self.connects = 0

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._call_timeout_s)

    async def _moved(self, fresh: bool = False) -> bool:
        """Whether `address` names another pageserver now; if so the old connection is
        closed and the next connect goes to the new one."""
        if self._address is None:
            return False
        host, port = self._address(fresh)
        if (host, port) == self._args[:2]:
            return False
        log.info("%s: the pageserver moved to %s:%d", self.describe, host, port)
        self._args = (host, port, *self._args[2:])
        old, self._client = self._client, None
        if old is not None:
            await old.close()
        return True

    async def _get_client(self, fresh: bool = False) -> PageClient:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            await self._moved(fresh)
            if self._client is None or self._client.closed:
                client = await PageClient.connect(*self._args, **self._kwargs)
                self.connects += 1
                if self._lease is not None and self._leased_at != self._args[:2]:
                    # The new pageserver keeps the compute's LSN from GC as the old did.
                    try:
                        await client.lease(*self._lease)
                        self._leased_at = (self._args[0], self._args[1])
                    except StrataError as err:
                        log.warning("%s: could not move the lease on %s: %s (the renewal "
                                    "retries)", self.describe, self._lease[0], err)
                self._client = client
            return self._client

    async def _call(self, op: Callable[[PageClient], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        lost_at: float | None = None
        delay_s = 0.0  # the first retry is at once: the connection may just have been stale
        while True:
            client: PageClient | None = None
            try:
                client = await self._get_client(fresh=lost_at is not None)
                result = await op(client)
            except StrataError as err:
                if client is not None and not client.closed:
                    if self._address is None or client is self._client and \
                            self._address(True)[:2] == self._args[:2]:
                        raise  # the pageserver answered with an error: report it
                    # The old pageserver (the tenant moved away): ask the new one.
                if client is None and not isinstance(err, Unavailable):
                    raise  # it answered the connect with a refusal (NotFound, ...)
                now = loop.time()
                if lost_at is None:
                    lost_at = now
                    log.info("%s: connection lost (%s); reconnecting for up to %gs",
                             self.describe, err, self.outage_wait_s)
                elif now - lost_at >= self.outage_wait_s:
                    raise Unavailable(f"{self.describe}: the pageserver did not come back "
                                      f"within {self.outage_wait_s:g}s: {err}") from err
                await asyncio.sleep(min(delay_s, max(0.0, lost_at + self.outage_wait_s - now)))
                delay_s = min(max(delay_s * 2, RECONNECT_FIRST_DELAY_S), RECONNECT_MAX_DELAY_S)
                continue
            if lost_at is not None:
                log.info("%s: reconnected after %.1fs", self.describe, loop.time() - lost_at)
            return result

    @property
    def describe(self) -> str:
        host, port, tenant_id, timeline_id = self._args
        return f"pagestream {tenant_id}/{timeline_id} at {host}:{port}"

    def get_page(self, rel: RelTag, blkno: int, lsn: Lsn) -> bytes:
        return self._run(self._call(lambda c: c.get_page(rel, blkno, lsn)))

    def get_pages(self, blocks: Iterable[tuple[RelTag, int]], lsn: Lsn) -> list[bytes]:
        todo = list(blocks)
        return self._run(self._call(lambda c: c.get_pages(todo, lsn)))

    def get_rel_pages(self, rel: RelTag, blknos: Iterable[int], lsn: Lsn) -> list[bytes]:
        return self.get_pages(((rel, b) for b in blknos), lsn)

    def nblocks(self, rel: RelTag, lsn: Lsn) -> int:
        return self._run(self._call(lambda c: c.nblocks(rel, lsn)))

    def exists(self, rel: RelTag, lsn: Lsn) -> bool:
        return self._run(self._call(lambda c: c.exists(rel, lsn)))

    def dbsize(self, dbnode: int, lsn: Lsn, spcnode: int = 1663) -> int:
        return self._run(self._call(lambda c: c.dbsize(dbnode, lsn, spcnode)))

    def slru_segment(self, kind: SlruKind, segno: int, lsn: Lsn) -> bytes:
        return self._run(self._call(lambda c: c.slru_segment(kind, segno, lsn)))

    def lease(self, lsn: Lsn, duration_s: float = DEFAULT_LEASE_S) -> float:
        self._lease, self._leased_at = (lsn, duration_s), (self._args[0], self._args[1])
        return self._run(self._call(lambda c: c.lease(lsn, duration_s)))

    def close(self) -> None:
        """Close the connection and stop the loop thread."""
        async def _close() -> None:
            if self._client is not None:
                await self._client.close()
                self._client = None

        if self._thread.is_alive():
            try:
                self._run(_close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
                self._loop.close()

    def __enter__(self) -> PageClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

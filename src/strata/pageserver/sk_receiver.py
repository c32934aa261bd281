"""The pageserver's WAL receiver following the safekeepers (architecture D7, D10 on one host).

A timeline whose compute writes through a walproposer gets its WAL from the safekeepers,
never from the compute: they serve only WAL at or below their commit LSN, so the pageserver
never ingests a tail that a later term truncates. `SafekeeperReceiver` picks the safekeeper
whose timeline state (its HTTP timeline status: `commit_lsn`) is the most advanced,
streams from it from the end of the timeline's `WalLog`, and switches to another one when
its connection ends, or when a peer has committed WAL that it cannot give (it missed the
last commit LSN, or lags by more than `switch_lag_bytes`) for `switch_after_s`. While
streaming it polls every safekeeper's commit LSN each `relaxed_poll_s` (1 s), and each
`poll_interval_s` (0.25 s) while such a peer is seen.

The streaming itself is the development-mode receiver's (`WalReceiver._stream`): XLogData is
appended to the log, and each status update reports write = flush = received and apply =
`Timeline.wal_durable_lsn` (`disk_consistent_lsn`, or with remote storage
`remote_consistent_lsn`), which the safekeepers use to drop WAL. Updates go out when the
apply LSN moves (and once a second, or when the safekeeper asks), not after every batch:
the safekeeper decoded one per commit for nothing. The log is not fsynced
(`WalReceiverConfig.fsync_wal=False`): the safekeepers keep every byte above the apply
LSN, so after a crash the pageserver cuts its log back to `last_record_lsn` (which is then
`disk_consistent_lsn`) and streams the rest again (`TimelineWal.start`); an fsync per
batch bought nothing but a fifth fsync per commit on the commit path's disk.

The safekeeper's walsender (docs/safekeeper.md): a connection as user `strata` with
`replication=true`, then `START_REPLICATION PHYSICAL <lsn> <tenant> <timeline>` (the
command is built in one place, `start_command`). When the safekeepers check tokens, the
pageserver sends the one in its `$STRATA_AUTH_TOKEN` (an admin token; strata.common.auth)
on both ports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from strata.common.auth import auth_headers, default_token
from strata.common.errors import Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig
from strata.pg.pgclient import CopyBothStream, PgConnection

log = logging.getLogger(__name__)

APPLICATION_NAME = "strata_pageserver"


@dataclass(frozen=True, slots=True)
class SafekeeperEndpoint:
    """One safekeeper: its node id, PG-protocol port (walsender) and HTTP port (status)."""

    node_id: int
    host: str
    pg_port: int
    http_port: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SafekeeperEndpoint:
        try:
            return cls(int(data["id"]), str(data.get("host", "127.0.0.1")),
                       int(data["pg_port"]), int(data["http_port"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"safekeeper entry {data!r}: expected "
                            "{id, host, pg_port, http_port}") from err

    def to_json(self) -> dict[str, Any]:
        return {"id": self.node_id, "host": self.host, "pg_port": self.pg_port,
                "http_port": self.http_port}


def start_command(tenant_id: TenantId, timeline_id: TimelineId, lsn: Lsn) -> str:
    """The safekeeper walsender's command to stream committed WAL from `lsn`."""
    return f"START_REPLICATION PHYSICAL {lsn} {tenant_id} {timeline_id}"


async def timeline_commit_lsn(session: aiohttp.ClientSession, sk: SafekeeperEndpoint,
                              tenant_id: TenantId, timeline_id: TimelineId) -> Lsn | None:
    """The safekeeper's commit LSN for the timeline, or None if it cannot tell us now."""
    url = f"http://{sk.host}:{sk.http_port}/v1/tenant/{tenant_id}/timeline/{timeline_id}"
    try:
        async with session.get(url, headers=auth_headers(default_token())) as resp:
            if resp.status != 200:
                return None
            body = await resp.json()
        return Lsn.parse(str(body["commit_lsn"]))
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, TypeError):
        return None


class SafekeeperReceiver(WalReceiver):
    """Streams committed WAL of one timeline from the best safekeeper into `wal_log`."""

    def __init__(self, tenant_id: TenantId, timeline_id: TimelineId,
                 safekeepers: Sequence[SafekeeperEndpoint], wal_log: WalLog, *,
                 apply_lsn: Callable[[], Lsn] | None = None,
                 on_flush: Callable[[Lsn], None] | None = None,
                 switch_lag_bytes: int = 1 << 20, switch_after_s: float = 1.0,
                 poll_interval_s: float = 0.25, relaxed_poll_s: float = 1.0) -> None:
        if not safekeepers:
            raise UserError(f"timeline {timeline_id}: no safekeepers to follow")
        first = safekeepers[0]
        # The base class logs and connects by config.host/port: they name the safekeeper
        # streamed from at the moment (see _session).
        config = WalReceiverConfig(host=first.host, port=first.pg_port, slot_name="unused",
                                   user="strata", application_name=APPLICATION_NAME,
                                   backoff_max_s=1.0, fsync_wal=False)
        super().__init__(config, wal_log, apply_lsn=apply_lsn, on_flush=on_flush)
        self.tenant_id = tenant_id
        self.timeline_id = timeline_id
        self.safekeepers = tuple(safekeepers)
        self.switch_lag_bytes = switch_lag_bytes
        self.switch_after_s = switch_after_s
        self.poll_interval_s = poll_interval_s  # while a peer is ahead of what we received
        self.relaxed_poll_s = max(relaxed_poll_s, poll_interval_s)  # while none is
        self.current: SafekeeperEndpoint | None = None
        self.switches = 0  # times it moved to another safekeeper, for tests and status
        self._http: aiohttp.ClientSession | None = None  # while run() runs

    async def run(self) -> None:
        """The base class's loop, with one HTTP session for all the status polls: its
        kept-alive connections to the safekeepers save a TCP connect and close per poll
        and safekeeper (four polls a second while streaming)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            self._http = http
            try:
                await super().run()
            finally:
                self._http = None

    async def _commit_lsns(self) -> dict[int, Lsn]:
        if self._http is None:  # called outside run()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
                return await self._poll(http)
        return await self._poll(self._http)

    async def _poll(self, http: aiohttp.ClientSession) -> dict[int, Lsn]:
        found = await asyncio.gather(*(
            timeline_commit_lsn(http, sk, self.tenant_id, self.timeline_id)
            for sk in self.safekeepers))
        return {sk.node_id: lsn for sk, lsn in zip(self.safekeepers, found, strict=True)
                if lsn is not None}

    async def _choose(self) -> SafekeeperEndpoint:
        """The safekeeper with the highest commit LSN (the current one on a tie)."""
        lsns = await self._commit_lsns()
        if not lsns:
            raise Unavailable(f"no safekeeper reports timeline {self.timeline_id} "
                              f"({', '.join(f'{s.host}:{s.http_port}' for s in self.safekeepers)})")
        current = self.current.node_id if self.current is not None else -1
        best = max(lsns, key=lambda n: (lsns[n], n == current))
        return next(sk for sk in self.safekeepers if sk.node_id == best)

    async def _session(self) -> None:
        target = await self._choose()
        if self.current is not None and target != self.current:
            self.switches += 1
        self.current = target
        self.config = dataclasses.replace(self.config, host=target.host, port=target.pg_port)
        conn = await PgConnection.connect(target.host, target.pg_port, user="strata",
                                          password=default_token(),
                                          replication="true",
                                          application_name=APPLICATION_NAME,
                                          timeout_s=self.config.connect_timeout_s)
        try:
            start = self.wal_log.end_lsn
            stream = await conn.start_copy_both(
                start_command(self.tenant_id, self.timeline_id, start))
            self.connections += 1
            self.connected.set()
            log.info("streaming timeline %s from safekeeper %d (%s:%d) at %s",
                     self.timeline_id, target.node_id, target.host, target.pg_port, start)
            await self._stream_watched(stream, target)
        finally:
            conn.close_nowait()

    async def _stream_watched(self, stream: CopyBothStream, target: SafekeeperEndpoint) -> None:
        streaming = asyncio.create_task(self._stream(stream), name="sk-stream")
        watch = asyncio.create_task(self._watch(target), name="sk-watch")
        try:
            done, _ = await asyncio.wait([streaming, watch], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the reason the session ends
        finally:
            for task in (streaming, watch):
                task.cancel()
            await asyncio.wait([streaming, watch])

    async def _watch(self, target: SafekeeperEndpoint) -> None:
        """Return an error once another safekeeper has committed WAL that ours cannot give
        us (it has nothing beyond what we received, or lags by more than
        `switch_lag_bytes`) for `switch_after_s`: a safekeeper that missed the last commit
        LSN (sync stops once a majority has it) or is stuck."""
        behind_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            # Each poll asks every safekeeper (an HTTP request each, on both sides' CPU):
            # often only while one has committed WAL beyond what we received.
            await asyncio.sleep(self.relaxed_poll_s if behind_since is None
                                else self.poll_interval_s)
            lsns = await self._commit_lsns()
            received = self.wal_log.end_lsn
            best = max(lsns.values(), default=Lsn(0))
            ours = lsns.get(target.node_id, Lsn(0))
            stuck = best > received and (ours <= received
                                         or best - received > self.switch_lag_bytes)
            if not stuck:
                behind_since = None
                continue
            now = loop.time()
            behind_since = now if behind_since is None else behind_since
            if now - behind_since >= self.switch_after_s:
                raise Unavailable(f"safekeeper {target.node_id} (commit {ours}) cannot give "
                                  f"WAL from {received} to the best commit LSN {best} for "
                                  f"{self.switch_after_s}s; switching")

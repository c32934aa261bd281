"""Development-mode WAL receiver: stream a compute's WAL into the pageserver's `WalLog`.

Architecture D7, the mode without safekeepers: the pageserver is the compute's
synchronous standby. It connects as a physical replication client
(`replication=true`, `application_name` listed in the compute's
`synchronous_standby_names`), checks the system identifier, and runs
`START_REPLICATION SLOT <slot> PHYSICAL <lsn>` from the end of its log. Every
batch of XLogData is appended and fsynced; then a standby status update reports
write = received, flush = fsynced (so a commit returns only once the WAL is
durable here) and apply = a caller-supplied LSN (later the pageserver's
disk_consistent_lsn). Consumers follow `flush_lsn` through `on_flush` or
`wait_for_flush`. Without `fsync_wal` (the safekeepers' receiver, whose sender uses only
the apply LSN) a status update goes out only when the apply LSN moved, when the sender
asks for one, and at least every `status_interval_s`, not after every batch.

The connection is re-established with bounded exponential backoff when it drops
or the compute restarts; streaming always resumes at the log's end, so the log
has no gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from strata.common.errors import StrataError, Unavailable, UserError
from strata.common.lsn import Lsn
from strata.pageserver.wal_log import TIMELINE, WalLog
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection, ServerError
from strata.pg.replication import identify_system, read_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WalReceiverConfig:
    host: str
    port: int
    slot_name: str
    user: str = "postgres"
    application_name: str = "strata_pageserver"
    system_id: int | None = None  # refuse a compute of another cluster when set
    status_interval_s: float = 1.0  # status update while idle (wal_receiver_status_interval)
    connect_timeout_s: float = 10
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    # fsync on the event loop's own thread: for a process that does nothing else (the
    # dev-mode receiver's child process), it saves a thread hand-off per commit batch.
    fsync_inline: bool = False
    # False: appended WAL counts as flushed without an fsync (`WalLog.publish`), for a
    # source that keeps it until our apply LSN passes it (the safekeepers, sk_receiver.py).
    fsync_wal: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", self.slot_name):
            raise UserError(f"invalid replication slot name {self.slot_name!r}: use lower "
                            "case letters, digits and underscores")
        assert 0 < self.backoff_initial_s <= self.backoff_max_s, \
            (self.backoff_initial_s, self.backoff_max_s)
        assert self.status_interval_s > 0, self.status_interval_s


_WARN_EVERY_FAILURES = 10


class WrongSystem(UserError):
    """The compute belongs to another cluster; streaming from it would corrupt the log."""


class WalReceiver:
    """Streams WAL from one compute into `wal_log` until `stop()`."""

    def __init__(self, config: WalReceiverConfig, wal_log: WalLog, *,
                 apply_lsn: Callable[[], Lsn] | None = None,
                 on_flush: Callable[[Lsn], None] | None = None) -> None:
        self.config = config
        self.wal_log = wal_log
        self._apply_lsn = apply_lsn or (lambda: Lsn(0))
        self._on_flush = on_flush
        self._flushed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.connections = 0  # successful START_REPLICATIONs, for tests and status
        self.server_end_lsn = Lsn(0)  # the compute's end of WAL as it last told us
        self.last_error: str | None = None

    @property
    def flush_lsn(self) -> Lsn:
        return self.wal_log.flush_lsn

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        assert self._task is None, "already started"
        self._task = asyncio.create_task(self.run(), name="walreceiver")
        return self._task

    async def stop(self) -> None:
        """Stop streaming and close the connection (the log stays open)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait does not raise, so a cancellation of stop() itself still
            # reaches our caller.
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.info("walreceiver had stopped with %r", task.exception())

    async def run(self) -> None:
        """Connect, stream, and reconnect with backoff until stopped.

        Returns only on `stop()`; raises WrongSystem for a compute of another cluster."""
        backoff = self.config.backoff_initial_s
        failures = 0  # in a row, without streaming in between
        while not self._stopping.is_set():
            connections_before = self.connections
            try:
                await self._session()
            except WrongSystem:
                raise
            except (StrataError, OSError) as err:
                self.last_error = str(err)
                failures += 1
                # A compute restart takes a few tries; ten in a row (seconds of backoff)
                # means something someone should look at (a missing slot, a dead compute).
                level = logging.WARNING if failures % _WARN_EVERY_FAILURES == 0 else logging.INFO
                log.log(level, "walreceiver: connection to %s:%d ended (%d in a row): %s; "
                        "retrying in %.2fs", self.config.host, self.config.port, failures, err,
                        backoff)
            finally:
                self.connected.clear()
            if self.connections != connections_before:
                backoff = self.config.backoff_initial_s  # it worked for a while
                failures = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stopping.wait()
            backoff = min(backoff * 2, self.config.backoff_max_s)

    async def wait_for_flush(self, lsn: Lsn, timeout_s: float) -> Lsn:
        """Wait until `flush_lsn >= lsn`; Unavailable after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s), self._flushed:
                await self._flushed.wait_for(lambda: self.flush_lsn >= lsn)
        except TimeoutError as err:
            raise Unavailable(f"WAL flushed only to {self.flush_lsn}, not {lsn}, after "
                              f"{timeout_s}s (last error: {self.last_error})") from err
        return self.flush_lsn

    # --- one connection ----------------------------------------------------------------
    async def _session(self) -> None:
        cfg = self.config
        conn = await PgConnection.connect(cfg.host, cfg.port, user=cfg.user,
                                          replication="true",
                                          application_name=cfg.application_name,
                                          timeout_s=cfg.connect_timeout_s)
        try:
            await self._identify(conn)
            start = self.wal_log.end_lsn
            stream = await conn.start_copy_both(
                f"START_REPLICATION SLOT {cfg.slot_name} PHYSICAL {start}")
            self.connections += 1
            self.connected.set()
            log.info("walreceiver: streaming from %s:%d slot %s at %s", cfg.host, cfg.port,
                     cfg.slot_name, start)
            await self._stream(stream)
        finally:
            conn.close_nowait()

    async def _identify(self, conn: PgConnection) -> None:
        ident = await identify_system(conn)
        system_id, timeline = ident.system_id, ident.timeline
        if timeline != TIMELINE:
            # Strata computes never promote (architecture D5), and the log's segment
            # names assume timeline 1.
            raise WrongSystem(f"compute at {self.config.host}:{self.config.port} is on "
                              f"PostgreSQL timeline {timeline}, not {TIMELINE}; it was not "
                              "started by Strata")
        expected = self.config.system_id
        if expected is not None and system_id != expected:
            raise WrongSystem(f"compute at {self.config.host}:{self.config.port} has system "
                              f"id {system_id}, expected {expected}; it belongs to another "
                              "cluster, check the endpoint's configuration")

    async def _stream(self, stream: CopyBothStream) -> None:
        received = self.wal_log.end_lsn.value
        reported_flush = -1
        reported_apply = -1
        interval = self.config.status_interval_s
        loop = asyncio.get_running_loop()
        last_status = loop.time()
        while True:
            try:
                async with asyncio.timeout(interval):
                    # The first message, then every one already buffered: one fsync for all.
                    batch = await read_batch(stream, Lsn(received))
            except TimeoutError:
                # Idle: tell the sender we are alive (and our apply LSN may have moved).
                reported_apply = await self._send_status(stream, received, False)
                last_status = loop.time()
                continue
            if len(batch.pieces) == 1:
                self.wal_log.append(*batch.pieces[0])
            elif batch.pieces:
                # One write (and one piece of the log's in-memory tail) for the batch:
                # its pieces are contiguous (read_batch).
                self.wal_log.append(batch.pieces[0][0],
                                    b"".join(data for _, data in batch.pieces))
            received = batch.end_lsn.value
            if batch.server_end_lsn:
                self.server_end_lsn = batch.server_end_lsn
            if received > self.wal_log.flush_lsn.value:
                await self._notify(await self._fsync())
            if self.config.fsync_wal:
                # The sender waits for our flush (a compute's synchronous standby).
                report = self.wal_log.flush_lsn.value != reported_flush
            else:
                # Only the apply LSN means something to the sender (the safekeepers drop
                # WAL below it); write = flush = received is reported every `interval`.
                report = (self._apply_lsn().value != reported_apply
                          or loop.time() - last_status >= interval)
            if report or batch.reply_requested:
                reported_flush = self.wal_log.flush_lsn.value
                reported_apply = await self._send_status(stream, received, False)
                last_status = loop.time()

    async def _fsync(self) -> Lsn:
        if not self.config.fsync_wal:
            return self.wal_log.publish()
        if self.config.fsync_inline:
            return self.wal_log.fsync()
        # In a worker thread, so the event loop keeps serving; but a cancelled receiver
        # must not return (and let its log be closed) while that thread still fsyncs.
        fsync = asyncio.ensure_future(asyncio.to_thread(self.wal_log.fsync))
        try:
            return await asyncio.shield(fsync)
        except asyncio.CancelledError:
            await fsync
            raise

    async def _send_status(self, stream: CopyBothStream, received: int,
                           reply_requested: bool) -> int:
        """Send a status update; returns the apply LSN it reported."""
        apply = self._apply_lsn().value
        update = wire.StandbyStatusUpdate(
            write_lsn=received, flush_lsn=self.wal_log.flush_lsn.value,
            apply_lsn=apply, send_time_us=wire.pg_timestamp(time.time()),
            reply_requested=reply_requested)
        await stream.send(update.encode())
        return apply

    async def _notify(self, flushed: Lsn) -> None:
        async with self._flushed:
            self._flushed.notify_all()
        if self._on_flush is not None:
            self._on_flush(flushed)


__all__ = ["ServerError", "WalReceiver", "WalReceiverConfig", "WrongSystem"]

"""`WalPuller`: pull mode's replication client, one per timeline that pulls.

Started by the `StartPull` action of a timeline's acceptor (a `PullFrom` of the term it
adopted, docs/safekeeper-protocol.md "Pull mode"): it connects to the compute as a physical
replication client (application name = the slot name, which the compute's
`synchronous_standby_names` counts), checks its system id (and, if the `PullFrom` named
one, its `strata.compute_id`: a compute restarted on the same address is another compute,
whose WAL belongs to a later term), runs `START_REPLICATION SLOT
<slot> PHYSICAL <the acceptor's flush LSN>` and applies every batch of XLogData (one fsync
per batch, then one standby status update with write = flush = apply = the durable end,
sent at once: no timer; and an `AppendResponse` to the proposer connection that sent the
`PullFrom`, at most every `pull_answer_interval_s`). The stream is diverted to
`copy_data` (`CopyBothStream.divert`): a chunk read from the socket is one batch, applied
in that callback when the timeline lock is free (`Timeline.try_apply_pulled`, the fast
path: no coroutine hop), else queued in order for a drain task (`Timeline.apply_pulled`).

`close()` is synchronous and runs in the timeline's event loop while it holds the timeline
lock (the `ClosePull` before a higher term's promise): it aborts the socket (anything still
buffered for the compute is dropped) and cancels the task, so no status update of the old
term can follow the promise; a batch that was waiting for the lock (queued, or its drain
task) finds the puller closed and applies nothing, and no data callback comes after the
abort.

A dropped connection (the compute restarted, a network error) is retried with bounded
backoff, resuming at the acceptor's flush LSN, as long as the acceptor still pulls from this
source in this term.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from strata.common.errors import StrataError
from strata.common.logctx import timeline_context
from strata.common.lsn import Lsn
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection, ServerError
from strata.pg.replication import (
    DEFAULT_BATCH_BYTES,
    ReplicationBatch,
    decode_batch,
    identify_system,
)
from strata.safekeeper.acceptor import PullSource

if TYPE_CHECKING:
    from strata.safekeeper.timeline import Timeline

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0
CONNECT_TIMEOUT_S = 10.0
_WARN_EVERY_FAILURES = 10
PG_TIMELINE = 1  # Strata computes never promote (architecture D5)


class WalPuller:
    """Streams the compute's WAL of `source.term` into `timeline` until closed."""

    def __init__(self, timeline: Timeline, source: PullSource, *, user: str) -> None:
        self.timeline = timeline
        self.source = source
        self.user = user
        self.closed = False
        self.connections = 0  # successful START_REPLICATIONs
        self.batches = 0
        self.last_error: str | None = None
        self.reported_lsn: Lsn | None = None  # the last flush LSN sent to the compute
        # Sends one encoded message on the proposer connection that sent the PullFrom
        # (the pull feedback); None once that connection is gone.
        self.reply_to: Callable[[bytes], None] | None = None
        # The last AppendResponse sent there and the one due (Timeline.apply_pulled).
        self.answered_s = float("-inf")
        self.answer_timer: asyncio.TimerHandle | None = None
        self._conn: PgConnection | None = None
        self._stream: CopyBothStream | None = None
        # The session's stream (copy_data): where the next XLogData must start, its end
        # (set with the error that ends it), and the batches waiting for the timeline lock.
        self.fast_batches = 0  # batches applied in the data callback (try_apply_pulled)
        self._expected = Lsn(0)
        self._ended: asyncio.Future[None] | None = None
        self._queue: list[ReplicationBatch] = []
        self._queued_bytes = 0
        self._drain: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] = asyncio.create_task(
            self._run(), name=f"pull-{source.slot_name}-{source.term}")

    def describe(self) -> str:
        s = self.source
        compute = f"compute {s.compute_id} at " if s.compute_id else ""
        return f"{compute}{s.host}:{s.port} slot {s.slot_name} (term {s.term})"

    # --- closing -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the stream now (synchronous: nothing more is sent or delivered)."""
        if self.closed:
            return
        self.closed = True
        if self.answer_timer is not None:
            self.answer_timer.cancel()
            self.answer_timer = None
        self._drop_connection()
        self.task.cancel()
        log.info("stopped pulling from %s", self.describe())

    async def wait_closed(self) -> None:
        if not self.task.done():
            await asyncio.wait([self.task])

    # --- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        s = self.timeline.state
        with timeline_context(s.tenant_id, s.timeline_id):
            backoff = BACKOFF_INITIAL_S
            failures = 0
            while not self.closed and self._still_pulls():
                connections = self.connections
                try:
                    await self._session()
                except (StrataError, OSError) as err:
                    self.last_error = str(err)
                    failures += 1
                    level = logging.WARNING if failures % _WARN_EVERY_FAILURES == 0 \
                        else logging.INFO
                    log.log(level, "pull from %s for %s/%s ended (%d in a row): %s; retrying "
                            "in %.2fs", self.describe(), s.tenant_id, s.timeline_id, failures,
                            err, backoff)
                finally:
                    self._drop_connection()
                if self.connections != connections:
                    backoff, failures = BACKOFF_INITIAL_S, 0  # it streamed for a while
                    continue  # at once: the compute may only have dropped this connection
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _still_pulls(self) -> bool:
        return self.timeline.acceptor.pull_source == self.source

    def _drop_connection(self) -> None:
        self._stream = None
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    async def _session(self) -> None:
        src = self.source
        tl = self.timeline
        conn = await PgConnection.connect(src.host, src.port, user=self.user,
                                          replication="true", application_name=src.slot_name,
                                          timeout_s=CONNECT_TIMEOUT_S)
        if self.closed:
            conn.abort()
            return
        self._conn = conn
        ident = await identify_system(conn)
        if ident.system_id != tl.state.system_id or ident.timeline != PG_TIMELINE:
            raise StrataError(f"the compute at {src.host}:{src.port} has system id "
                              f"{ident.system_id} on PostgreSQL timeline {ident.timeline}; "
                              f"timeline {tl.state.timeline_id} is system "
                              f"{tl.state.system_id} on timeline {PG_TIMELINE}: not pulling "
                              "from it")
        if src.compute_id:
            await self._check_compute_id(conn)
        start = tl.acceptor.flush_lsn
        stream = await conn.start_copy_both(
            f"START_REPLICATION SLOT {src.slot_name} PHYSICAL {start}")
        if self.closed:
            return
        self._stream = stream
        self.reported_lsn = None  # this walsender has been told nothing yet
        self.connections += 1
        log.info("pulling WAL from %s at %s", self.describe(), start)
        self._expected = start
        ended = self._ended = asyncio.get_running_loop().create_future()
        try:
            stream.divert(self)  # batches now arrive in copy_data, applied there if it can
            await ended  # the stream's end or the first failure, raised
        finally:
            if ended.done() and not ended.cancelled():
                ended.exception()  # retrieved (raised above unless the task was cancelled)
            self._ended = None
            self._queue.clear()
            self._queued_bytes = 0
            if self._drain is not None:
                self._drain.cancel()
                self._drain = None

    # --- the stream's batches (CopyBothStream.divert) ------------------------------------
    def copy_data(self, payloads: list[bytes]) -> None:
        """The payloads of one chunk read from the compute: one batch. Applied at once,
        in this callback, when the timeline lock is free and nothing is queued before it
        (`Timeline.try_apply_pulled`: no coroutine hop, no task); else queued for the
        drain task, which applies the queue as one batch under the lock."""
        ended = self._ended
        if self.closed or ended is None or ended.done():
            return
        try:
            batch = decode_batch(payloads, self._expected)
            self._expected = batch.end_lsn
            if not self._queue and self._drain is None and self.timeline.try_apply_pulled(
                    self, batch.pieces, reply_requested=batch.reply_requested):
                self.batches += 1
                self.fast_batches += 1
                return
        except (StrataError, OSError) as err:
            self._end(err)
            return
        self._queue.append(batch)
        self._queued_bytes += batch.wal_bytes
        if self._queued_bytes >= DEFAULT_BATCH_BYTES and self._stream is not None:
            self._stream.pause_reading()  # the compute waits in its socket meanwhile
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_queue(),
                                              name=f"pull-drain-{self.source.slot_name}")

    async def _drain_queue(self) -> None:
        """Apply what `copy_data` queued (all of it as one batch) under the lock."""
        try:
            while self._queue and not self.closed:
                queue, self._queue = self._queue, []
                self._queued_bytes = 0
                if self._stream is not None:
                    self._stream.resume_reading()
                pieces = [piece for batch in queue for piece in batch.pieces]
                requested = any(batch.reply_requested for batch in queue)
                await self.timeline.apply_pulled(self, pieces, reply_requested=requested)
                self.batches += 1
        except (StrataError, OSError) as err:
            self._end(err)
        finally:
            self._drain = None

    def stream_ended(self, error: BaseException) -> None:
        self._end(error)

    def _end(self, error: BaseException) -> None:
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_exception(error)

    async def _check_compute_id(self, conn: PgConnection) -> None:
        """The compute at the source's address must be the one the proposer named: after a
        restart on the same address it is a new compute, whose WAL and slots belong to a
        later term (its own sidecar tells the safekeepers to pull from it)."""
        src = self.source
        try:
            rows = (await conn.simple_query("SHOW strata.compute_id")).rows
        except ServerError as err:  # an unrecognized parameter: a compute without an id
            raise StrataError(f"the compute at {src.host}:{src.port} has no compute id "
                              f"({err}); term {src.term} pulls from compute "
                              f"{src.compute_id}: not pulling from it") from None
        found = rows[0][0] if rows else None
        if found != src.compute_id:
            raise StrataError(f"the compute at {src.host}:{src.port} is compute {found}, "
                              f"not compute {src.compute_id} of term {src.term} (restarted "
                              "since: its own sidecar names it): not pulling from it")

    def send_status(self, flush_lsn: Lsn) -> None:
        """A standby status update (write = flush = apply = `flush_lsn`). Called by
        `Timeline.apply_pulled` under the timeline lock, right after the fsync that made it
        durable, so a ClosePull cannot come between the two."""
        stream = self._stream
        if stream is None or self.closed:
            return
        lsn = flush_lsn.value
        message = wire.encode_status_copy_data(lsn, lsn, lsn, wire.pg_timestamp(time.time()))
        try:
            sent = stream.send_message_nowait(message)
        except OSError:
            return
        if sent:
            self.reported_lsn = flush_lsn

    def status(self) -> dict[str, object]:
        s = self.source
        return {"term": s.term, "host": s.host, "port": s.port, "slot_name": s.slot_name,
                "connected": self._stream is not None, "connections": self.connections,
                "batches": self.batches, "fast_batches": self.fast_batches,
                "reported_lsn": None if self.reported_lsn is None else str(self.reported_lsn),
                "last_error": self.last_error}

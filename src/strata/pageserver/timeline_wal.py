"""One timeline's WAL path in development mode: log, receiver, and the ingest task.

Architecture D7 (the mode without safekeepers): a compute attached to the timeline
streams its WAL to a `WalReceiver` running in a child process (`ChildWalReceiver`,
walreceiver_proc.py: the compute's commits wait for its replies, which must not wait
for this process's interpreter lock), which appends it to the timeline's `WalLog`
(`<timeline dir>/wal/`) and fsyncs it. The ingest task follows the log's
`flush_lsn`: it feeds the bytes to a `WalStreamDecoder` and applies every complete
record to the `Timeline` with G's `WalIngest` on the loop's own thread, in steps of at most
64 KB with a yield to the loop between them so that it keeps serving (the worker-thread
hops and interpreter-lock hand-offs cost more than such a step); in a worker thread only
while a frozen layer waits to be written. It flushes frozen in-memory
layers as they appear, and the whole open layer after `checkpoint_timeout_s` of quiet.
The receiver reports
`Timeline.wal_durable_lsn` as its apply LSN (`disk_consistent_lsn`, or with remote
storage the `remote_consistent_lsn`: WAL a pageserver that lost its disk would re-read).

The decoder always starts at `last_record_lsn`, a record end (after a restart that
is `disk_consistent_lsn`: the log is re-read from there; D4). A receiver's address is
kept in `walreceiver.json` next to the log so that a restarted pageserver reconnects
to a running compute by itself (the compute waits for its synchronous standby).

With safekeepers (the normal mode, D7), `follow_safekeepers` replaces that receiver with a
`SafekeeperReceiver` (sk_receiver.py) that streams committed WAL from the most advanced
safekeeper; the list is kept in `safekeepers.json` and followed again after a restart.
That receiver does not fsync the log (the safekeepers keep the WAL until our durable LSN
passes it), so `start` cuts the log back to `last_record_lsn` before it follows them again. A
compute is then started at the LSN that the walproposer's sync printed (the basebackup
waits until ingest reaches it); `prepare_compute_start` is only for development mode.

`prepare_compute_start` is the dev-mode sync step (D6/D7): stop the receiver, let
ingest consume the whole log, cut a partial record off the log's tail, and return
where the next compute starts: (last_record_lsn, prev_record_lsn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from strata.common.durable import fsync_dir, write_atomic
from strata.common.errors import StrataError, Unavailable, UserError
from strata.common.failpoint import failpoint
from strata.common.failpoint import is_armed as failpoint_armed
from strata.common.logctx import timeline_context
from strata.common.lsn import Lsn
from strata.pageserver.sk_receiver import SafekeeperEndpoint, SafekeeperReceiver
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig
from strata.pageserver.walreceiver_proc import ChildWalReceiver
from strata.pg.walreader import DecodedRecord, WalStreamDecoder
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)
T = TypeVar("T")

WAL_DIR = "wal"
RECEIVER_FILE = "walreceiver.json"
SAFEKEEPERS_FILE = "safekeepers.json"
_IDLE_CHECK_S = 0.5  # how often a quiet ingest task looks at checkpoint_timeout_s
# Ingest on the event loop's thread goes in steps of this size (see _ingest); at most half
# the checkpoint_distance too, so such a step freezes at most one layer.
_INLINE_BATCH_BYTES = 64 * 1024


class RecordApplier(Protocol):
    """What the ingest task needs from G's WalIngest: apply one record, in order."""

    def ingest(self, record: DecodedRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class ReceiverTarget:
    """Where the compute attached to a timeline streams from (HTTP `wal_receiver` body)."""

    host: str
    port: int
    slot: str
    application_name: str
    user: str = "postgres"

    def receiver_config(self) -> WalReceiverConfig:
        return WalReceiverConfig(host=self.host, port=self.port, slot_name=self.slot,
                                 user=self.user, application_name=self.application_name,
                                 status_interval_s=1.0)


class TimelineWal:
    """The WAL log, receiver and ingest task of one timeline (all on one event loop)."""

    def __init__(self, timeline: Timeline, make_applier: Callable[[Timeline], RecordApplier],
                 *, batch_bytes: int = 4 * 1024 * 1024) -> None:
        self.timeline = timeline
        self.dir = timeline.dir / WAL_DIR
        self._make_applier = make_applier
        self._batch_bytes = batch_bytes
        self.wal_log: WalLog | None = None
        self.receiver: WalReceiver | ChildWalReceiver | None = None
        self.target: ReceiverTarget | None = None
        self.safekeepers: tuple[SafekeeperEndpoint, ...] = ()
        self._ingest_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Condition()  # notified after every ingest step
        self._fed = 0  # end of the log bytes given to the decoder
        self._caught_up = False  # decoded everything up to the log's flush_lsn
        self.ingest_error: str | None = None
        # Held while a worker thread writes to the timeline: a flush must not freeze the
        # open layer between the puts of one record.
        self._apply_lock = asyncio.Lock()
        # Writes frozen layers beside ingest, so that a flush (or a compaction holding the
        # timeline's maintenance lock) does not stall ingest; the timeline itself makes
        # ingest wait once too many frozen layers pile up.
        self._flush_task: asyncio.Task[None] | None = None

    def _context(self) -> contextlib.AbstractContextManager[None]:
        return timeline_context(self.timeline.tenant_id, self.timeline.timeline_id)

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Open (or create at last_record_lsn) the log, start ingest, and reconnect to the
        compute recorded in walreceiver.json, if any."""
        with self._context():
            start = self.timeline.last_record_lsn
            self.wal_log = await asyncio.to_thread(WalLog.open_or_create, self.dir, start)
            if self.wal_log.start_lsn > start:
                raise UserError(f"the WAL log in {self.dir} starts at {self.wal_log.start_lsn}, "
                                f"after the timeline's last_record_lsn {start}: WAL is missing")
            safekeepers = self._load_safekeepers()
            target = self._load_target()
            if safekeepers and self.wal_log.end_lsn > start:
                # Following safekeepers, the log is not fsynced (sk_receiver.py): after a
                # machine crash its tail may be short or zero-filled. The safekeepers keep
                # WAL above our durable LSN (<= start), so take it from them again.
                log.info("cutting the unsynced WAL log tail %s..%s; the safekeepers give it "
                         "again", start, self.wal_log.end_lsn)
                self.wal_log = await in_thread(_truncate_log, self.wal_log, start)
            self._start_ingest()
            if safekeepers:
                log.info("following safekeepers %s again", [s.node_id for s in safekeepers])
                await self.follow_safekeepers(safekeepers)
            elif target is not None:
                log.info("reattaching the WAL receiver to %s:%d", target.host, target.port)
                await self.attach(target)

    def _start_ingest(self) -> None:
        assert self._ingest_task is None, "ingest already running"
        self._caught_up = False
        self._ingest_task = asyncio.create_task(self._ingest_loop(), name="ingest")

    async def _stop_ingest(self) -> None:
        task, self._ingest_task = self._ingest_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # must not swallow our caller's cancellation
        flush_task, self._flush_task = self._flush_task, None
        if flush_task is not None:
            await asyncio.wait([flush_task])  # in_thread: the write finishes either way

    def _kick_flush(self) -> None:
        """Start writing frozen layers in the background, unless that is under way."""
        if self._flush_task is not None and not self._flush_task.done():
            return
        if self.timeline.frozen_layer_count():
            self._flush_task = asyncio.create_task(self._flush_frozen(), name="flush")

    async def _flush_frozen(self) -> None:
        with self._context():
            try:
                await in_thread(self.timeline.flush_frozen)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the layers stay in memory; the next batch retries
                log.exception("writing frozen layers failed; will retry")

    async def stop(self, *, flush: bool) -> None:
        """Stop receiving and ingesting; with `flush`, write the in-memory layers first."""
        with self._context():
            await self.detach(forget=False)
            await self._stop_ingest()
            if flush and self.timeline.broken_reason is None:
                await self.flush()
            if self.wal_log is not None:
                self.wal_log.close()
                self.wal_log = None

    async def flush(self) -> None:
        """Freeze and write the in-memory layers (never in the middle of a record: the
        ingest thread and this take turns)."""
        async with self._apply_lock:
            await in_thread(self.timeline.flush)

    # --- receiver --------------------------------------------------------------------
    async def attach(self, target: ReceiverTarget) -> None:
        """Stream from a running compute (replacing any previous receiver)."""
        assert self.wal_log is not None, "start() first"
        await self.detach(forget=False)
        if self.safekeepers:
            # From now on what the log holds counts as durable (development mode: the
            # compute's slot moves on with our flush LSN), so make the unsynced bytes so.
            await in_thread(self.wal_log.sync_all)
        self.safekeepers = ()  # development mode: the compute itself is the WAL source
        (self.dir / SAFEKEEPERS_FILE).unlink(missing_ok=True)
        self._save_target(target)
        self.target = target
        tl = self.timeline
        receiver = ChildWalReceiver(target.receiver_config(), self.wal_log,
                                    log_context=(str(tl.tenant_id), str(tl.timeline_id)),
                                    apply_lsn=lambda: tl.wal_durable_lsn,
                                    on_flush=lambda _lsn: self._wakeup.set())
        receiver.start()
        self.receiver = receiver
        log.info("attached WAL receiver to %s:%d slot %s at %s", target.host, target.port,
                 target.slot, self.wal_log.end_lsn)

    async def detach(self, *, forget: bool = True) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            await receiver.stop()
            log.info("stopped WAL receiver (log flushed to %s)", receiver.flush_lsn)
        if forget:
            self.target = None
            self.safekeepers = ()
            (self.dir / RECEIVER_FILE).unlink(missing_ok=True)
            (self.dir / SAFEKEEPERS_FILE).unlink(missing_ok=True)

    async def follow_safekeepers(self, safekeepers: tuple[SafekeeperEndpoint, ...]) -> None:
        """Take committed WAL from the safekeepers from now on (replacing any receiver)."""
        assert self.wal_log is not None, "start() first"
        if not safekeepers:
            raise UserError(f"timeline {self.timeline.timeline_id}: an empty safekeeper list")
        await self.detach(forget=True)
        write_atomic(self.dir / SAFEKEEPERS_FILE,
                     json.dumps([s.to_json() for s in safekeepers]).encode())
        self.safekeepers = safekeepers
        tl = self.timeline
        receiver = SafekeeperReceiver(tl.tenant_id, tl.timeline_id, safekeepers, self.wal_log,
                                      apply_lsn=lambda: tl.wal_durable_lsn,
                                      on_flush=lambda _lsn: self._wakeup.set())
        receiver.start()
        self.receiver = receiver
        log.info("following safekeepers %s from %s", [s.node_id for s in safekeepers],
                 self.wal_log.end_lsn)

    def _load_safekeepers(self) -> tuple[SafekeeperEndpoint, ...]:
        try:
            data = json.loads((self.dir / SAFEKEEPERS_FILE).read_text())
            return tuple(SafekeeperEndpoint.from_json(item) for item in data)
        except FileNotFoundError:
            return ()
        except (ValueError, TypeError, UserError) as err:
            log.warning("ignoring unreadable %s: %s", self.dir / SAFEKEEPERS_FILE, err)
            return ()

    def _save_target(self, target: ReceiverTarget) -> None:
        write_atomic(self.dir / RECEIVER_FILE, json.dumps(asdict(target)).encode())

    def _load_target(self) -> ReceiverTarget | None:
        try:
            data: dict[str, Any] = json.loads((self.dir / RECEIVER_FILE).read_text())
            return ReceiverTarget(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            log.warning("ignoring unreadable %s: %s", self.dir / RECEIVER_FILE, err)
            return None

    # --- compute start ------------------------------------------------------------------
    async def prepare_compute_start(self, timeout_s: float) -> tuple[Lsn, Lsn]:
        """Dev-mode sync: stop the receiver, ingest the whole log, cut a partial tail.

        Returns (lsn, prev_lsn) for the new compute's basebackup."""
        with self._context():
            if self.safekeepers:
                raise UserError(f"timeline {self.timeline.timeline_id} follows safekeepers: "
                                "run `python -m strata.compute.walproposer --sync` and start "
                                "the compute at the LSN it prints")
            await self.detach()
            self.timeline.check_not_broken(self.ingest_error)
            await self.wait_caught_up(timeout_s)
            self.timeline.check_not_broken(self.ingest_error)
            assert self.wal_log is not None
            last = self.timeline.last_record_lsn
            if self.wal_log.end_lsn > last:
                # A record the old compute did not finish sending (it crashed, or was
                # stopped with immediate): the new compute writes its own record here.
                await self._stop_ingest()
                log.info("truncating partial record %s..%s off the WAL log", last,
                         self.wal_log.end_lsn)
                self.wal_log = await in_thread(_truncate_log, self.wal_log, last)
                self._start_ingest()
            assert self.wal_log.end_lsn == last, (self.wal_log.end_lsn, last)
            return last, self.timeline.prev_record_lsn

    async def wait_caught_up(self, timeout_s: float) -> None:
        """Wait until every record wholly in the flushed log has been applied."""
        assert self.wal_log is not None
        target = self.wal_log.flush_lsn.value
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s), self._progress:
                await self._progress.wait_for(
                    lambda: (self._caught_up and self._fed >= target)
                    or self.ingest_error is not None or self.timeline.broken_reason is not None)
        except TimeoutError as err:
            raise Unavailable(f"ingest of timeline {self.timeline.timeline_id} did not reach "
                              f"the log's end {Lsn(target)} in {timeout_s}s (at "
                              f"{self.timeline.last_record_lsn})") from err

    # --- ingest ---------------------------------------------------------------------------
    async def _ingest_loop(self) -> None:
        with self._context():
            try:
                await self._ingest()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure stops ingest, loudly
                # The WAL could not be applied exactly; serving pages from here on
                # could be wrong, so reads refuse with the reason (D2).
                if not isinstance(err, StrataError):
                    log.exception("ingest failed at %s", self.timeline.last_record_lsn)
                self.ingest_error = f"ingest stopped at {self.timeline.last_record_lsn}: {err}"
                if self.timeline.broken_reason is None:
                    self.timeline.mark_broken(self.ingest_error)
                else:
                    log.info("ingest stopped: %s", err)
            finally:
                async with self._progress:
                    self._progress.notify_all()

    async def _ingest(self) -> None:
        assert self.wal_log is not None
        wal_log = self.wal_log
        timeline = self.timeline
        start = timeline.last_record_lsn
        decoder = WalStreamDecoder(start, wal_log.seg_size, at_record_start=True)
        applier = self._make_applier(timeline)
        self._fed = start.value
        last_flush = time.monotonic()
        log.info("ingest starts at %s (log %s..%s)", start, wal_log.start_lsn, wal_log.end_lsn)
        while True:
            if timeline.broken_reason is not None:
                log.info("ingest stops: timeline is broken")
                return
            flush = wal_log.flush_lsn.value
            if self._fed < flush:
                # Read and applied on the loop's thread, in steps of at most 64 KB with a
                # yield to the loop between them: worker-thread hops (and the interpreter
                # lock going back and forth) cost more than such a step. In a worker
                # thread, in batches of `batch_bytes`, when frozen layers wait (a record
                # could then write one inline) or a test slows ingest down.
                inline = (timeline.frozen_layer_count() == 0
                          and not failpoint_armed("ingest-apply-record"))
                if inline:
                    end = min(flush, self._fed + min(_INLINE_BATCH_BYTES,
                                                     timeline.conf.checkpoint_distance // 2))
                else:
                    end = min(flush, self._fed + self._batch_bytes)
                if inline:
                    data = wal_log.read(Lsn(self._fed), Lsn(end))
                else:
                    data = await in_thread(wal_log.read, Lsn(self._fed), Lsn(end))
                decoder.feed(data)
                self._caught_up = False  # until these bytes have been applied
                self._fed = end
                dcl = timeline.disk_consistent_lsn
                async with self._apply_lock:
                    if inline:
                        _apply_all(decoder, applier, timeline)
                    else:
                        await in_thread(_apply_all, decoder, applier, timeline)
                self._kick_flush()
                if timeline.disk_consistent_lsn.segno(wal_log.seg_size) > dcl.segno(
                        wal_log.seg_size):
                    # Segments wholly below disk_consistent_lsn are never read again.
                    await in_thread(wal_log.remove_below, timeline.disk_consistent_lsn)
                if self._fed >= wal_log.flush_lsn.value:
                    self._caught_up = True
                async with self._progress:
                    self._progress.notify_all()
                if inline and not self._caught_up:
                    await asyncio.sleep(0)  # let the loop serve between inline steps
                continue
            self._caught_up = True
            async with self._progress:
                self._progress.notify_all()
            # Quiet: flush the open layer once it is old enough (D4's checkpoint_timeout).
            now = time.monotonic()
            if (timeline.last_record_lsn > timeline.disk_consistent_lsn
                    and now - last_flush >= timeline.conf.checkpoint_timeout_s):
                await self.flush()
                last_flush = now
                await in_thread(wal_log.remove_below, timeline.disk_consistent_lsn)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_IDLE_CHECK_S):
                    await self._wakeup.wait()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread; if we are cancelled meanwhile, wait for the thread
    to finish before the cancellation goes on (its writes must not overlap what the
    canceller does next, such as a flush or closing the log)."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _apply_all(decoder: WalStreamDecoder, applier: RecordApplier, timeline: Timeline) -> None:
    """Apply every complete record the decoder holds (in a worker thread)."""
    last = timeline.last_record_end
    for record in decoder:
        if record.end_lsn <= last:
            continue  # cannot happen when starting at last_record_lsn; kept for safety
        failpoint("ingest-apply-record")  # tests slow ingest down here (backpressure)
        applier.ingest(record)
        if timeline.broken_reason is not None:
            return
        assert timeline.last_record_end == record.end_lsn, \
            (timeline.last_record_lsn, Lsn(record.end_lsn))
        last = record.end_lsn


def _truncate_log(wal_log: WalLog, lsn: Lsn) -> WalLog:
    """Cut the log back to end at `lsn` (closing and reopening it; WalLog only appends)."""
    directory = wal_log.directory
    seg_size = wal_log.seg_size
    assert lsn >= wal_log.start_lsn, (lsn, wal_log.start_lsn)
    end_segno = (wal_log.end_lsn.value - 1) // seg_size
    keep_segno, offset = divmod(lsn.value, seg_size)
    wal_log.close()
    for segno in range(end_segno, keep_segno, -1):  # from the top, so no holes appear
        wal_log.segment_path(segno).unlink(missing_ok=True)
    path = wal_log.segment_path(keep_segno)
    if path.exists():
        with open(path, "r+b") as f:
            f.truncate(offset)
            os.fsync(f.fileno())
    fsync_dir(directory)
    reopened = WalLog.open(directory)
    assert reopened.end_lsn == lsn, (reopened.end_lsn, lsn)
    return reopened

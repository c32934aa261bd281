"""`Timeline`: one timeline on a safekeeper: the `Acceptor` driven durably against its files.

The driver contract is docs/safekeeper-protocol.md ("What the safekeeper must do"): the
actions of one `Acceptor.handle()` run in order, each finished before the next starts;
`PersistControl` writes the control file (temp, fsync, rename, fsync dir) and
`FlushWal`/`TruncateWal` fsync before any later reply, so every reply vouches only for
durable state. That I/O runs on the event loop's thread with nothing awaited in between,
so a cancelled connection cannot interrupt a message halfway (the in-memory acceptor
would otherwise be ahead of the disk). One lock (`StepLock`, FIFO) orders messages from all
connections, the batches of pulled WAL and the WAL reads of walsenders; pull mode takes it
synchronously when it is free (`try_apply_pulled`).

Restart (`Timeline.open`): load the control file, check that all the WAL held is valid
(records decoded with CRCs) up to the durable commit LSN, give the WAL from the scan point
to a new `Acceptor` (`recover_wal`, which finds where the valid WAL ends) and cut the files
there. A damaged control file, or damaged WAL below the durable commit LSN,
raises `CorruptionError`: the server then refuses this timeline and serves the others.

Also here: the walsender's view (the commit LSN, waiting for it to move) and the
pageserver's feedback, which decides which segments can be removed: only below what the
pageserver reported as durable (`apply`, its disk-consistent LSN), below the durable scan
point (so that a restart can still re-read from there) and below every active walsender,
keeping `wal_keep_bytes` more for peers that may still need to recover from us.

Deletion (`mark_deleted`, then `remove_timeline_dir`): the timeline refuses everything from
then on with `NotFound` and `gone` wakes the connections serving it; the directory is
renamed to `<timeline>.___deleted` in its tenant directory and the tenant directory fsynced
(from here on a crash can never load it as a timeline), then removed. A restart removes
what a crash left of such a directory (`remove_leftover`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from strata.common.durable import TEMP_SUFFIX, fsync_dir
from strata.common.errors import CorruptionError, NotFound, ProtocolError, Unavailable
from strata.common.failpoint import failpoint
from strata.common.lsn import Lsn
from strata.common.steplock import StepLock
from strata.remote.timeline_client import latest_index
from strata.safekeeper import control_file, wal_backup
from strata.safekeeper.acceptor import (
    Acceptor,
    AcceptorAction,
    AcceptorState,
    ClosePull,
    FlushWal,
    PersistControl,
    PullFeedback,
    SendWal,
    StartPull,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AppendResponse,
    ProposerGreeting,
    ProposerMessage,
    PullFrom,
    ReadWalResponse,
    VoteResponse,
    encode,
)
from strata.safekeeper.pull import WalPuller
from strata.safekeeper.wal_storage import WalStorage

if TYPE_CHECKING:
    from strata.remote.storage import RemoteStorage

log = logging.getLogger(__name__)
INDEX_READ_INTERVAL_S = 10.0  # how often read_pageserver_index may read the index
# Pull mode: the AppendResponse to the proposer after pulled WAL goes at most this often
# (with the latest position). The proposer only uses it for the commit LSN it sends back
# at its tick (50 ms), so one per fsync batch of each of three safekeepers (hundreds a
# second under load, each a wake-up and a decode in the sidecar) bought nothing.
PULL_ANSWER_INTERVAL_S = 0.02

T = TypeVar("T")
ReplyTo = Callable[[bytes], None]
"""Sends one encoded message on a proposer connection at once, without waiting."""

DELETED_SUFFIX = ".___deleted"  # a timeline directory being deleted; never loaded


def directory_bytes(directory: Path) -> int:
    """The bytes of the regular files under `directory` (what deleting it frees)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def remove_timeline_dir(directory: Path) -> bool:
    """Delete a timeline directory so that a crash at any point leaves either the whole
    timeline or nothing that loads: rename it to `<name>.___deleted` in the same tenant
    directory, fsync that directory, then remove it. False if it did not exist.

    Failpoint `sk-delete-before-rmtree` (after the durable rename)."""
    doomed = directory.with_name(directory.name + DELETED_SUFFIX)
    if doomed.exists():
        shutil.rmtree(doomed)  # what an earlier failed deletion left
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:
        return False
    fsync_dir(directory.parent)
    failpoint("sk-delete-before-rmtree")
    shutil.rmtree(doomed)
    return True


def remove_leftover(path: Path) -> bool:
    """At start: remove `path` if it is what a crashed creation (`.___temp`) or deletion
    (`.___deleted`) left in a tenant directory; True if it was one."""
    if not path.name.endswith((DELETED_SUFFIX, TEMP_SUFFIX)):
        return False
    log.info("removing %s, left by a %s that did not finish", path,
             "deletion" if path.name.endswith(DELETED_SUFFIX) else "creation")
    shutil.rmtree(path)
    return True


@dataclass(slots=True)
class Peer:
    """A connection using this timeline: a proposer stream or a walsender."""

    kind: str  # "proposer" or "walsender"
    address: str
    application_name: str
    connected_at: float = field(default_factory=time.time)
    proposer_id: int = 0
    sent_lsn: Lsn = Lsn(0)  # walsender: next byte to send
    write_lsn: Lsn = Lsn(0)  # walsender feedback: received, fsynced, applied
    flush_lsn: Lsn = Lsn(0)
    apply_lsn: Lsn = Lsn(0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "address": self.address,
                               "application_name": self.application_name,
                               "connected_at": self.connected_at}
        if self.kind == "proposer":
            out["proposer_id"] = self.proposer_id
        else:
            out.update(sent_lsn=str(self.sent_lsn), write_lsn=str(self.write_lsn),
                       flush_lsn=str(self.flush_lsn), apply_lsn=str(self.apply_lsn))
        return out


@dataclass(slots=True)
class TimelineCounters:
    """Monotonic counters for /metrics."""

    wal_written_bytes: int = 0
    wal_fsyncs: int = 0
    wal_fsync_seconds: float = 0.0
    control_writes: int = 0
    control_write_seconds: float = 0.0
    batches: int = 0  # handle_batch calls (proposer messages handled together)
    truncations: int = 0
    segments_removed: int = 0
    segments_uploaded: int = 0
    segments_downloaded: int = 0
    wal_sent_bytes: int = 0
    messages: int = 0
    pull_batches: int = 0  # batches of pulled WAL applied (one fsync each at most)
    pull_bytes: int = 0  # pulled WAL received (what was new of it is in wal_written_bytes)


def _send(reply_to: ReplyTo, payload: bytes) -> None:
    try:
        reply_to(payload)
    except ConnectionError as err:
        log.info("a proposer connection is gone: %s", err)


_REPLY_TYPES = (AcceptorGreeting, VoteResponse, AppendResponse, ReadWalResponse)


def _is_reply(action: AcceptorAction) -> bool:
    return isinstance(action, _REPLY_TYPES)


class Timeline:
    """One timeline's acceptor, control file and WAL on this safekeeper."""

    def __init__(self, directory: Path, state: AcceptorState, wal: WalStorage, *,
                 wal_keep_bytes: int) -> None:
        self.directory = directory
        self.state = state  # as durable on disk
        self.wal = wal
        self.wal_keep_bytes = wal_keep_bytes
        self.acceptor = self._recover()
        self.lock = StepLock()  # try_acquire: pull mode's fast path (pull.py)
        self._reloading: asyncio.Future[None] | None = None  # try_apply_pulled's reload
        self.broken: str | None = None  # an I/O failure: refuse everything from now on
        self.deleted: str | None = None  # deleted: refuse everything with this NotFound
        self.gone = asyncio.Event()  # set once deleted: the connections serving it end
        self.handlers: set[asyncio.Task[None]] = set()  # the connections' work (server.py)
        self.peers: dict[int, Peer] = {}
        self.pageserver_feedback: Peer | None = None  # the highest feedback received
        # The pageserver's durable LSN read from its index in object storage (for a
        # safekeeper it does not stream from: read_pageserver_index).
        self.pageserver_index_lsn = Lsn(0)
        self._index_read_at: float | None = None
        self.counters = TimelineCounters()
        self._commit_moved = asyncio.Event()
        self._flush_pending = False  # a FlushWal deferred within a batch (under the lock)
        self.remote: RemoteStorage | None = None  # object storage for WAL offload (server.py)
        self.backup_lock = asyncio.Lock()  # one upload pass at a time; deletion waits on it
        self._downloaded: tuple[int, bytes] | None = None  # the last segment downloaded
        # Pull mode (pull.py): the replication client of the acceptor's pull source.
        self.pull_user = "postgres"  # the role it connects to the compute as (server.py)
        self.pull_answer_interval_s = PULL_ANSWER_INTERVAL_S  # (server.py)
        self.puller: WalPuller | None = None
        self._reply_to: ReplyTo | None = None  # the proposer connection of this batch
        self._pull_feedback: Lsn | None = None  # a PullFeedback deferred to the batch's end
        self._fence_notice: ReplyTo | None = None  # the closed pull's proposer connection

    # --- creation and restart -----------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, state: AcceptorState, *, wal_keep_bytes: int) -> Timeline:
        """Create the timeline directory with its first control file, atomically."""
        if directory.exists():
            raise FileExistsError(directory)
        temp = directory.with_name(directory.name + TEMP_SUFFIX)
        if temp.exists():
            shutil.rmtree(temp)  # a creation that crashed halfway
        temp.mkdir(parents=True)
        control_file.store(temp, state)
        os.replace(temp, directory)
        fsync_dir(directory.parent)
        fsync_dir(directory.parent.parent)  # the tenant directory may be new too
        log.info("created timeline %s/%s at %s (previous record %s, system %d)",
                 state.tenant_id, state.timeline_id, state.timeline_start_lsn,
                 state.timeline_start_prev_lsn, state.system_id)
        timeline = cls.open(directory, wal_keep_bytes=wal_keep_bytes)
        try:
            # Its first WAL segment too, zero-filled here (the server runs this in a worker
            # thread) rather than by the first write on the event loop. A crash before it
            # leaves a timeline without it, which the first write then creates.
            timeline.wal.create_end_segment()
        except BaseException:
            timeline.close()
            raise
        return timeline

    @classmethod
    def open(cls, directory: Path, *, wal_keep_bytes: int) -> Timeline:
        """Load a timeline after a (re)start; `CorruptionError` if it must not be served."""
        state = control_file.load(directory)
        wal = WalStorage(directory, state.wal_seg_size, state.timeline_start_lsn)
        try:
            return cls(directory, state, wal, wal_keep_bytes=wal_keep_bytes)
        except BaseException:
            wal.close()
            raise

    def _recover(self) -> Acceptor:
        """A fresh acceptor from the durable state and the valid WAL after its scan point.

        The end of the WAL comes from decoding the files, never from their size (the
        segments are preallocated: zeros follow the WAL) nor from the control file, which
        holds no flush position: the durable commit LSN is only a floor (valid WAL ending
        below it is corruption). The files are then cut at the end found, which zeroes
        whatever a crash left after it in its segment (wal_storage.py)."""
        state = self.state
        # All the WAL held must be valid up to the durable commit LSN (CorruptionError if not).
        valid_end = self.wal.find_valid_end(state.commit_lsn, state.system_id)
        acceptor = Acceptor(state, allow_pull=True)
        end = acceptor.recover_wal(self.wal.read(state.scan_lsn, valid_end))
        if end < state.commit_lsn:
            # Only a record's zero padding can cut it there: garbage in committed WAL.
            raise CorruptionError(f"WAL ends at {end}, below the durable commit LSN "
                                  f"{state.commit_lsn} (a record's padding is damaged); this "
                                  "safekeeper must not serve the timeline (restore it from a "
                                  "peer)", path=str(self.directory))
        cut = self.wal.truncate(end)
        if cut.zeroed_bytes or cut.segments_removed:
            log.info("cutting %d bytes of torn WAL after %s (zeroed) and %d later segment "
                     "files", cut.zeroed_bytes, end, cut.segments_removed)
        acceptor.check_invariants()
        log.info("timeline %s: term %d, WAL %s..%s, last record end %s, commit %s",
                 state.timeline_id, state.term, self.wal.wal_start_lsn, acceptor.flush_lsn,
                 acceptor.last_record_end, state.commit_lsn)
        return acceptor

    def close(self) -> None:
        self.stop_pull()
        self.wal.close()

    def stop_pull(self) -> None:
        """Close the pull stream, if any (synchronous; see pull.py)."""
        if self.puller is not None:
            self.puller.close()
            self.puller = None

    # --- the proposer protocol ------------------------------------------------------------
    def check_usable(self) -> None:
        if self.deleted is not None:
            raise NotFound(self.deleted)
        if self.broken is not None:
            raise Unavailable(f"timeline {self.state.timeline_id} is out of service on this "
                              f"safekeeper after an I/O failure: {self.broken}; restart the "
                              "safekeeper")

    async def handle(self, msg: ProposerMessage, reply_to: ReplyTo | None = None) -> list[bytes]:
        """Apply one proposer message durably; the encoded replies to send, in order."""
        return await self.handle_batch([msg], reply_to)

    async def handle_batch(self, msgs: Sequence[ProposerMessage],
                           reply_to: ReplyTo | None = None) -> list[bytes]:
        """Apply proposer messages (in order, from one connection) durably; the encoded
        replies to send, in order, all of them vouching only for durable state.

        `reply_to` sends on that connection outside of the replies: the pull feedback of a
        pull that a `PullFrom` of this batch started (or repeated) goes there. A higher
        term's promise that closed a pull sends, after the batch, an `AppendResponse` with
        the new term to the closed pull's proposer connection (so the old proposer learns
        at once that it is fenced).

        The WAL of consecutive appends is fsynced once: a `FlushWal` is deferred past later
        `WriteWal`s (the replies wait for the batch's end), but never past any other action.

        The file I/O of messages (WAL writes and fsyncs, control-file writes, truncation)
        runs on the event loop's thread: a commit then costs no hand-off to a worker thread
        and back (two wake-ups on a small machine, docs/walproposer.md), and once the lock
        is taken nothing here awaits, so a cancelled caller can never leave the in-memory
        acceptor ahead of the disk. Only reloading after a protocol error (a scan of the WAL)
        runs in a thread, and holds the lock until it is done."""
        self.check_usable()
        async with self.lock:
            self.check_usable()
            self.counters.batches += 1
            commit_before = self.acceptor.commit_lsn
            replies: list[bytes] = []
            self._flush_pending = False
            self._reply_to = reply_to
            self._fence_notice = self._pull_feedback = None
            try:
                for msg in msgs:
                    self.counters.messages += 1
                    try:
                        actions = self.acceptor.handle(msg)
                    except ProtocolError:
                        self._flush_deferred()
                        if not isinstance(msg, ProposerGreeting):  # a greeting is only checked
                            await self._reload()
                        raise
                    self._apply(actions, replies)
                    if isinstance(msg, PullFrom) and self.puller is not None and \
                            self.acceptor.pull_source == self.puller.source:
                        self.puller.reply_to = reply_to  # a repeat: feedback goes here now
                self._flush_deferred()
                notice = self._fence_notice
                if notice is not None and notice is not reply_to:
                    # After the promise is durable: the old proposer is fenced.
                    _send(notice, encode(self.acceptor.append_response()))
                if self._pull_feedback is not None and self.puller is not None:
                    self.puller.send_status(self._pull_feedback)  # a PullLimit released it
            finally:
                self._reply_to = self._fence_notice = self._pull_feedback = None
                if self.acceptor.commit_lsn != commit_before:
                    self._notify_commit()
            return replies

    async def apply_pulled(self, puller: WalPuller, pieces: Sequence[tuple[Lsn, bytes]], *,
                           reply_requested: bool = False) -> None:
        """Pull mode: a batch of the WAL `puller` received, applied durably (one fsync and
        one write: the batch's pieces are contiguous), then one standby status update to
        the compute in this same step under the lock (so a ClosePull of another
        connection's message comes before or after all of it), and an `AppendResponse` to
        the proposer connection of the pull: at once if none went in the last
        `pull_answer_interval_s`, else once that interval is over, with the position then
        (`_answer_pull`). Nothing at all once `puller` was closed."""
        self.check_usable()
        async with self.lock:
            try:
                self._apply_pulled_locked(puller, pieces, reply_requested)
            except ProtocolError:
                await self._reload()  # the acceptor forgot its pull: stop it
                raise

    def try_apply_pulled(self, puller: WalPuller, pieces: Sequence[tuple[Lsn, bytes]], *,
                         reply_requested: bool = False) -> bool:
        """`apply_pulled` without waiting: done now (True) if nobody holds or waits for the
        lock, else nothing (False: the caller awaits `apply_pulled`). Pull mode's fast path
        (pull.py): a batch applied from the replication connection's data callback, with
        no coroutine hop. A refused batch (ProtocolError) leaves the lock held by a task
        that reloads the acceptor from disk, as `apply_pulled` does before it raises."""
        self.check_usable()
        if not self.lock.try_acquire():
            return False
        release = True
        try:
            self._apply_pulled_locked(puller, pieces, reply_requested)
        except ProtocolError:
            release = False  # the reload task has the lock now
            self._reloading = asyncio.ensure_future(self._reload_and_release())
            raise
        finally:
            if release:
                self.lock.release()
        return True

    async def _reload_and_release(self) -> None:
        try:
            await self._reload()
        except (Unavailable, asyncio.CancelledError) as err:
            log.error("reloading timeline %s after refused pulled WAL: %s",
                      self.state.timeline_id, err)
        finally:
            self.lock.release()

    def _apply_pulled_locked(self, puller: WalPuller, pieces: Sequence[tuple[Lsn, bytes]],
                             reply_requested: bool) -> None:
        """`apply_pulled`'s step, under the lock, with nothing awaited. A ProtocolError
        (refused WAL) is raised after the deferred flush: the caller reloads."""
        if puller.closed or self.puller is not puller:
            return
        self.check_usable()
        counters = self.counters
        counters.pull_batches += 1
        if len(pieces) > 1:
            pieces = [(pieces[0][0], b"".join([data for _, data in pieces]))]
        term = puller.source.term
        acceptor = self.acceptor
        flush_before = acceptor.flush_lsn
        replies: list[bytes] = []
        self._flush_pending = False
        self._pull_feedback = None
        try:
            for begin, data in pieces:
                counters.pull_bytes += len(data)
                try:
                    actions = acceptor.pulled_wal(term, begin, data)
                except ProtocolError as err:
                    self._flush_deferred()
                    log.error("pulled WAL refused, pull stopped: %s", err)
                    raise
                self._apply(actions, replies)
            self._flush_deferred()
        finally:
            feedback, self._pull_feedback = self._pull_feedback, None
        assert not replies, replies
        if feedback is None and reply_requested:
            feedback = acceptor.pull_report()  # nothing new: say where we are
        if feedback is not None and (reply_requested or puller.reported_lsn is None or
                                     feedback > puller.reported_lsn):
            puller.send_status(feedback)  # unless held at the PullLimit already
        if puller.answer_timer is None and acceptor.flush_lsn > flush_before:
            wait = puller.answered_s + self.pull_answer_interval_s - time.monotonic()
            if wait <= 0:
                self._answer_pull(puller)
            else:  # the answer then carries this batch's position and any later one's
                puller.answer_timer = asyncio.get_running_loop().call_later(
                    wait, self._answer_pull, puller)

    def _answer_pull(self, puller: WalPuller) -> None:
        """The pull's `AppendResponse` (the acceptor's durable position) to the proposer
        connection that sent the `PullFrom`, unless the pull was closed meanwhile (the
        ClosePull before a higher term's promise cancels the timer too). Runs on the event
        loop outside of any locked step: nothing under the lock awaits between applying
        WAL and its fsync, so the position it sends is durable."""
        puller.answer_timer = None
        if puller.closed or self.puller is not puller or puller.reply_to is None:
            return
        puller.answered_s = time.monotonic()
        _send(puller.reply_to, encode(self.acceptor.append_response()))

    def forget_connection(self, reply_to: ReplyTo) -> None:
        """A proposer connection ended: no more pull feedback goes to it."""
        if self.puller is not None and self.puller.reply_to is reply_to:
            self.puller.reply_to = None

    async def _reload(self) -> None:
        """The message may be half applied in memory, never on disk: start over from disk
        (in a thread; the caller keeps the lock until it is done, even if cancelled)."""
        self.stop_pull()  # the new acceptor does not pull (the proposer sends PullFrom again)
        work = asyncio.ensure_future(asyncio.to_thread(self._recover))
        try:
            try:
                self.acceptor = await asyncio.shield(work)
            except asyncio.CancelledError:
                self.acceptor = await work
                raise
        except CorruptionError as err:
            self._break(err)
        except OSError as err:
            self._break(err)
            raise Unavailable(f"timeline {self.state.timeline_id}: {err}") from err

    def _flush_deferred(self) -> None:
        if self._flush_pending:
            t0 = time.perf_counter()
            self._guard(self.wal.flush)
            self.counters.wal_fsync_seconds += time.perf_counter() - t0
            self.counters.wal_fsyncs += 1
            self._flush_pending = False

    def _apply(self, actions: list[AcceptorAction], replies: list[bytes]) -> None:
        for action in actions:
            # The three actions of every batch of WAL first (pull mode: once per batch
            # each), each with one isinstance instead of the match's chain of class
            # patterns. None of them flushes what an earlier action left pending.
            if isinstance(action, WriteWal):
                self._guard(self.wal.write, action.lsn, action.data)  # page cache: quick
                self.counters.wal_written_bytes += len(action.data)
                continue
            if isinstance(action, FlushWal):
                self._flush_pending = True  # done before the next other action or reply
                continue
            if isinstance(action, PullFeedback):
                self._pull_feedback = action.flush_lsn  # sent once the batch is durable
                continue
            if not _is_reply(action):
                self._flush_deferred()  # durable before anything that builds on it
            match action:
                case PersistControl(state=state):
                    t0 = time.perf_counter()
                    self._guard(control_file.store, self.directory, state)
                    self.counters.control_write_seconds += time.perf_counter() - t0
                    self.state = state
                    self.counters.control_writes += 1
                case TruncateWal(lsn=lsn):
                    log.info("truncating WAL at %s for a new term (it ended at %s)", lsn,
                             self.wal.end_lsn)
                    self._guard(self.wal.truncate, lsn)
                    self.counters.truncations += 1
                case SendWal(term=term, start_lsn=start, end_lsn=end):
                    try:
                        data = self.wal.read(start, end)
                    except NotFound as err:
                        raise ProtocolError(f"cannot send WAL [{start}, {end}) for term "
                                            f"{term}: {err}") from err
                    replies.append(encode(ReadWalResponse(term, start, data)))
                case StartPull(source=source, start_lsn=start):
                    self.stop_pull()  # none in practice: a ClosePull came first
                    log.info("pulling WAL of term %d from %s:%d slot %s from %s", source.term,
                             source.host, source.port, source.slot_name, start)
                    self.puller = WalPuller(self, source, user=self.pull_user)
                    self.puller.reply_to = self._reply_to
                case ClosePull(term=term):
                    # Before the promise that follows: no acknowledgement of `term` after it.
                    if self.puller is not None:
                        assert self.puller.source.term == term, (self.puller.source, term)
                        self._fence_notice = self.puller.reply_to
                        self.stop_pull()
                case _:
                    replies.append(encode(action))  # sent after the batch's last flush

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run file I/O. An I/O error takes the timeline out of service: after a failed
        fsync the page cache can no longer be trusted."""
        try:
            return fn(*args)
        except OSError as err:
            self._break(err)
            raise Unavailable(f"timeline {self.state.timeline_id}: {err}") from err

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file I/O off the event loop. An I/O error takes the timeline out of
        service: after a failed fsync the page cache can no longer be trusted."""
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as err:
            self._break(err)
            raise Unavailable(f"timeline {self.state.timeline_id}: {err}") from err

    def mark_deleted(self, reason: str) -> None:
        """Refuse everything from now on with NotFound(`reason`); wake whoever waits."""
        assert self.deleted is None, f"timeline {self.state.timeline_id} deleted twice"
        self.deleted = reason
        self.stop_pull()
        self.gone.set()
        self._notify_commit()

    def _break(self, err: BaseException) -> None:
        if self.broken is None:
            log.error("timeline %s out of service: %s", self.state.timeline_id, err)
            self.broken = str(err)
        self.stop_pull()
        self._notify_commit()

    # --- the walsender ----------------------------------------------------------------------
    @property
    def commit_lsn(self) -> Lsn:
        """The highest LSN known committed (on a majority, in the current term's log), which
        is in this safekeeper's durable WAL: what walsenders may serve."""
        return self.acceptor.commit_lsn

    def _notify_commit(self) -> None:
        self._commit_moved.set()
        self._commit_moved = asyncio.Event()

    async def wait_commit_above(self, lsn: Lsn, timeout_s: float) -> None:
        """Return once the commit LSN is above `lsn`, or after `timeout_s`."""
        if self.commit_lsn > lsn or self.broken is not None or self.deleted is not None:
            return
        event = self._commit_moved
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass

    async def read_committed(self, start: Lsn, max_bytes: int) -> bytes:
        """Committed WAL from `start` (at most `max_bytes`); empty if none is new."""
        self.check_usable()
        async with self.lock:
            self.check_usable()  # it may have been deleted (its files closed) meanwhile
            end = min(self.commit_lsn, start + max_bytes)
            if end <= start:
                return b""
            local = self.remote is None or start >= self.wal.wal_start_lsn
            if local:
                data = self.wal.read(start, end)
        if not local:
            data = await self._read_remote(start, end)
        self.counters.wal_sent_bytes += len(data)
        return data

    def on_feedback(self, peer: Peer) -> None:
        """A walsender got a status update (its fields are already in `peer`)."""
        best = self.pageserver_feedback
        if best is None or peer.apply_lsn > best.apply_lsn:
            self.pageserver_feedback = Peer(peer.kind, peer.address, peer.application_name,
                                            peer.connected_at, 0, peer.sent_lsn,
                                            peer.write_lsn, peer.flush_lsn, peer.apply_lsn)

    def pageserver_lsn(self) -> Lsn | None:
        """What the pageserver made durable, as far as this safekeeper knows: its feedback
        here, or its index in object storage (None: neither yet)."""
        feedback = self.pageserver_feedback
        known = [lsn for lsn in (None if feedback is None else feedback.apply_lsn,
                                 self.pageserver_index_lsn) if lsn is not None and lsn.value]
        return max(known, default=None)

    def removal_horizon(self) -> Lsn:
        """WAL below this may be removed (see the module docstring and wal_backup.py)."""
        return wal_backup.removal_horizon(
            self.pageserver_lsn(), self.state.scan_lsn,
            [p.sent_lsn for p in self.peers.values() if p.kind == "walsender"],
            self.wal_keep_bytes, None if self.remote is None else self.state.backup_lsn)

    async def read_pageserver_index(self) -> None:
        """Learn the pageserver's durable LSN from object storage when its feedback here
        does not cover the uploaded WAL (it streams from another safekeeper, which alone
        hears its feedback): the disk_consistent_lsn of the timeline's index of the highest
        generation, where every later attachment resumes (wal_backup.py). At most once per
        `INDEX_READ_INTERVAL_S`, and only while that could let a segment go."""
        remote = self.remote
        seg = self.state.wal_seg_size
        known = max(self.pageserver_lsn() or Lsn(0), self.wal.wal_start_lsn)
        if remote is None or self.state.backup_lsn.value // seg <= known.value // seg:
            return
        now = time.monotonic()
        if self._index_read_at is not None and now - self._index_read_at < INDEX_READ_INTERVAL_S:
            return
        self._index_read_at = now
        index = await asyncio.to_thread(latest_index, remote, self.state.tenant_id,
                                        self.state.timeline_id)
        if index is not None and index.disk_consistent_lsn > self.pageserver_index_lsn:
            self.pageserver_index_lsn = index.disk_consistent_lsn
            log.info("the pageserver's index (generation %d) is durable up to %s",
                     index.generation, index.disk_consistent_lsn)

    async def remove_old_wal(self) -> int:
        """Delete the segments below the removal horizon; how many were removed."""
        if self.broken is None and self.deleted is None:
            await self.read_pageserver_index()
        horizon = self.removal_horizon()
        if horizon.value // self.state.wal_seg_size <= self.wal.wal_start_lsn.value // \
                self.state.wal_seg_size or self.broken is not None or self.deleted is not None:
            return 0
        async with self.lock:
            if self.deleted is not None:
                return 0
            removed = await self._in_thread(self.wal.remove_below, horizon)
        if removed:
            self.counters.segments_removed += removed
            log.info("removed %d WAL segments below %s; WAL now starts at %s", removed,
                     horizon, self.wal.wal_start_lsn)
        return removed

    # --- WAL offload (wal_backup.py) ----------------------------------------------------
    async def backup_wal(self) -> int:
        """Upload the complete committed segments not uploaded yet, in order, moving
        `backup_lsn` (durably) after each; how many this safekeeper uploaded (a segment
        another safekeeper uploaded already is skipped)."""
        remote = self.remote
        assert remote is not None
        async with self.backup_lock:
            s = self.state
            seg = s.wal_seg_size
            # Segments removed before object storage was configured cannot be uploaded.
            todo = wal_backup.segments_to_upload(max(s.backup_lsn, self.wal.wal_start_lsn),
                                                 self.commit_lsn, s.timeline_start_lsn, seg)
            if not todo or self.broken is not None or self.deleted is not None:
                return 0
            prefix = wal_backup.timeline_prefix(s.tenant_id, s.timeline_id)
            present = set(await asyncio.to_thread(remote.list_keys, prefix))
            uploaded = 0
            for segno in todo:
                if self.broken is not None or self.deleted is not None:
                    break
                key = wal_backup.segment_key(s.tenant_id, s.timeline_id, segno, seg)
                if key not in present:
                    data = await asyncio.to_thread(self._read_segment_file, segno)
                    await asyncio.to_thread(remote.put, key, data)
                    uploaded += 1
                    self.counters.segments_uploaded += 1
                await self._set_backup_lsn(wal_backup.backup_lsn_after(segno, seg))
        if uploaded:
            log.info("uploaded %d WAL segments; backup_lsn now %s", uploaded,
                     self.state.backup_lsn)
        return uploaded

    def _read_segment_file(self, segno: int) -> bytes:
        """A whole segment file, read through a descriptor of its own (off the loop)."""
        path = self.wal.segment_path(segno)
        with open(path, "rb") as f:
            data = f.read(self.state.wal_seg_size + 1)
        if len(data) != self.state.wal_seg_size:
            raise CorruptionError(f"WAL segment is {len(data)} bytes, not the segment size "
                                  f"{self.state.wal_seg_size}; it cannot be uploaded",
                                  path=str(path))
        return data

    async def _set_backup_lsn(self, lsn: Lsn) -> None:
        async with self.lock:
            if self.deleted is not None or lsn <= self.state.backup_lsn:
                return
            state = replace(self.state, backup_lsn=lsn)
            self._guard(control_file.store, self.directory, state)
            self.counters.control_writes += 1
            self.state = state
            # The acceptor's next PersistControl must carry the new position along.
            self.acceptor.state = replace(self.acceptor.state, backup_lsn=lsn)

    async def _read_remote(self, start: Lsn, end: Lsn) -> bytes:
        """Committed WAL from `start` (up to `end`, at most to its segment's end) that this
        safekeeper removed locally: from the segment's object (CRC-checked by `get`)."""
        assert self.remote is not None
        s = self.state
        seg = s.wal_seg_size
        segno = start.value // seg
        cached = self._downloaded
        if cached is None or cached[0] != segno:
            key = wal_backup.segment_key(s.tenant_id, s.timeline_id, segno, seg)
            try:
                data = await asyncio.to_thread(self.remote.get, key)
            except NotFound as err:
                raise NotFound(f"WAL from {start} was removed from this safekeeper and its "
                               f"segment is not in object storage ({err})") from err
            if len(data) != seg:
                raise CorruptionError(f"remote WAL segment {key} is {len(data)} bytes, not "
                                      f"the segment size {seg}", path=key)
            self._downloaded = cached = (segno, data)
            self.counters.segments_downloaded += 1
            log.info("downloaded WAL segment %s to serve WAL from %s", key, start)
        base = segno * seg
        return cached[1][start.value - base:min(end.value, base + seg) - base]

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.state
        a = self.acceptor
        feedback = self.pageserver_feedback
        return {
            "tenant_id": str(s.tenant_id), "timeline_id": str(s.timeline_id),
            "system_id": s.system_id, "wal_seg_size": s.wal_seg_size,
            "term": s.term, "voted_for": s.voted_for,
            "term_history": [{"term": e.term, "start_lsn": str(e.start_lsn),
                              "prev_record_lsn": str(e.prev_record_lsn)}
                             for e in s.term_history],
            "timeline_start_lsn": str(s.timeline_start_lsn),
            "wal_start_lsn": str(self.wal.wal_start_lsn),
            "flush_lsn": str(a.flush_lsn),
            "last_record_end": str(a.last_record_end),
            "last_record_lsn": str(a.last_record_lsn),
            "commit_lsn": str(self.commit_lsn),
            "durable_commit_lsn": str(s.commit_lsn),
            "pageserver_feedback": None if feedback is None else {
                "write_lsn": str(feedback.write_lsn), "flush_lsn": str(feedback.flush_lsn),
                "apply_lsn": str(feedback.apply_lsn)},
            "removal_horizon": str(self.removal_horizon()),
            "pageserver_index_lsn": str(self.pageserver_index_lsn),
            "backup_lsn": str(s.backup_lsn),
            "peers": [p.to_json() for p in self.peers.values()],
            "pull": None if self.puller is None else {
                **self.puller.status(),
                "limit": None if a.pull_limit is None else str(a.pull_limit)},
            "broken": self.broken,
        }

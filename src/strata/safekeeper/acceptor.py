"""`Acceptor`: the safekeeper side of the WAL quorum for one timeline. No I/O.

`handle(msg)` takes a proposer message and returns a list of actions for the driver
(safekeeper/timeline.py), to be executed in order, each finished before the next starts:

- `PersistControl(state)`: write the control file durably (temp, fsync, rename, fsync dir);
- `WriteWal(lsn, data)`: write WAL bytes (no fsync yet);
- `FlushWal(upto)`: fsync the WAL written so far (everything below `upto` is durable);
- `TruncateWal(lsn)`: cut the WAL at `lsn`, durably, before anything else happens;
- `SendWal(term, start, end)`: read WAL [start, end) and send `ReadWalResponse(term, start, data)`;
- pull mode (`allow_pull=True`, as the safekeeper builds it; safekeeper/pull.py drives it):
  `StartPull`, `ClosePull`, `PullFeedback` (below), and the input
  `pulled_wal(term, begin, data)`;
- a reply message (`AcceptorGreeting`, `VoteResponse`, `AppendResponse`, `ReadWalResponse`):
  send it. Every position in a reply is durable by then, because the actions before it are.

After a crash the driver rebuilds the acceptor with `Acceptor(state)` from the last
persisted `AcceptorState` and `recover_wal(...)` with its WAL from `state.scan_lsn` to the
end of what it finds on disk, and truncates its WAL where `recover_wal` says it ends.
After a `ProtocolError` from `handle()`, discard the object the same way (the message may
have been half applied in memory, never on disk).
The protocol and its safety argument are in docs/safekeeper-protocol.md.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, replace

from strata.common.errors import CorruptionError, ProtocolError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, check_segment_size, page_header_size
from strata.pg.constants import XLOG_BLCKSZ
from strata.pg.walreader import WalStreamDecoder
from strata.safekeeper.messages import (
    MAX_READ_BYTES,
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    ProposerMessage,
    PullFrom,
    PullLimit,
    ReadWalRequest,
    ReadWalResponse,
    TermHistory,
    VoteRequest,
    VoteResponse,
    history_up_to,
    log_term,
)
from strata.safekeeper.record_bounds import RecordBoundaryTracker

log = logging.getLogger(__name__)

# Record boundaries remembered (one per append) as restart scan points for the control file.
_MAX_BOUNDS = 256


@dataclass(frozen=True, slots=True)
class AcceptorState:
    """What an acceptor persists in its control file (the WAL itself is in segment files).

    `scan_lsn` is a record end at or below the durable commit LSN (so never truncated and
    never beyond the durable WAL) and `scan_prev_lsn` the start of the record ending there:
    after a restart the acceptor re-reads its WAL from there to find its last record end.
    `voted_for` is the proposer `term` was promised to (0: the term was learned otherwise).
    """

    tenant_id: TenantId
    timeline_id: TimelineId
    system_id: int
    wal_seg_size: int
    timeline_start_lsn: Lsn
    timeline_start_prev_lsn: Lsn
    term: int
    voted_for: int
    term_history: TermHistory
    commit_lsn: Lsn
    scan_lsn: Lsn
    scan_prev_lsn: Lsn
    backup_lsn: Lsn = Lsn(0)
    """End of the WAL uploaded to object storage (wal_backup.py); 0: nothing yet. The
    acceptor only carries it along; the safekeeper's upload loop moves it."""

    @classmethod
    def new_timeline(cls, tenant_id: TenantId, timeline_id: TimelineId, system_id: int,
                     wal_seg_size: int, start_lsn: Lsn, prev_record_lsn: Lsn) -> AcceptorState:
        """A timeline created at record end `start_lsn` (D7: branch creation)."""
        check_segment_size(wal_seg_size)
        return cls(tenant_id, timeline_id, system_id, wal_seg_size, start_lsn,
                   prev_record_lsn, term=0, voted_for=0, term_history=(),
                   commit_lsn=start_lsn, scan_lsn=start_lsn, scan_prev_lsn=prev_record_lsn)


def _content_end(lsn: int, tot_len: int, seg_size: int) -> int:
    """Where the bytes of the record at `lsn` end, before its MAXALIGN padding: its length
    plus the page headers it crosses (xlog_internal.h: long header on a segment's first page).
    """
    pos, remaining = lsn, tot_len
    while remaining > (page_end := (pos | (XLOG_BLCKSZ - 1)) + 1) - pos:
        remaining -= page_end - pos
        pos = page_end + page_header_size(page_end, seg_size)
    return pos + remaining


# --- actions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PersistControl:
    """Make `state` durable before any later action runs."""

    state: AcceptorState


@dataclass(frozen=True, slots=True)
class WriteWal:
    """Write `data` at `lsn` (always the current end of the WAL); fsync comes with FlushWal."""

    lsn: Lsn
    data: bytes


@dataclass(frozen=True, slots=True)
class FlushWal:
    """fsync: all WAL below `upto` must be durable before any later action runs."""

    upto: Lsn


@dataclass(frozen=True, slots=True)
class TruncateWal:
    """Remove the WAL at and after `lsn`, durably, before any later action runs."""

    lsn: Lsn


@dataclass(frozen=True, slots=True)
class SendWal:
    """Read WAL [start_lsn, end_lsn) and reply `ReadWalResponse(term, start_lsn, data)`."""

    term: int
    start_lsn: Lsn
    end_lsn: Lsn


@dataclass(frozen=True, slots=True)
class PullSource:
    """Where the proposer of `term` told this acceptor to pull its WAL from (`PullFrom`)."""

    term: int
    host: str
    port: int
    slot_name: str
    compute_id: str = ""  # if set: only the compute whose strata.compute_id it is


@dataclass(frozen=True, slots=True)
class StartPull:
    """Pull mode: replicate from `source` (`START_REPLICATION SLOT <slot_name> PHYSICAL
    <start_lsn>`, application name `slot_name`) and pass every XLogData to
    `pulled_wal(source.term, ...)`. Reconnecting the same source is the driver's business;
    the acceptor asks once per term."""

    source: PullSource
    start_lsn: Lsn


@dataclass(frozen=True, slots=True)
class ClosePull:
    """Pull mode: close the replication connection of `term` before any later action runs
    (it comes before the PersistControl of a higher term's promise); whatever it still had
    buffered is not delivered (the acceptor would refuse it anyway)."""

    term: int


@dataclass(frozen=True, slots=True)
class PullFeedback:
    """Pull mode: send a standby status update on `term`'s replication connection with
    write = flush = apply = `flush_lsn` (durable by then: the actions before it are done)."""

    term: int
    flush_lsn: Lsn


AcceptorReply = AcceptorGreeting | VoteResponse | AppendResponse | ReadWalResponse
AcceptorAction = (PersistControl | WriteWal | FlushWal | TruncateWal | SendWal | StartPull
                  | ClosePull | PullFeedback | AcceptorReply)


class Acceptor:
    """Acceptor side of the WAL quorum for one timeline. No I/O; safekeeper/timeline.py drives it.

    The commit LSN is persisted when an AppendRequest asks (`persist_commit`: sync, or the
    proposer's heartbeat once the stream is idle) or when it moved `commit_persist_bytes`
    past the persisted one; never just because an append carried a newer one, so appends
    are not held up behind control-file writes. The WAL itself is always flushed before a
    reply reports it.

    Pull mode (docs/safekeeper-protocol.md, "Pull mode") is refused with a `ProtocolError`
    unless `allow_pull` (the safekeeper's timelines always allow it). The pull source is
    kept in memory only; after a restart the proposer must send `PullFrom` again.
    """

    def __init__(self, state: AcceptorState, *, commit_persist_bytes: int = 16 << 20,
                 allow_pull: bool = False) -> None:
        self.state = state  # as last persisted (or to be persisted by the last action)
        self.commit_persist_bytes = commit_persist_bytes
        self.allow_pull = allow_pull
        self.pull_source: PullSource | None = None  # only in the promised, adopted term
        # Backpressure (PullLimit): the highest flush LSN the compute may be told, and the
        # last one it was told; both forgotten when the pull stops.
        self.pull_limit: Lsn | None = None
        self.pull_reported = Lsn(0)
        self.flush_lsn = state.scan_lsn  # end of the WAL it holds (durable once replied)
        self.commit_lsn = state.commit_lsn  # in memory; state.commit_lsn is the durable one
        self._tracker = RecordBoundaryTracker(state.scan_lsn.value, state.scan_prev_lsn.value,
                                              state.wal_seg_size)
        # (record end, record start) pairs above the persisted scan point, ascending.
        self._bounds: deque[tuple[Lsn, Lsn]] = deque(maxlen=_MAX_BOUNDS)

    # --- restart ------------------------------------------------------------------------------
    def recover_wal(self, data: bytes) -> Lsn:
        """After a restart: the WAL found on disk from `state.scan_lsn` to its end, at once.

        WAL written after the last fsync may be torn or garbage, and the record-boundary
        tracker does not check CRCs, so the records are decoded and verified here
        (`strata.pg.walreader`): the WAL ends after the last valid complete record. Returns
        that end; the driver must truncate its WAL files there before serving. A partial
        record after it is dropped too (it never counted: the quorum agrees on record ends).
        """
        assert self.flush_lsn == self.state.scan_lsn and self._tracker.end_lsn == \
            self.state.scan_lsn.value, "recover_wal runs once, on a fresh Acceptor"
        decoder = WalStreamDecoder(self.state.scan_lsn, self.state.wal_seg_size,
                                   at_record_start=True, zero_is_end=True,
                                   sysid=self.state.system_id)
        decoder.feed(data)
        base = self.state.scan_lsn.value
        end = base
        try:
            for record in decoder:
                content_end = _content_end(record.lsn, record.tot_len, self.state.wal_seg_size)
                padding = data[content_end - base:record.end_lsn - base]
                if record.end_lsn - content_end < 8 and padding.strip(b"\0"):
                    # PostgreSQL pads records with zeros; a torn write left garbage here, and
                    # the proposer will send the padding again.
                    end = content_end
                    break
                end = min(record.end_lsn, base + len(data))
                if end < record.end_lsn:
                    break  # the padding (or an XLOG_SWITCH's segment tail) is not all there
        except CorruptionError as err:
            log.info("timeline %s: WAL after %s is not valid, it ends there (%s)",
                     self.state.timeline_id, Lsn(end), err)
        self._tracker.feed(data[:end - base])
        self.flush_lsn = Lsn(end)
        return self.flush_lsn

    # --- positions ----------------------------------------------------------------------------
    @property
    def term(self) -> int:
        return self.state.term

    @property
    def last_record_end(self) -> Lsn:
        return Lsn(self._tracker.last_record_end)

    @property
    def last_record_lsn(self) -> Lsn:
        return Lsn(self._tracker.last_record_lsn)

    @property
    def log_term(self) -> int:
        """The term whose log this acceptor's log (up to its last record end) is a prefix of."""
        return log_term(self.state.term_history, self.last_record_end)

    def append_response(self) -> AppendResponse:
        """The acceptor's state as an `AppendResponse` (what the driver sends as pull
        feedback to the proposer, and to a proposer whose pull a higher term closed)."""
        return self._append_response()

    def _append_response(self) -> AppendResponse:
        return AppendResponse(self.state.term, self._elected_term(), self.flush_lsn,
                              self.last_record_end, self.state.commit_lsn)

    def _elected_term(self) -> int:
        """The term whose ProposerElected this acceptor adopted last (0: none yet)."""
        history = self.state.term_history
        return history[-1].term if history else 0

    # --- messages -----------------------------------------------------------------------------
    def handle(self, msg: ProposerMessage) -> list[AcceptorAction]:
        match msg:
            case ProposerGreeting():
                return self._on_greeting(msg)
            case VoteRequest():
                return self._on_vote_request(msg)
            case ProposerElected():
                return self._on_elected(msg)
            case AppendRequest():
                return self._on_append(msg)
            case ReadWalRequest():
                return self._on_read_wal(msg)
            case PullFrom():
                return self._on_pull_from(msg)
            case PullLimit():
                return self._on_pull_limit(msg)
        raise ProtocolError(f"an acceptor does not handle {type(msg).__name__}")

    def _on_greeting(self, msg: ProposerGreeting) -> list[AcceptorAction]:
        s = self.state
        if (msg.tenant_id, msg.timeline_id) != (s.tenant_id, s.timeline_id):
            raise ProtocolError(f"greeting for {msg.tenant_id}/{msg.timeline_id} reached the "
                                f"acceptor of {s.tenant_id}/{s.timeline_id}")
        if msg.system_id != s.system_id or msg.wal_seg_size != s.wal_seg_size:
            raise ProtocolError(f"proposer {msg.proposer_id} has system {msg.system_id}, "
                                f"segment size {msg.wal_seg_size}; timeline {s.timeline_id} "
                                f"has {s.system_id}, {s.wal_seg_size}: wrong cluster?")
        return [AcceptorGreeting(s.term)]

    def _on_vote_request(self, msg: VoteRequest) -> list[AcceptorAction]:
        actions: list[AcceptorAction] = []
        if msg.term > self.state.term:
            # Fencing: no acknowledgement of the old term may follow the promise.
            self._close_pull(actions)
            # Persist before voting: a vote forgotten in a crash lets two proposers win it.
            self.state = replace(self.state, term=msg.term, voted_for=msg.proposer_id)
            actions.append(PersistControl(self.state))
        granted = msg.term == self.state.term and msg.proposer_id == self.state.voted_for
        end = self.last_record_end
        actions.append(VoteResponse(
            self.state.term, granted, self.flush_lsn, end, self.last_record_lsn,
            self.state.commit_lsn, self.state.timeline_start_lsn,
            history_up_to(self.state.term_history, end)))
        return actions

    def _on_elected(self, msg: ProposerElected) -> list[AcceptorAction]:
        if msg.term < self.state.term:
            return [self._append_response()]
        if self._elected_term() == msg.term:
            return [self._append_response()]  # a repeat: never truncate this term's WAL again
        start = msg.start_streaming_at
        self._check_elected(msg)
        prev = self._prev_record_at(start, msg.term_history)
        actions: list[AcceptorAction] = []
        self._close_pull(actions)  # a pull is of the adopted term, and msg.term is higher
        if self.flush_lsn > start:
            # Durable before the new history is: a crash in between leaves the old history
            # with a shorter log, which is still a prefix of that history's log.
            actions.append(TruncateWal(start))
            self.flush_lsn = start
            self._tracker = RecordBoundaryTracker(start.value, prev.value,
                                                  self.state.wal_seg_size)
            self._bounds.clear()
        self.state = replace(self.state, term=msg.term, term_history=msg.term_history,
                             voted_for=self.state.voted_for if msg.term == self.state.term
                             else 0)
        actions.append(PersistControl(self.state))
        actions.append(self._append_response())
        return actions

    def _check_elected(self, msg: ProposerElected) -> None:
        history = msg.term_history
        start = msg.start_streaming_at
        if not history or history[-1].term != msg.term:
            raise ProtocolError(f"ProposerElected for term {msg.term} has a history that does "
                                f"not end with that term: {history}")
        if start > history[-1].start_lsn:
            raise ProtocolError(f"ProposerElected for term {msg.term}: streaming start {start} "
                                f"is past the term start {history[-1].start_lsn}")
        if start > self.last_record_end:
            raise ProtocolError(f"ProposerElected for term {msg.term}: streaming start {start} "
                                f"is past this acceptor's last record end "
                                f"{self.last_record_end}; it never reported that")
        # Committed WAL is never truncated (the safety argument in safekeeper-protocol.md).
        assert start >= self.commit_lsn, (msg.term, start, self.commit_lsn)

    def _prev_record_at(self, lsn: Lsn, history: TermHistory) -> Lsn:
        """The start of the record that ends at `lsn`, a point the acceptor knows of."""
        if lsn == self.last_record_end:
            return self.last_record_lsn
        for entry in self.state.term_history + history:
            if entry.start_lsn == lsn:
                return entry.prev_record_lsn
        if lsn == self.state.timeline_start_lsn:
            return self.state.timeline_start_prev_lsn
        raise ProtocolError(f"streaming start {lsn} is neither a term start nor this "
                            f"acceptor's last record end {self.last_record_end}")

    def _on_append(self, msg: AppendRequest) -> list[AcceptorAction]:
        if msg.term != self.state.term or self._elected_term() != msg.term:
            # A stale term, or our term before its ProposerElected arrived: refuse.
            return [self._append_response()]
        actions: list[AcceptorAction] = []
        self._write(msg.term, msg.begin_lsn, msg.data, actions)
        self._advance_commit(msg, actions)
        actions.append(self._append_response())
        return actions

    def _write(self, term: int, begin_lsn: Lsn, data: bytes,
               actions: list[AcceptorAction]) -> None:
        """WAL [begin_lsn, begin_lsn + len(data)) of `term`, the acceptor's adopted term."""
        end_lsn = begin_lsn + len(data)
        if begin_lsn <= self.flush_lsn < end_lsn:
            # Bytes below flush_lsn are this term's too (it truncated us at its start), so a
            # repeated or overlapping request only adds the new part.
            piece = data[self.flush_lsn - begin_lsn:]
            try:
                self._tracker.feed(piece)
            except CorruptionError as err:
                raise ProtocolError(f"term {term} sent damaged WAL at {self.flush_lsn}: "
                                    f"{err}") from err
            actions.append(WriteWal(self.flush_lsn, piece))
            record_end = self.last_record_end
            if not self._bounds or self._bounds[-1][0] < record_end:
                self._bounds.append((record_end, self.last_record_lsn))
            self.flush_lsn = end_lsn
            actions.append(FlushWal(self.flush_lsn))
        # A gap (begin_lsn > flush_lsn) writes nothing; the reply tells where to resume.

    def _advance_commit(self, msg: AppendRequest, actions: list[AcceptorAction]) -> None:
        # Our log is a prefix of the proposer's, so any of our record ends below its commit
        # LSN is committed too.
        commit = min(msg.commit_lsn, self.last_record_end)
        if commit > self.commit_lsn:
            self.commit_lsn = commit
        durable = self.state.commit_lsn
        if self.commit_lsn > durable and (msg.persist_commit or
                                          self.commit_lsn - durable >= self.commit_persist_bytes):
            scan_lsn, scan_prev = self._scan_point()
            self.state = replace(self.state, commit_lsn=self.commit_lsn, scan_lsn=scan_lsn,
                                 scan_prev_lsn=scan_prev)
            actions.append(PersistControl(self.state))

    def _scan_point(self) -> tuple[Lsn, Lsn]:
        """The highest known (record end, its record's start) at or below the commit LSN."""
        best = (self.state.scan_lsn, self.state.scan_prev_lsn)
        for entry in self.state.term_history:
            if best[0] < entry.start_lsn <= self.commit_lsn:
                best = (entry.start_lsn, entry.prev_record_lsn)
        while self._bounds and self._bounds[0][0] <= self.commit_lsn:
            bound = self._bounds.popleft()
            best = max(best, bound)
        return best

    def _on_read_wal(self, msg: ReadWalRequest) -> list[AcceptorAction]:
        if msg.term != self.state.term:
            return [ReadWalResponse(self.state.term, msg.start_lsn, b"")]
        if not (self.state.timeline_start_lsn <= msg.start_lsn <= msg.end_lsn <= self.flush_lsn):
            raise ProtocolError(f"ReadWalRequest [{msg.start_lsn}, {msg.end_lsn}) is outside "
                                f"this acceptor's WAL [{self.state.timeline_start_lsn}, "
                                f"{self.flush_lsn})")
        if msg.end_lsn - msg.start_lsn > MAX_READ_BYTES:
            raise ProtocolError(f"ReadWalRequest of {msg.end_lsn - msg.start_lsn} bytes; "
                                f"the limit is {MAX_READ_BYTES}")
        return [SendWal(msg.term, msg.start_lsn, msg.end_lsn)]

    # --- pull mode --------------------------------------------------------------
    def _on_pull_from(self, msg: PullFrom) -> list[AcceptorAction]:
        if not self.allow_pull:
            raise ProtocolError(f"PullFrom for term {msg.term}: this acceptor was built "
                                "without allow_pull")
        if msg.term != self.state.term or self._elected_term() != msg.term:
            # Like an AppendRequest: a stale term, or ours before its ProposerElected.
            return [self._append_response()]
        term_start = self.state.term_history[-1].start_lsn
        if msg.start_lsn < term_start:
            raise ProtocolError(f"PullFrom for term {msg.term} starts at {msg.start_lsn}, "
                                f"before the term's start {term_start}")
        if msg.start_lsn > self.flush_lsn:
            # Not brought up to the term start yet: the reply says where it is.
            return [self._append_response()]
        source = PullSource(msg.term, msg.host, msg.port, msg.slot_name, msg.compute_id)
        if self.pull_source == source:
            return [self._append_response()]  # a repeat (the proposer reconnected)
        if self.pull_source is not None:
            raise ProtocolError(f"PullFrom for term {msg.term} names {msg.host}:{msg.port} "
                                f"slot {msg.slot_name}; this term already pulls from "
                                f"{self.pull_source.host}:{self.pull_source.port} slot "
                                f"{self.pull_source.slot_name}")
        self.pull_source = source
        # The acceptor's WAL past the divergence point is all this term's (step 4), so the
        # stream continues at its end, wherever that is at or past the term start.
        return [StartPull(source, self.flush_lsn), self._append_response()]

    def pulled_wal(self, term: int, begin_lsn: Lsn, data: bytes) -> list[AcceptorAction]:
        """WAL that the pull stream of `term` brought: [begin_lsn, begin_lsn + len(data)).

        Handled as an AppendRequest of `term` without a commit LSN, answered by a
        `PullFeedback` instead of a reply. Refused (no action at all) unless `term` is the
        term this acceptor promised last, adopted, and pulls in: in particular after the
        promise of a higher term closed the stream.
        """
        source = self.pull_source
        if source is None or source.term != term:
            return []
        assert term == self.state.term == self._elected_term(), (term, self.state)
        actions: list[AcceptorAction] = []
        self._write(term, begin_lsn, data, actions)
        actions.append(PullFeedback(term, self.pull_report()))
        return actions

    def pull_report(self) -> Lsn:
        """The flush LSN to tell the compute: the durable end, held at the `PullLimit` if
        one is set, and never below what it was told before on this pull."""
        report = self.flush_lsn if self.pull_limit is None else \
            min(self.flush_lsn, self.pull_limit)
        self.pull_reported = max(self.pull_reported, report)
        return self.pull_reported

    def _on_pull_limit(self, msg: PullLimit) -> list[AcceptorAction]:
        if msg.term != self.state.term or self._elected_term() != msg.term:
            return [self._append_response()]  # stale: the proposer learns it is fenced
        source = self.pull_source
        if source is None or source.term != msg.term:
            return []  # not pulling (yet): nothing to hold
        before = self.pull_reported
        self.pull_limit = msg.max_flush_lsn
        report = self.pull_report()
        return [PullFeedback(msg.term, report)] if report > before else []

    def _close_pull(self, actions: list[AcceptorAction]) -> None:
        """Before the acceptor moves to a higher term: stop pulling the old one."""
        if self.pull_source is not None:
            actions.append(ClosePull(self.pull_source.term))
            self.pull_source = None
            self.pull_limit, self.pull_reported = None, Lsn(0)

    # --- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        s = self.state
        assert s.timeline_start_lsn <= s.scan_lsn, (s.timeline_start_lsn, s.scan_lsn)
        assert s.scan_lsn <= s.commit_lsn, (s.scan_lsn, s.commit_lsn)
        assert s.commit_lsn <= self.commit_lsn, (s.commit_lsn, self.commit_lsn)
        assert self.commit_lsn <= self.last_record_end, (self.commit_lsn, self.last_record_end)
        assert self.last_record_end.value == self._tracker.last_record_end
        assert self.last_record_end <= self.flush_lsn, (self.last_record_end, self.flush_lsn)
        assert self._tracker.end_lsn == self.flush_lsn.value, (self._tracker.end_lsn,
                                                               self.flush_lsn)
        bounds = list(self._bounds)
        for (end_a, _), (end_b, _) in zip(bounds, bounds[1:], strict=False):
            assert end_a < end_b, bounds
        assert not bounds or bounds[-1][0] <= self.last_record_end, (bounds, self.last_record_end)
        history = s.term_history
        for a, b in zip(history, history[1:], strict=False):
            assert a.term < b.term, history
            assert a.start_lsn <= b.start_lsn, history
        assert not history or history[-1].term <= s.term, (history, s.term)
        assert not history or history[0].start_lsn >= s.timeline_start_lsn, history
        source = self.pull_source
        if source is not None:
            # Pulled WAL is acknowledged only in the promised term whose election it adopted.
            assert self.allow_pull
            assert source.term == s.term == self._elected_term(), (source, s.term, history)
            assert history[-1].start_lsn <= self.flush_lsn, (history, self.flush_lsn)
        assert self.pull_reported <= self.flush_lsn, (self.pull_reported, self.flush_lsn)

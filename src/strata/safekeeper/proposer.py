"""`Proposer`: the walproposer side of the WAL quorum for one timeline. No I/O.

The driver (the walproposer, or the control plane's one-shot sync) calls `start(now)`,
`handle(now, node, msg)` for every acceptor message, `tick(now)` on a timer, and in normal
mode `append_wal(now, data)` with the WAL PostgreSQL streams from the `Elected` position.
Each returns actions, executed in order:

- `Send(node, msg)`: send `msg` to acceptor `node` (lost messages are retried by `tick`);
- `Elected(term, start_lsn, prev_record_lsn)`: this proposer leads `term`; the log ends at
  record end `start_lsn` (the record before it starts at `prev_record_lsn`); stream WAL from
  exactly there;
- `CommitAdvanced(commit_lsn)`: WAL below it is on a majority in this term, at a record end:
  report it to PostgreSQL as written/flushed/applied;
- `Fenced(term)`: an acceptor knows a higher term (or granted ours to another proposer):
  stop at once (the walproposer stops its PostgreSQL);
- `SyncDone(end_lsn, prev_record_lsn)`: sync mode only: the commit LSN is durably `end_lsn` on
  a majority; start the compute there.

Pull mode (`ProposerConfig.pull`, docs/walproposer.md): election and recovery up to the term
start E are the same; then each acceptor whose flush LSN reached E in this term gets
`PullFrom(term, host, port, sk<node>, E)` (again after each new connection to it: a
restarted safekeeper forgets its source) and replicates the compute's WAL itself.
`append_wal` is not used; the acceptors' `AppendResponse`s (after pulled WAL, at most one
per `pull_answer_interval_s` of the safekeeper) move the commit LSN as appends' answers do,
and it goes back to them in commit-only appends sent by `tick` (so at most one per acceptor
per tick). `CommitAdvanced` then only
tells the driver: PostgreSQL releases commits itself (`synchronous_standby_names = 'ANY
<majority> (sk1, ...)'`). Backpressure: `limit_pull(now, lsn)` sends `PullLimit(term, lsn)`
to every acceptor that pulls (and after each later `PullFrom`): they report at most `lsn`
to the compute, so its commits past it wait.

Time (`now`, seconds) and randomness (retry jitter) are arguments. The protocol is described
in docs/safekeeper-protocol.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum

from strata.common.errors import ProtocolError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper.messages import (
    MAX_READ_BYTES,
    AcceptorGreeting,
    AcceptorMessage,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    ProposerMessage,
    PullFrom,
    PullLimit,
    ReadWalRequest,
    ReadWalResponse,
    TermEntry,
    TermHistory,
    VoteRequest,
    VoteResponse,
    history_up_to,
    log_term,
)


def pull_slot_name(node: int) -> str:
    """The compute's physical slot (and application name) that safekeeper `node` pulls
    through in pull mode: `sk<node>`."""
    return f"sk{node}"


@dataclass(frozen=True, slots=True)
class PullTarget:
    """Pull mode: where the safekeepers replicate the compute's WAL from (a host name or
    address, or a unix socket directory for safekeepers on the compute's host)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ProposerConfig:
    tenant_id: TenantId
    timeline_id: TimelineId
    system_id: int
    wal_seg_size: int
    proposer_id: int  # unique among proposers of the timeline; never 0
    acceptors: tuple[int, ...]  # node ids
    sync: bool = False
    retry_interval_s: float = 0.5
    max_append_bytes: int = 128 * 1024
    max_inflight_bytes: int = 1 << 20
    max_read_bytes: int = 1 << 20
    # WAL that every started acceptor has and that is committed is dropped from memory once
    # this much has piled up; an acceptor that needs it later gets it from a peer (ReadWal).
    release_bytes: int = 4 << 20
    pull: PullTarget | None = None
    """Pull mode (see the module docstring); None: the proposer streams the WAL itself."""

    def __post_init__(self) -> None:
        if not 0 < self.proposer_id < 1 << 64:
            raise UserError(f"proposer id {self.proposer_id} must be in 1..2^64-1 (0 means "
                            "'no proposer' in an acceptor's vote)")
        if not self.acceptors or len(set(self.acceptors)) != len(self.acceptors):
            raise UserError(f"acceptors {self.acceptors} must be a non-empty list of "
                            "distinct safekeeper node ids")
        if min(self.max_append_bytes, self.max_inflight_bytes, self.max_read_bytes) <= 0 or \
                self.max_read_bytes > MAX_READ_BYTES or self.retry_interval_s <= 0:
            raise UserError(f"invalid proposer limits: append {self.max_append_bytes}, "
                            f"in flight {self.max_inflight_bytes}, read {self.max_read_bytes} "
                            f"(at most {MAX_READ_BYTES}), retry {self.retry_interval_s} s")
        if self.pull is not None and self.sync:
            raise UserError("sync mode streams no WAL: it cannot be in pull mode")

    @property
    def quorum(self) -> int:
        return len(self.acceptors) // 2 + 1


# --- actions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    node: int
    msg: ProposerMessage


@dataclass(frozen=True, slots=True)
class Elected:
    term: int
    start_lsn: Lsn
    prev_record_lsn: Lsn


@dataclass(frozen=True, slots=True)
class CommitAdvanced:
    commit_lsn: Lsn


@dataclass(frozen=True, slots=True)
class Fenced:
    term: int


@dataclass(frozen=True, slots=True)
class SyncDone:
    end_lsn: Lsn
    prev_record_lsn: Lsn


ProposerAction = Send | Elected | CommitAdvanced | Fenced | SyncDone


class Phase(Enum):
    GREETING = "greeting"  # waiting for a majority of greetings to pick a term
    VOTING = "voting"  # waiting for a majority of votes
    ELECTED = "elected"  # leading: recovering and appending
    DONE = "done"  # sync mode finished
    FENCED = "fenced"  # a higher term exists; terminal


@dataclass(slots=True)
class _Peer:
    node: int
    greeting_term: int | None = None
    vote: VoteResponse | None = None
    start_at: Lsn | None = None  # streaming start sent in ProposerElected
    synced: bool = False  # acknowledged ProposerElected: its log is a prefix of ours
    sent_lsn: Lsn = Lsn(0)  # next byte to send
    flush_lsn: Lsn = Lsn(0)  # highest acknowledged
    # Flush LSN of the latest answer: lower than flush_lsn after a restart cut a partial
    # record (or when answers are reordered); a stalled stream resumes from here.
    reported_flush: Lsn = Lsn(0)
    record_end: Lsn = Lsn(0)  # acknowledged, durable
    durable_commit: Lsn = Lsn(0)
    sent_commit: Lsn = Lsn(0)
    persist_due: bool = False  # the next commit-only append asks for a durable commit LSN
    last_data_s: float = float("-inf")  # the last append with WAL
    last_send_s: float = float("-inf")
    last_progress_s: float = float("-inf")
    pull_sent: bool = False  # pull mode: PullFrom sent on its current connection


@dataclass(slots=True)
class _Fetch:
    """Recovery: WAL [start, end) being read from a donor, to go in front of the buffer."""

    start: Lsn
    end: Lsn
    data: bytearray = field(default_factory=bytearray)
    donor: int | None = None
    last_send_s: float = float("-inf")

    @property
    def pos(self) -> Lsn:
        return self.start + len(self.data)


class Proposer:
    """Proposer side of the WAL quorum. No I/O; the drivers are in compute/walproposer.py."""

    def __init__(self, config: ProposerConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.phase = Phase.GREETING
        self.term = 0
        self.history: TermHistory = ()
        self.peers = {n: _Peer(n) for n in config.acceptors}
        self.timeline_start_lsn = Lsn(0)
        self.term_start_lsn = Lsn(0)  # E: the agreed end of the log when elected
        self.term_start_prev = Lsn(0)
        self.donor = 0
        self.commit_lsn = Lsn(0)
        self.wal_start = Lsn(0)  # self.wal holds our log [wal_start, end_lsn)
        self.wal = bytearray()
        self.fetch: _Fetch | None = None
        # An acceptor that gets WAL and commit LSNs only from `tick` (the driver picks the
        # slowest): the others are a majority, so commits need not wait for it, and it
        # fsyncs once per tick instead of once per commit. Ignored while the others that
        # are synced are fewer than a majority.
        self.deferred: int | None = None
        # Pull mode: PullFrom goes out only once the driver checked that the compute
        # started at the term start (`start_pulling`): before that the compute's WAL may
        # not continue our log, and pulling would move its slots before the check.
        self.pull_ready = False
        self.pull_compute_id = ""  # the compute's strata.compute_id, from start_pulling
        # Pull mode's backpressure (`limit_pull`): the highest flush LSN the acceptors may
        # report to the compute; None: nothing held.
        self.pull_limit: Lsn | None = None

    @property
    def end_lsn(self) -> Lsn:
        return self.wal_start + len(self.wal)

    def _retry_due(self, last_s: float, now: float) -> bool:
        jitter = 1.0 + 0.5 * self.rng.random()
        return now - last_s >= self.config.retry_interval_s * jitter

    # --- entry points -------------------------------------------------------------------------
    def start(self, now: float) -> list[ProposerAction]:
        return [self._send(p, self._greeting(), now) for p in self.peers.values()]

    def handle(self, now: float, node: int, msg: AcceptorMessage) -> list[ProposerAction]:
        peer = self.peers.get(node)
        if peer is None:
            raise ProtocolError(f"message from node {node}, which is not an acceptor of "
                                f"timeline {self.config.timeline_id}")
        if self.phase in (Phase.DONE, Phase.FENCED):
            return []
        match msg:
            case AcceptorGreeting():
                return self._on_greeting(now, peer, msg)
            case VoteResponse():
                return self._on_vote(now, peer, msg)
            case AppendResponse():
                return self._on_append_response(now, peer, msg)
            case ReadWalResponse():
                return self._on_read_wal(now, peer, msg)
        raise ProtocolError(f"a proposer does not handle {type(msg).__name__}")

    def append_wal(self, now: float, data: bytes) -> list[ProposerAction]:
        """WAL from PostgreSQL, continuing our log at `end_lsn` (normal mode, once elected)."""
        assert not self.config.sync, "sync mode appends no WAL"
        assert self.config.pull is None, "in pull mode the safekeepers take the WAL"
        assert self.phase in (Phase.ELECTED, Phase.FENCED), self.phase
        if self.phase is Phase.FENCED:
            return []
        self.wal += data
        return self._pump(now)

    def start_pulling(self, now: float, compute_id: str = "") -> list[ProposerAction]:
        """Pull mode: the driver checked that the compute starts where our log ends (its
        slots' restart_lsn is the term start): tell every acceptor at the term start to
        pull, and later ones as they get there; `compute_id`: that compute's
        `strata.compute_id` (`PullFrom.compute_id`), if it has one."""
        assert self.config.pull is not None and self.phase in (Phase.ELECTED, Phase.FENCED)
        self.pull_ready = True
        self.pull_compute_id = compute_id
        out: list[ProposerAction] = []
        if self.phase is Phase.ELECTED:
            for p in self.peers.values():
                if p.synced and not p.pull_sent and p.flush_lsn >= self.term_start_lsn:
                    out += self._pull_from(now, p)
        return out

    def _pull_from(self, now: float, peer: _Peer) -> list[ProposerAction]:
        target = self.config.pull
        assert target is not None and self.pull_ready
        peer.pull_sent = True
        pull = PullFrom(self.term, target.host, target.port, pull_slot_name(peer.node),
                        self.term_start_lsn, self.pull_compute_id)
        out: list[ProposerAction] = [self._send(peer, pull, now)]
        if self.pull_limit is not None:
            # An acceptor forgets the limit when its pull stops (and ignores one sent
            # before it pulls): every PullFrom is followed by the current one.
            out.append(self._send(peer, PullLimit(self.term, self.pull_limit), now))
        return out

    def limit_pull(self, now: float, lsn: Lsn) -> list[ProposerAction]:
        """Pull mode's backpressure: the acceptors report at most `lsn` as flushed to the
        compute (`PullLimit`), so its commits past it wait; a higher `lsn` releases them.
        Sent to every acceptor told to pull (with ANY <majority>, one acceptor alone holds
        nothing back), and again after each later `PullFrom`. Never lowered."""
        assert self.config.pull is not None, "only in pull mode"
        if self.pull_limit is not None and lsn <= self.pull_limit:
            return []
        self.pull_limit = lsn
        if self.phase is not Phase.ELECTED:
            return []
        return [self._send(p, PullLimit(self.term, lsn), now)
                for p in self.peers.values() if p.pull_sent]

    def tick(self, now: float) -> list[ProposerAction]:
        """Retry what got no answer; heartbeat; time out stalled streams."""
        if self.phase in (Phase.DONE, Phase.FENCED):
            return []
        out: list[ProposerAction] = []
        for p in self.peers.values():
            if not self._retry_due(p.last_send_s, now):
                continue
            if p.greeting_term is None:
                out.append(self._send(p, self._greeting(), now))
            elif self.phase is Phase.GREETING:
                continue
            elif p.vote is None:
                out.append(self._send(p, VoteRequest(self.term, self.config.proposer_id), now))
            elif p.start_at is None:
                if self.phase is Phase.ELECTED:
                    out += self._start_peer(now, p)
            elif not p.synced:
                out.append(self._send(p, self._elected_msg(p.start_at), now))
            else:
                if p.sent_lsn > p.reported_flush and self._retry_due(p.last_progress_s, now):
                    p.sent_lsn = p.reported_flush  # lost or stuck: resend from where it is
                p.sent_commit = Lsn(0)  # forces a heartbeat (and commit) append
                # Once the stream is idle, the heartbeat makes the commit LSN durable there
                # (under load the acceptor persists it every commit_persist_bytes).
                p.persist_due = p.durable_commit < self.commit_lsn and \
                    now - p.last_data_s >= self.config.retry_interval_s
        if self.fetch is not None and self._retry_due(self.fetch.last_send_s, now):
            self.fetch.donor = None  # pick again: the donor may be down
            out += self._fetch_next(now)
        return out + self._pump(now, everyone=True)

    # --- greeting and votes -------------------------------------------------------------------
    def _greeting(self) -> ProposerGreeting:
        c = self.config
        return ProposerGreeting(c.tenant_id, c.timeline_id, c.system_id, c.wal_seg_size,
                                c.proposer_id)

    def _send(self, peer: _Peer, msg: ProposerMessage, now: float) -> Send:
        peer.last_send_s = now
        return Send(peer.node, msg)

    def _on_greeting(self, now: float, peer: _Peer,
                     msg: AcceptorGreeting) -> list[ProposerAction]:
        peer.greeting_term = msg.term
        # A greeting answers a new connection: a restarted acceptor forgot its pull source,
        # and the pull feedback goes to the connection that sent the last PullFrom.
        peer.pull_sent = False
        if self.phase is Phase.GREETING:
            greeted = [p.greeting_term for p in self.peers.values() if p.greeting_term is not None]
            if len(greeted) < self.config.quorum:
                return []
            self.term = max(greeted) + 1
            self.phase = Phase.VOTING
            vote = VoteRequest(self.term, self.config.proposer_id)
            return [self._send(p, vote, now) for p in self.peers.values()
                    if p.greeting_term is not None]
        if msg.term > self.term:
            return self._fence(msg.term)
        if peer.vote is None:
            return [self._send(peer, VoteRequest(self.term, self.config.proposer_id), now)]
        return []

    def _on_vote(self, now: float, peer: _Peer, msg: VoteResponse) -> list[ProposerAction]:
        if self.phase is Phase.GREETING:
            return []  # answers a request of no term of ours
        if not msg.granted or msg.term != self.term:
            # A refusal at our own term means another proposer drew the same term and got
            # this vote: it, not us, may lead that term.
            return self._fence(msg.term)
        if peer.vote is not None:
            return []  # a repeat; the first answer is the log it had when it promised
        peer.vote = msg
        if self.phase is Phase.VOTING:
            votes = [p for p in self.peers.values() if p.vote is not None]
            if len(votes) >= self.config.quorum:
                return self._elect(now)
            return []
        return self._start_peer(now, peer) + self._pump(now)

    def _fence(self, term: int) -> list[ProposerAction]:
        self.phase = Phase.FENCED
        return [Fenced(term)]

    # --- election and recovery ----------------------------------------------------------------
    def _elect(self, now: float) -> list[ProposerAction]:
        votes = [p.vote for p in self.peers.values() if p.vote is not None]
        starts = {v.timeline_start_lsn for v in votes}
        if len(starts) != 1:
            raise ProtocolError(f"acceptors disagree on where timeline "
                                f"{self.config.timeline_id} starts: {sorted(starts)}")
        self.timeline_start_lsn = starts.pop()

        # The most advanced log: by the term of its last record, then by its end. Logs of
        # the same term are prefixes of that term's log, so the longest contains the others.
        def position(p: _Peer) -> tuple[int, Lsn]:
            assert p.vote is not None
            return log_term(p.vote.term_history, p.vote.last_record_end), p.vote.last_record_end

        best = max((p for p in self.peers.values() if p.vote is not None), key=position)
        assert best.vote is not None
        end = best.vote.last_record_end
        prev = best.vote.last_record_lsn
        self.donor = best.node
        self.term_start_lsn = end
        self.term_start_prev = prev
        base = history_up_to(best.vote.term_history, end)
        assert not base or base[-1].term < self.term, (base, self.term)
        self.history = base + (TermEntry(self.term, end, prev),)
        self.wal_start = end
        # Commit LSNs the voters know are committed (and so part of the chosen log).
        self.commit_lsn = max(v.commit_lsn for v in votes)
        assert self.commit_lsn <= end, (self.commit_lsn, end)
        self.phase = Phase.ELECTED
        out: list[ProposerAction] = [Elected(self.term, end, prev)]
        for p in self.peers.values():
            if p.vote is not None:
                out += self._start_peer(now, p)
        return out + self._pump(now)

    def _divergence(self, vote: VoteResponse) -> Lsn:
        """Where the voter's log stops being a prefix of ours (the highest common point)."""
        mine, theirs = self.history, vote.term_history
        i = 0
        while i < len(mine) and i < len(theirs) and mine[i].term == theirs[i].term:
            assert mine[i].start_lsn == theirs[i].start_lsn, (mine[i], theirs[i])
            i += 1
        if i == 0:
            return self.timeline_start_lsn
        theirs_end = theirs[i].start_lsn if i < len(theirs) else vote.last_record_end
        mine_end = mine[i].start_lsn if i < len(mine) else self.end_lsn
        return min(theirs_end, mine_end)

    def _elected_msg(self, start: Lsn) -> ProposerElected:
        return ProposerElected(self.term, start, self.history)

    def _start_peer(self, now: float, peer: _Peer) -> list[ProposerAction]:
        assert peer.vote is not None and self.phase is Phase.ELECTED
        start = self._divergence(peer.vote)
        assert start <= self.term_start_lsn, (start, self.term_start_lsn)
        peer.start_at = start
        peer.sent_lsn = start
        return [self._send(peer, self._elected_msg(start), now)]

    def _on_read_wal(self, now: float, peer: _Peer, msg: ReadWalResponse) -> list[ProposerAction]:
        if msg.term > self.term:
            return self._fence(msg.term)
        fetch = self.fetch
        if (fetch is None or msg.term != self.term or not msg.data or fetch.donor != peer.node
                or msg.start_lsn != fetch.pos or msg.start_lsn + len(msg.data) > fetch.end):
            return []  # refused, stale or repeated: tick() retries
        fetch.data += msg.data
        if fetch.pos < fetch.end:
            return self._fetch_next(now)
        assert fetch.end == self.wal_start, (fetch.end, self.wal_start)
        self.wal[:0] = fetch.data
        self.wal_start = fetch.start
        self.fetch = None
        return self._pump(now)

    def _fetch_next(self, now: float) -> list[ProposerAction]:
        fetch = self.fetch
        assert fetch is not None
        if fetch.donor is None:
            donors = [p.node for p in self.peers.values()
                      if p.synced and p.record_end >= fetch.end]
            if fetch.end <= self.term_start_lsn:
                donors.append(self.donor)  # its log up to E is ours while it keeps our term
            if not donors:
                return []
            fetch.donor = self.rng.choice(donors)
        fetch.last_send_s = now
        end = min(fetch.end, fetch.pos + self.config.max_read_bytes)
        return [Send(fetch.donor, ReadWalRequest(self.term, fetch.pos, end))]

    # --- streaming and commit -----------------------------------------------------------------
    def _on_append_response(self, now: float, peer: _Peer,
                            msg: AppendResponse) -> list[ProposerAction]:
        if msg.term > self.term:
            return self._fence(msg.term)
        if self.phase is not Phase.ELECTED or msg.log_term != self.term:
            return []  # has not adopted our election yet: tick() resends ProposerElected
        assert peer.start_at is not None, peer
        if not peer.synced:
            peer.synced = True
            peer.flush_lsn = msg.flush_lsn
        if msg.flush_lsn > peer.flush_lsn or msg.last_record_end > peer.record_end:
            peer.last_progress_s = now
            if self.config.pull is not None and peer.synced and msg.flush_lsn > peer.flush_lsn:
                # It pulled WAL: the stream is not idle (the heartbeat persists the commit
                # LSN only once it is, as with appended WAL).
                peer.last_data_s = now
        peer.flush_lsn = max(peer.flush_lsn, msg.flush_lsn)
        peer.reported_flush = msg.flush_lsn
        peer.record_end = max(peer.record_end, msg.last_record_end)
        peer.durable_commit = max(peer.durable_commit, msg.commit_lsn)
        peer.sent_lsn = max(peer.sent_lsn, msg.flush_lsn)
        out: list[ProposerAction] = []
        if self.config.pull is None:
            assert peer.flush_lsn <= self.end_lsn, (peer.node, peer.flush_lsn, self.end_lsn)
        elif msg.flush_lsn < self.term_start_lsn:
            peer.pull_sent = False  # not at E yet (a PullFrom then starts nothing): recover
        elif not peer.pull_sent and self.pull_ready:
            out += self._pull_from(now, peer)
        if self.config.pull is not None and msg.flush_lsn >= self.end_lsn:
            # Pull feedback (one per fsync batch of each safekeeper): the new commit LSN
            # goes out from `tick` only, coalesced (one commit-only append per acceptor per
            # tick, not one per feedback); answers of a recovery still pump the WAL.
            return out + self._advance_commit()
        return out + self._advance_commit() + self._pump(now)

    def _advance_commit(self) -> list[ProposerAction]:
        ends = sorted((p.record_end for p in self.peers.values() if p.synced), reverse=True)
        q = self.config.quorum
        out: list[ProposerAction] = []
        # Only a majority that holds this term's log up to its start or beyond carries a
        # commit: below the term start, their log term is an older one (Raft's rule that a
        # leader commits only entries of its own term).
        if len(ends) >= q and ends[q - 1] >= self.term_start_lsn and ends[q - 1] > self.commit_lsn:
            self.commit_lsn = ends[q - 1]
            out.append(CommitAdvanced(self.commit_lsn))
        if self.config.sync and self.commit_lsn >= self.term_start_lsn:
            durable = [p for p in self.peers.values()
                       if p.synced and p.durable_commit >= self.term_start_lsn]
            if len(durable) >= q:
                self.phase = Phase.DONE
                out.append(SyncDone(self.term_start_lsn, self.term_start_prev))
        return out

    def _pump(self, now: float, *, everyone: bool = False) -> list[ProposerAction]:
        """Send each synced acceptor the WAL and commit LSN it lacks, within its window
        (the `deferred` one only when `everyone`)."""
        if self.phase is not Phase.ELECTED:
            return []
        skip = None if everyone else self.deferred
        if skip is not None and sum(1 for p in self.peers.values()
                                    if p.synced and p.node != skip) < self.config.quorum:
            skip = None
        out: list[ProposerAction] = []
        need = [p.sent_lsn for p in self.peers.values()
                if p.start_at is not None and p.sent_lsn < self.wal_start]
        if need and self.fetch is None:
            self.fetch = _Fetch(min(need), self.wal_start)
            out += self._fetch_next(now)
        c = self.config
        end = self.end_lsn
        pieces: dict[tuple[int, int], bytes] = {}  # one copy of a piece for every peer
        for p in self.peers.values():
            if not p.synced or p.sent_lsn < self.wal_start or p.node == skip:
                continue
            while p.sent_lsn < end and p.sent_lsn - p.flush_lsn < c.max_inflight_bytes:
                size = min(c.max_append_bytes, end - p.sent_lsn,
                           c.max_inflight_bytes - (p.sent_lsn - p.flush_lsn))
                off = p.sent_lsn - self.wal_start
                data = pieces.get((off, size))
                if data is None:
                    data = pieces[(off, size)] = bytes(self.wal[off:off + size])
                out.append(self._send(p, AppendRequest(self.term, p.sent_lsn, self.commit_lsn,
                                                       data, c.sync), now))
                p.sent_lsn += size
                p.sent_commit = self.commit_lsn
                p.last_data_s = now
            if p.sent_commit < self.commit_lsn:
                persist = c.sync or p.persist_due
                out.append(self._send(p, AppendRequest(self.term, p.sent_lsn, self.commit_lsn,
                                                       b"", persist), now))
                p.sent_commit = self.commit_lsn
                p.persist_due = False
        self._release()
        return out

    def _release(self) -> None:
        """Drop committed WAL that every started acceptor has acknowledged."""
        if self.config.pull is not None:
            return  # it holds only the recovery up to the term start; they pull the rest
        held = [p.record_end if p.synced else (p.start_at or Lsn(0))
                for p in self.peers.values() if p.start_at is not None]
        upto = min([self.commit_lsn, *held])
        if upto - self.wal_start >= self.config.release_bytes and self.fetch is None:
            del self.wal[:upto - self.wal_start]
            self.wal_start = upto

    # --- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        if self.phase in (Phase.GREETING, Phase.VOTING):
            return
        assert self.history[-1] == TermEntry(self.term, self.term_start_lsn,
                                             self.term_start_prev), self.history
        end = self.end_lsn
        assert self.timeline_start_lsn <= self.wal_start <= end, (
            self.timeline_start_lsn, self.wal_start, end)
        pulled = self.config.pull is not None  # acceptors go past our end on their own
        assert pulled or self.commit_lsn <= end, (self.commit_lsn, end)
        for p in self.peers.values():
            if p.synced:
                assert p.start_at is not None and p.start_at <= p.flush_lsn, p
                assert p.record_end <= p.flush_lsn and (pulled or p.flush_lsn <= end), p
                assert p.reported_flush <= p.flush_lsn and (pulled or p.sent_lsn <= end), p
            assert not p.pull_sent or (p.synced and p.flush_lsn >= self.term_start_lsn), p
        if self.fetch is not None:
            assert self.fetch.start <= self.fetch.pos <= self.fetch.end == self.wal_start, \
                self.fetch

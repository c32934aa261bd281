"""The acceptor core, message by message: it persists a vote before granting it, grants a
term once, truncates a divergent tail durably before adopting a new history and never again
in the same term, writes only WAL that connects at its end, tracks record ends, caps its
commit LSN at them and makes it durable on a commit-only append, serves WAL only in its
term, and a restart from its durable state finds the same positions. Pull mode: PullFrom
is taken only in the promised, adopted term and at or below the flush LSN, pulled WAL is an
append of that term, a PullLimit holds only what the compute is told, and a higher promise
closes the pull first."""

from __future__ import annotations

import random

import pytest

from sim.walgen import SYSID, WalGenerator
from strata.common.errors import ProtocolError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper.acceptor import (
    Acceptor,
    AcceptorAction,
    AcceptorState,
    ClosePull,
    FlushWal,
    PersistControl,
    PullFeedback,
    PullSource,
    SendWal,
    StartPull,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    PullFrom,
    PullLimit,
    ReadWalRequest,
    ReadWalResponse,
    TermEntry,
    VoteRequest,
    VoteResponse,
)

SEG = 1 << 20
TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(range(16)))
START = 2 * SEG - 8192 + 400  # a record end mid-page, one page before a segment boundary
PREV = START - 80


def new_acceptor(*, commit_persist_bytes: int = 16 << 20, allow_pull: bool = False) -> Acceptor:
    state = AcceptorState.new_timeline(TENANT, TIMELINE, SYSID, SEG, Lsn(START), Lsn(PREV))
    return Acceptor(state, commit_persist_bytes=commit_persist_bytes, allow_pull=allow_pull)


def wal(n: int, seed: int = 0, start: int = START, prev: int = PREV) -> tuple[bytes, list[int]]:
    """`n` records after `start`; returns the bytes and the record starts."""
    gen = WalGenerator(start, prev, SEG)
    rng = random.Random(seed)
    pieces = [gen.random_record(rng) for _ in range(n)]
    return b"".join(p for _s, p in pieces), [s for s, _p in pieces]


def elect(acc: Acceptor, term: int, at: int = START, prev: int = PREV,
          history: tuple[TermEntry, ...] = ()) -> list[AcceptorAction]:
    acc.handle(VoteRequest(term, proposer_id=term * 10))
    return acc.handle(ProposerElected(term, Lsn(at),
                                      history + (TermEntry(term, Lsn(at), Lsn(prev)),)))


def reply(actions: list[AcceptorAction]) -> AppendResponse:
    last = actions[-1]
    assert isinstance(last, AppendResponse), actions
    return last


def test_greeting_checks_the_timeline_and_cluster() -> None:
    acc = new_acceptor()
    assert acc.handle(ProposerGreeting(TENANT, TIMELINE, SYSID, SEG, 7)) == [AcceptorGreeting(0)]
    with pytest.raises(ProtocolError, match="reached the acceptor of"):
        acc.handle(ProposerGreeting(TENANT, TimelineId(bytes(16)), SYSID, SEG, 7))
    with pytest.raises(ProtocolError, match="wrong cluster"):
        acc.handle(ProposerGreeting(TENANT, TIMELINE, SYSID + 1, SEG, 7))


def test_vote_is_persisted_before_it_is_granted_and_granted_once_per_term() -> None:
    acc = new_acceptor()
    actions = acc.handle(VoteRequest(3, proposer_id=1))
    assert isinstance(actions[0], PersistControl)
    assert (actions[0].state.term, actions[0].state.voted_for) == (3, 1)
    vote = actions[1]
    assert isinstance(vote, VoteResponse) and vote.granted and vote.term == 3
    assert (vote.flush_lsn, vote.last_record_end, vote.last_record_lsn) == \
        (Lsn(START), Lsn(START), Lsn(PREV))
    # The same proposer asking again (a duplicate or a reconnect) gets it again, no write.
    again = acc.handle(VoteRequest(3, proposer_id=1))
    assert len(again) == 1 and isinstance(again[0], VoteResponse) and again[0].granted
    # Another proposer that drew the same term, or a lower one, is refused.
    for term, pid in ((3, 2), (2, 5)):
        (refusal,) = acc.handle(VoteRequest(term, proposer_id=pid))
        assert isinstance(refusal, VoteResponse)
        assert not refusal.granted and refusal.term == 3


def test_append_before_election_or_in_a_stale_term_is_refused() -> None:
    acc = new_acceptor()
    data, _ = wal(3)
    acc.handle(VoteRequest(2, 1))
    resp = reply(acc.handle(AppendRequest(2, Lsn(START), Lsn(0), data)))
    assert resp.log_term == 0 and resp.flush_lsn == Lsn(START)
    elect(acc, 4)
    resp = reply(acc.handle(AppendRequest(2, Lsn(START), Lsn(0), data)))
    assert (resp.term, resp.log_term, resp.flush_lsn) == (4, 4, Lsn(START))


def test_append_writes_flushes_and_tracks_record_ends() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    data, starts = wal(20)
    cut = len(data) - 5  # the last record stays partial
    actions = acc.handle(AppendRequest(1, Lsn(START), Lsn(START), data[:cut]))
    assert actions[:2] == [WriteWal(Lsn(START), data[:cut]), FlushWal(Lsn(START + cut))]
    resp = reply(actions)
    assert resp.flush_lsn == Lsn(START + cut)
    assert resp.last_record_end == Lsn(starts[-1]) and acc.last_record_lsn == Lsn(starts[-2])
    # A duplicate that overlaps the end writes only the new bytes.
    actions = acc.handle(AppendRequest(1, Lsn(START), Lsn(START), data))
    assert actions[0] == WriteWal(Lsn(START + cut), data[cut:])
    assert reply(actions).last_record_end == Lsn(START + len(data))
    acc.check_invariants()


def test_a_gap_writes_nothing_and_tells_where_to_resume() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    data, _ = wal(5)
    actions = acc.handle(AppendRequest(1, Lsn(START + 8), Lsn(0), data[8:]))
    assert len(actions) == 1 and reply(actions).flush_lsn == Lsn(START)


def test_commit_is_capped_at_the_last_record_end_and_made_durable_when_idle() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    data, starts = wal(10)
    end = START + len(data)
    resp = reply(acc.handle(AppendRequest(1, Lsn(START), Lsn(end), data[:-3])))
    assert acc.commit_lsn == Lsn(starts[-1])  # the proposer's commit is past our last record
    assert resp.commit_lsn == Lsn(START)  # not persisted yet: WAL is still flowing
    actions = acc.handle(AppendRequest(1, Lsn(START + len(data) - 3), Lsn(end), data[-3:]))
    assert acc.commit_lsn == Lsn(end) and reply(actions).commit_lsn == Lsn(START)
    # A commit-only append persists nothing unless the proposer asks (sync, idle heartbeat).
    actions = acc.handle(AppendRequest(1, Lsn(end), Lsn(end), b""))
    assert reply(actions).commit_lsn == Lsn(START) and len(actions) == 1
    actions = acc.handle(AppendRequest(1, Lsn(end), Lsn(end), b"", persist_commit=True))
    assert isinstance(actions[0], PersistControl)
    state = actions[0].state
    assert state.commit_lsn == Lsn(end)
    assert (state.scan_lsn, state.scan_prev_lsn) == (Lsn(end), Lsn(starts[-1]))
    assert reply(actions).commit_lsn == Lsn(end)


def test_commit_persisted_every_commit_persist_bytes() -> None:
    acc = new_acceptor(commit_persist_bytes=4000)
    elect(acc, 1)
    data, _ = wal(40)
    persisted = 0
    for off in range(0, len(data), 1000):
        actions = acc.handle(AppendRequest(1, Lsn(START + off), Lsn(START + off),
                                           data[off:off + 1000]))
        persisted += sum(isinstance(a, PersistControl) for a in actions)
    assert persisted >= 3


def test_elected_truncates_a_divergent_tail_before_persisting_and_only_once() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    data, starts = wal(12)
    acc.handle(AppendRequest(1, Lsn(START), Lsn(starts[3]), data))
    acc.handle(AppendRequest(1, Lsn(START + len(data)), Lsn(starts[3]), b""))
    # Term 3's log took term 1's log up to starts[6] (a record end) and went elsewhere.
    t1 = TermEntry(1, Lsn(START), Lsn(PREV))
    history = (t1, TermEntry(2, Lsn(starts[6]), Lsn(starts[5])))
    actions = elect(acc, 3, at=starts[6] + 0, prev=starts[5], history=history)
    assert actions[0] == TruncateWal(Lsn(starts[6]))
    assert isinstance(actions[1], PersistControl)
    assert actions[1].state.term_history[-1].term == 3
    resp = reply(actions)
    assert (resp.log_term, resp.flush_lsn, resp.last_record_end) == \
        (3, Lsn(starts[6]), Lsn(starts[6]))
    assert acc.last_record_lsn == Lsn(starts[5])
    # Term 3's WAL arrives; a repeated ProposerElected must not cut it again.
    more, _ = wal(3, seed=9, start=starts[6], prev=starts[5])
    acc.handle(AppendRequest(3, Lsn(starts[6]), Lsn(0), more))
    repeat = acc.handle(ProposerElected(3, Lsn(starts[6]), actions[1].state.term_history))
    assert len(repeat) == 1 and reply(repeat).flush_lsn == Lsn(starts[6] + len(more))
    acc.check_invariants()


def test_elected_refuses_a_start_it_never_reported() -> None:
    acc = new_acceptor()
    acc.handle(VoteRequest(1, 10))
    with pytest.raises(ProtocolError, match="never reported"):
        acc.handle(ProposerElected(1, Lsn(START + 800), (TermEntry(1, Lsn(START + 800),
                                                                   Lsn(START)),)))
    stale = elect(new_acceptor(), 2)
    assert reply(stale).log_term == 2


def test_read_wal_only_in_its_term_and_within_its_wal() -> None:
    acc = new_acceptor()
    elect(acc, 2)
    data, _ = wal(4)
    acc.handle(AppendRequest(2, Lsn(START), Lsn(0), data))
    end = Lsn(START + len(data))
    assert acc.handle(ReadWalRequest(2, Lsn(START), end)) == [SendWal(2, Lsn(START), end)]
    assert acc.handle(ReadWalRequest(1, Lsn(START), end)) == \
        [ReadWalResponse(2, Lsn(START), b"")]
    with pytest.raises(ProtocolError, match="outside"):
        acc.handle(ReadWalRequest(2, Lsn(START), end + 8))


def test_damaged_wal_from_the_proposer_is_a_protocol_error() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    data, _ = wal(3)
    with pytest.raises(ProtocolError, match="damaged WAL"):
        acc.handle(AppendRequest(1, Lsn(START), Lsn(0), b"\x05\x00\x00\x00" + data[4:]))


def test_restart_from_durable_state_finds_the_same_positions() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    data, starts = wal(30, seed=4)
    half = len(data) // 2
    durable = [a.state for a in acc.handle(AppendRequest(1, Lsn(START), Lsn(0), data[:half]))
               if isinstance(a, PersistControl)]
    commit = acc.last_record_end
    acc.handle(AppendRequest(1, Lsn(START + half), commit, data[half:]))
    actions = acc.handle(AppendRequest(1, Lsn(START + len(data)), commit, b"", True))
    durable += [a.state for a in actions if isinstance(a, PersistControl)]
    state = durable[-1]
    # A restart re-reads only the WAL after a record end at the durable commit LSN.
    assert state.commit_lsn == commit and state.scan_lsn == commit
    again = Acceptor(state)
    again.recover_wal(data[state.scan_lsn.value - START:])
    again.check_invariants()
    assert (again.flush_lsn, again.last_record_end, again.last_record_lsn, again.log_term) == \
        (acc.flush_lsn, acc.last_record_end, acc.last_record_lsn, acc.log_term)


def test_restart_cuts_a_torn_tail_at_the_last_valid_record() -> None:
    """Unsynced WAL may survive a crash partly garbage; the tracker alone (no CRC) would
    count a damaged record, so recovery verifies records and cuts before the damage."""
    data, starts = wal(12, seed=6)
    state = AcceptorState.new_timeline(TENANT, TIMELINE, SYSID, SEG, Lsn(START), Lsn(PREV))
    torn = bytearray(data)
    torn[starts[9] - START + 30] ^= 0xFF  # inside record 9's body: its CRC fails
    acc = Acceptor(state)
    assert acc.recover_wal(bytes(torn)) == Lsn(starts[9])
    assert (acc.flush_lsn, acc.last_record_end, acc.last_record_lsn) == \
        (Lsn(starts[9]), Lsn(starts[9]), Lsn(starts[8]))
    # Garbage only in a record's zero padding: cut where the record's bytes end; its padding
    # comes again from the proposer.
    gen = WalGenerator(START, PREV, SEG)
    _s0, first = gen.record(bytes(10))  # 24 + 2 + 10 bytes: 4 bytes of padding
    _s1, second = gen.record(bytes(50))
    padded = bytearray(first + second)
    padded[37] = 1
    acc = Acceptor(state)
    assert acc.recover_wal(bytes(padded)) == Lsn(START + 36)
    assert acc.last_record_end == Lsn(START)  # that record is not complete until its padding
    acc.check_invariants()
    # Intact WAL is kept whole, a partial record at its end is not.
    acc = Acceptor(state)
    assert acc.recover_wal(data[:-3]) == Lsn(starts[-1])


# --- pull mode --------------------------------------------------------------------------------
def pull_from(term: int, start: int = START, slot: str = "sk1") -> PullFrom:
    return PullFrom(term, "compute", 5432, slot, Lsn(start))


def test_pull_is_refused_unless_the_acceptor_allows_it() -> None:
    acc = new_acceptor()
    elect(acc, 1)
    with pytest.raises(ProtocolError, match="without allow_pull"):
        acc.handle(pull_from(1))


def test_pull_from_only_in_the_promised_adopted_term_at_or_below_the_flush_lsn() -> None:
    acc = new_acceptor(allow_pull=True)
    acc.handle(VoteRequest(2, 20))
    # Promised but not adopted (no ProposerElected yet): refused like an append.
    assert acc.handle(pull_from(2)) == [acc._append_response()]
    assert acc.pull_source is None
    elect(acc, 2)
    data, _ = wal(4)
    acc.handle(AppendRequest(2, Lsn(START), Lsn(0), data))  # recovery from the proposer
    resp = acc._append_response()
    # A stale term, a start past what it holds: refused; the reply says where it is.
    for msg in (pull_from(1), pull_from(2, START + len(data) + 8)):
        assert acc.handle(msg) == [resp]
        assert acc.pull_source is None
    with pytest.raises(ProtocolError, match="before the term's start"):
        acc.handle(pull_from(2, START - 8))
    actions = acc.handle(pull_from(2))
    source = PullSource(2, "compute", 5432, "sk1")
    # The stream continues at the end of its WAL (all of it this term's), not at `start`.
    assert actions == [StartPull(source, Lsn(START + len(data))), resp]
    assert acc.pull_source == source
    acc.check_invariants()
    assert acc.handle(pull_from(2)) == [resp]  # a repeat starts nothing
    with pytest.raises(ProtocolError, match="already pulls from compute:5432 slot sk1"):
        acc.handle(pull_from(2, slot="sk2"))


def test_pull_limit_holds_what_the_compute_is_told_not_the_wal() -> None:
    acc = new_acceptor(allow_pull=True)
    elect(acc, 1)
    assert acc.handle(PullLimit(1, Lsn(START))) == []  # not pulling yet: nothing to hold
    acc.handle(pull_from(1))
    data, starts = wal(20)
    limit = Lsn(starts[5])
    assert acc.handle(PullLimit(1, limit)) == [PullFeedback(1, Lsn(START))]  # not past it
    actions = acc.pulled_wal(1, Lsn(START), data)
    # The WAL is written and fsynced as ever (the proposer's positions move); only the
    # flush LSN reported to the compute stops at the limit.
    assert actions == [WriteWal(Lsn(START), data), FlushWal(Lsn(START + len(data))),
                       PullFeedback(1, limit)]
    assert acc.append_response().flush_lsn == Lsn(START + len(data))
    # A lower limit never moves the report back; a higher one releases up to the flush.
    assert acc.handle(PullLimit(1, Lsn(START))) == []
    assert acc.pulled_wal(1, Lsn(START + len(data)), b"")[-1] == PullFeedback(1, limit)
    assert acc.handle(PullLimit(1, Lsn(starts[10]))) == [PullFeedback(1, Lsn(starts[10]))]
    assert acc.handle(PullLimit(1, Lsn(1 << 40))) == \
        [PullFeedback(1, Lsn(START + len(data)))]
    acc.check_invariants()
    # A stale term's limit is refused with the acceptor's term (that proposer is fenced);
    # a higher promise closes the pull and forgets the limit.
    actions = acc.handle(VoteRequest(2, 20))
    assert isinstance(actions[0], ClosePull) and acc.pull_limit is None
    assert acc.handle(PullLimit(1, Lsn(1 << 40))) == [acc.append_response()]
    assert acc.append_response().term == 2


def test_pulled_wal_is_an_append_of_the_pulled_term() -> None:
    acc = new_acceptor(allow_pull=True)
    elect(acc, 1)
    assert acc.pulled_wal(1, Lsn(START), b"x") == []  # no PullFrom yet
    acc.handle(pull_from(1))
    data, starts = wal(20)
    cut = len(data) - 5
    actions = acc.pulled_wal(1, Lsn(START), data[:cut])
    assert actions == [WriteWal(Lsn(START), data[:cut]), FlushWal(Lsn(START + cut)),
                       PullFeedback(1, Lsn(START + cut))]
    assert acc.last_record_end == Lsn(starts[-1])
    # An overlap adds only the new bytes; a gap writes nothing and reports where it is.
    actions = acc.pulled_wal(1, Lsn(START + 8), data[8:])
    assert actions[0] == WriteWal(Lsn(START + cut), data[cut:])
    assert actions[-1] == PullFeedback(1, Lsn(START + len(data)))
    more, _ = wal(3, seed=1, start=START + len(data), prev=starts[-1])
    assert acc.pulled_wal(1, Lsn(START + len(data) + 8), more[8:]) == \
        [PullFeedback(1, Lsn(START + len(data)))]
    # Pulled WAL carries no commit LSN (learning it is not built yet).
    assert acc.commit_lsn == Lsn(START)
    # Another term's bytes, even while pulling: nothing.
    assert acc.pulled_wal(2, Lsn(START + len(data)), more) == []
    with pytest.raises(ProtocolError, match="term 1 sent damaged WAL"):
        acc.pulled_wal(1, Lsn(START + len(data)), b"\xff" * 64)


def test_a_higher_promise_closes_the_pull_before_it_is_persisted() -> None:
    acc = new_acceptor(allow_pull=True)
    elect(acc, 1)
    acc.handle(pull_from(1))
    data, starts = wal(6)
    acc.pulled_wal(1, Lsn(START), data[:100])
    # A lower or equal term's vote request changes nothing.
    for term, pid in ((1, 99), (0, 5)):
        (refusal,) = acc.handle(VoteRequest(term, pid))
        assert isinstance(refusal, VoteResponse) and not refusal.granted
    assert acc.pull_source is not None
    actions = acc.handle(VoteRequest(2, 20))
    assert actions[0] == ClosePull(1)
    assert isinstance(actions[1], PersistControl) and actions[1].state.term == 2
    assert acc.pull_source is None
    acc.check_invariants()
    # The old term's bytes that were still on their way are refused: not written, not acked.
    assert acc.pulled_wal(1, Lsn(START + 100), data[100:]) == []
    assert acc.flush_lsn == Lsn(START + 100)
    # The vote reported the log it had when it promised, and that is all it ever acked in 1.
    vote = actions[-1]
    assert isinstance(vote, VoteResponse) and vote.flush_lsn == Lsn(START + 100)


def test_a_higher_election_closes_the_pull_before_truncating() -> None:
    acc = new_acceptor(allow_pull=True)
    elect(acc, 1)
    acc.handle(pull_from(1))
    data, starts = wal(6)
    acc.pulled_wal(1, Lsn(START), data)
    # Term 3's ProposerElected arrives without our vote (it learned the term otherwise).
    actions = acc.handle(ProposerElected(3, Lsn(starts[2]), (
        TermEntry(1, Lsn(START), Lsn(PREV)), TermEntry(3, Lsn(starts[2]), Lsn(starts[1])))))
    assert actions[:3] == [ClosePull(1), TruncateWal(Lsn(starts[2])), PersistControl(acc.state)]
    assert acc.pulled_wal(1, Lsn(starts[2]), data[starts[2] - START:]) == []
    # Term 3 may pull now, from its start.
    assert acc.handle(pull_from(3, starts[2]))[0] == \
        StartPull(PullSource(3, "compute", 5432, "sk1"), Lsn(starts[2]))
    acc.check_invariants()


def test_a_restarted_acceptor_pulls_only_when_told_again() -> None:
    acc = new_acceptor(allow_pull=True)
    elect(acc, 1)
    acc.handle(pull_from(1))
    data, _ = wal(5)
    acc.pulled_wal(1, Lsn(START), data)
    again = Acceptor(acc.state, allow_pull=True)
    again.recover_wal(data)
    assert again.pull_source is None
    assert again.pulled_wal(1, Lsn(START + len(data)), b"") == []
    assert again.handle(pull_from(1))[0] == \
        StartPull(PullSource(1, "compute", 5432, "sk1"), Lsn(START + len(data)))
    again.check_invariants()

"""The proposer core: it picks a term above every greeting of a majority, elects itself on a
majority of votes, picks the most advanced log by last term before length, sends each voter
the point where its log diverges, recovers missing WAL from the donor, commits only record
ends held by a majority at or past its term start, is fenced by any higher term, and in sync
mode reports the agreed end once a majority holds it as a durable commit LSN. Driven against
real `Acceptor` cores over an in-memory, in-order network (the simulator adds the faults)."""

from __future__ import annotations

import random
from pathlib import Path

import zstandard

from acceptor_cores import SEG, CoreCluster, elected
from acceptor_cores import proposer_config as config
from sim.walgen import SYSID, WalGenerator
from strata.common.lsn import Lsn
from strata.pg.walreader import WalStreamDecoder
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ReadWalRequest,
    ReadWalResponse,
    TermEntry,
    VoteRequest,
    VoteResponse,
)
from strata.safekeeper.proposer import (
    CommitAdvanced,
    Elected,
    Fenced,
    Phase,
    Proposer,
    Send,
    SyncDone,
)

START = 5 * SEG - 2 * 8192 + 1000
PREV = START - 64


class Cluster(CoreCluster):
    """Acceptor cores with memory disks behind a perfect in-order network."""

    def __init__(self, start: int = START, prev: int = PREV, sysid: int = SYSID) -> None:
        super().__init__(start, prev, sysid=sysid)


def test_term_is_above_every_greeting_of_a_majority() -> None:
    p = Proposer(config(), random.Random(0))
    sends = p.start(0.0)
    assert [s.node for s in sends if isinstance(s, Send)] == [1, 2, 3]
    assert p.handle(0.0, 1, AcceptorGreeting(4)) == []
    out = p.handle(0.0, 3, AcceptorGreeting(7))
    assert out == [Send(1, VoteRequest(8, 1)), Send(3, VoteRequest(8, 1))]
    assert p.phase is Phase.VOTING
    # A late greeting gets its vote request too.
    assert p.handle(0.1, 2, AcceptorGreeting(2)) == [Send(2, VoteRequest(8, 1))]


def vote(term: int, end: int, history: tuple[TermEntry, ...], prev: int) -> VoteResponse:
    return VoteResponse(term, True, Lsn(end), Lsn(end), Lsn(prev), Lsn(START), Lsn(START),
                        history)


def test_election_prefers_the_last_term_over_length_and_recovers_from_the_donor() -> None:
    p = Proposer(config(), random.Random(0))
    p.start(0.0)
    p.handle(0.0, 1, AcceptorGreeting(2))
    p.handle(0.0, 2, AcceptorGreeting(2))
    t1 = TermEntry(1, Lsn(START), Lsn(PREV))
    t2 = TermEntry(2, Lsn(START + 504), Lsn(START + 400))
    # Node 1 has a longer log of term 1; node 2 a shorter one that term 2 extended.
    assert p.handle(0.0, 1, vote(3, START + 2000, (t1,), START + 1900)) == []
    out = p.handle(0.0, 2, vote(3, START + 600, (t1, t2), START + 560))
    assert elected(out) == Elected(3, Lsn(START + 600), Lsn(START + 560))
    history = (t1, t2, TermEntry(3, Lsn(START + 600), Lsn(START + 560)))
    # Node 1 diverges where term 2 began; the donor is in step at the agreed end.
    assert Send(1, ProposerElected(3, Lsn(START + 504), history)) in out
    assert Send(2, ProposerElected(3, Lsn(START + 600), history)) in out
    # Node 1 needs [START+504, START+600), which only the donor has: fetch it.
    assert Send(2, ReadWalRequest(3, Lsn(START + 504), Lsn(START + 600))) in out
    out = p.handle(0.1, 1, AppendResponse(3, 3, Lsn(START + 504), Lsn(START + 504), Lsn(START)))
    assert out == []  # nothing to send it before the WAL arrives
    out = p.handle(0.2, 2, ReadWalResponse(3, Lsn(START + 504), bytes(96)))
    appends = [s.msg for s in out if isinstance(s, Send) and isinstance(s.msg, AppendRequest)]
    assert [a.begin_lsn for a in appends] == [Lsn(START + 504)]
    assert len(out) == 1 and appends[0].data == bytes(96)
    p.check_invariants()


def test_commit_needs_a_majority_at_or_past_the_term_start() -> None:
    p = Proposer(config(), random.Random(0))
    p.start(0.0)
    p.handle(0.0, 1, AcceptorGreeting(2))
    p.handle(0.0, 2, AcceptorGreeting(2))
    t1 = TermEntry(1, Lsn(START), Lsn(PREV))
    t2 = TermEntry(2, Lsn(START + 504), Lsn(START + 400))
    p.handle(0.0, 1, vote(3, START + 2000, (t1,), START + 1900))
    p.handle(0.0, 2, vote(3, START + 600, (t1, t2), START + 560))
    out = p.handle(0.1, 1, AppendResponse(3, 3, Lsn(START + 504), Lsn(START + 504), Lsn(START)))
    out += p.handle(0.1, 2, AppendResponse(3, 3, Lsn(START + 600), Lsn(START + 600), Lsn(START)))
    # Both hold WAL up to START+504, but not in term 3: no commit yet (Raft's rule).
    assert not [e for e in out if isinstance(e, CommitAdvanced)]
    p.handle(0.2, 2, ReadWalResponse(3, Lsn(START + 504), bytes(96)))
    out = p.handle(0.3, 1, AppendResponse(3, 3, Lsn(START + 600), Lsn(START + 600), Lsn(START)))
    assert CommitAdvanced(Lsn(START + 600)) in out


def test_higher_terms_fence() -> None:
    for answer in (AppendResponse(9, 9, Lsn(START), Lsn(START), Lsn(START)),
                   VoteResponse(3, False, Lsn(START), Lsn(START), Lsn(PREV), Lsn(START),
                                Lsn(START), ()),
                   ReadWalResponse(9, Lsn(START), b"")):
        p = Proposer(config(), random.Random(0))
        p.start(0.0)
        p.handle(0.0, 1, AcceptorGreeting(2))
        p.handle(0.0, 2, AcceptorGreeting(2))
        assert p.handle(0.0, 3, answer) == [Fenced(answer.term)], answer
        assert p.phase is Phase.FENCED
        assert p.handle(0.0, 1, vote(3, START, (), PREV)) == []
        assert p.tick(10.0) == []


def stream(cluster: Cluster, p: Proposer, records: int, seed: int = 0) -> int:
    """The compute writes `records` records, each reaching the proposer in two pieces."""
    if cluster.gen is None:
        e = elected(cluster.events)
        cluster.gen = WalGenerator(e.start_lsn.value, e.prev_record_lsn.value, SEG)
    gen = cluster.gen
    rng = random.Random(seed)
    for _ in range(records):
        _start, data = gen.random_record(rng)
        cluster.take(p.append_wal(cluster.now, data[:7]))
        cluster.take(p.append_wal(cluster.now, data[7:]))
        cluster.run(p)
    return int(gen.end_lsn)


def test_streaming_commits_with_a_majority_only() -> None:
    cluster = Cluster()
    cluster.down = {3}
    p = Proposer(config(max_append_bytes=3000), random.Random(1))
    cluster.take(p.start(0.0))
    cluster.run(p)
    end = stream(cluster, p, 40)
    commits = [e.commit_lsn for e in cluster.events if isinstance(e, CommitAdvanced)]
    assert commits[-1] == Lsn(end) and commits == sorted(commits)
    assert cluster.wal[1] == cluster.wal[2] and len(cluster.wal[1]) == end - START
    # A second acceptor down: WAL still flows to the last one, but nothing commits.
    cluster.down = {2, 3}
    before = len(cluster.events)
    end2 = stream(cluster, p, 10, seed=2)
    assert not [e for e in cluster.events[before:] if isinstance(e, CommitAdvanced)]
    assert len(cluster.wal[1]) == end2 - START
    # Node 3 comes back: ticks resend the election and the WAL; commit catches up.
    cluster.down = set()
    for _ in range(6):
        cluster.tick(p, 1.0)
    assert p.commit_lsn == Lsn(end2)
    assert cluster.wal[3] == cluster.wal[1]


def test_a_deferred_acceptor_gets_wal_only_from_the_tick() -> None:
    """The acceptor the driver defers gets WAL and commit LSNs only from `tick`; the other
    two commit every record meanwhile. While fewer than a majority of the others are synced
    the deferred one is not skipped (commits would wait for the tick)."""
    cluster = Cluster()
    p = Proposer(config(), random.Random(6))
    cluster.take(p.start(0.0))
    cluster.run(p)
    p.deferred = 3
    end = stream(cluster, p, 20)
    assert p.commit_lsn == Lsn(end)
    assert len(cluster.wal[1]) == len(cluster.wal[2]) == end - START
    assert len(cluster.wal[3]) == 0
    cluster.tick(p, 0.02)
    assert cluster.wal[3] == cluster.wal[1]
    assert cluster.acceptors[3].commit_lsn == Lsn(end)

    cluster = Cluster()
    cluster.down = {2}  # never synced
    p = Proposer(config(), random.Random(7))
    cluster.take(p.start(0.0))
    cluster.run(p)
    p.deferred = 3
    end = stream(cluster, p, 5)
    assert p.commit_lsn == Lsn(end) and len(cluster.wal[3]) == end - START


def test_late_acceptor_gets_released_wal_from_a_peer() -> None:
    cluster = Cluster()
    cluster.down = {3}
    p = Proposer(config(release_bytes=1, max_read_bytes=5000), random.Random(2))
    cluster.take(p.start(0.0))
    cluster.run(p)
    end = stream(cluster, p, 30)
    assert p.wal_start > Lsn(START)  # committed WAL left memory
    cluster.down = set()
    for _ in range(6):
        cluster.tick(p, 1.0)
    assert cluster.wal[3] == cluster.wal[1] and len(cluster.wal[3]) == end - START
    assert p.commit_lsn == Lsn(end)


def test_sync_mode_reports_the_agreed_end_once_it_is_a_durable_commit() -> None:
    cluster = Cluster()
    writer = Proposer(config(), random.Random(3))
    cluster.take(writer.start(0.0))
    cluster.run(writer)
    end = stream(cluster, writer, 12)
    cluster.events.clear()  # the writer dies here
    sync = Proposer(config(proposer_id=2, sync=True), random.Random(4))
    cluster.take(sync.start(cluster.now))
    cluster.run(sync)
    done = [e for e in cluster.events if isinstance(e, SyncDone)]
    assert len(done) == 1 and done[0].end_lsn == Lsn(end)
    assert done[0].prev_record_lsn == cluster.acceptors[1].last_record_lsn
    assert sum(s.commit_lsn == Lsn(end) for s in cluster.durable.values()) >= 2
    assert sync.phase is Phase.DONE


def test_tick_resends_what_was_lost() -> None:
    cluster = Cluster()
    p = Proposer(config(), random.Random(5))
    p.start(0.0)  # every greeting lost
    cluster.tick(p, 0.1)
    assert p.phase is Phase.GREETING  # too early to retry
    cluster.tick(p, 1.0)
    assert p.phase.value == "elected"


def sync_once(cluster: Cluster, proposer_id: int) -> SyncDone:
    cluster.events.clear()
    p = Proposer(config(proposer_id=proposer_id, sync=True), random.Random(proposer_id))
    cluster.take(p.start(cluster.now))
    cluster.run(p)
    for _ in range(5):
        cluster.tick(p, 1.0)
    done = [e for e in cluster.events if isinstance(e, SyncDone)]
    assert len(done) == 1, cluster.events
    return done[0]


def test_an_acceptor_that_holds_a_term_start_claims_that_term() -> None:
    """The scenario behind `log_term` counting an entry that starts exactly at the log end.

    Term 2 extends a short term-1 log on node 3 only. Sync term 3 then recovers node 1 to the
    longer term-1 log of node 2 and commits its end E with no WAL of its own. Nodes 1 and 2
    hold E with the entry (3, E): their log term is 3, so term 4 (votes of nodes 1 and 3)
    keeps E. Were their log term 1 (the entry not counted), term 4 would pick node 3's
    term-2 log and truncate the committed end on node 1, leaving it on node 2 alone.
    """
    cluster = Cluster()
    writer = Proposer(config(proposer_id=1), random.Random(1))
    cluster.take(writer.start(0.0))
    cluster.run(writer)
    short_end = stream(cluster, writer, 5)
    cluster.down = {1, 3}
    end = stream(cluster, writer, 5, seed=1)
    assert len(cluster.wal[2]) == end - START and len(cluster.wal[1]) == short_end - START
    # Term 2: votes of nodes 1 and 3; its election reaches node 3 only, which takes new WAL.
    cluster.down = {2}
    cluster.cut = {(2, 1)}
    cluster.events.clear()
    cluster.gen = None
    p2 = Proposer(config(proposer_id=2), random.Random(2))
    cluster.take(p2.start(cluster.now))
    cluster.run(p2)
    assert elected(cluster.events).start_lsn == Lsn(short_end)
    stream(cluster, p2, 4, seed=2)
    assert cluster.acceptors[3].log_term == 2 and cluster.acceptors[1].log_term == 1
    # Term 3 (sync): nodes 1 and 2; commits the end of node 2's term-1 log.
    cluster.down = {3}
    cluster.cut = set()
    done = sync_once(cluster, 3)
    assert done.end_lsn == Lsn(end)
    committed = bytes(cluster.wal[2])
    assert cluster.acceptors[1].log_term == 3
    # Term 4 (sync): nodes 1 and 3. The committed end must survive.
    cluster.down = {2}
    done = sync_once(cluster, 4)
    assert done.end_lsn == Lsn(end)
    assert bytes(cluster.wal[1]) == committed and bytes(cluster.wal[3]) == committed


def test_real_postgresql_wal_commits_at_its_record_ends() -> None:
    """Real PostgreSQL 15 WAL (the walreader fixture: records across pages and segments, an
    XLOG_SWITCH) streamed in odd pieces: every commit LSN is a record end the reader finds,
    and the quorum ends with the WAL byte for byte."""
    fixture = Path(__file__).parent / "data" / "walreader_1mb.zst"
    raw = zstandard.ZstdDecompressor().decompress(fixture.read_bytes(), max_output_size=1 << 26)
    head, _, data = raw.partition(b"\n")
    first, seg_text, _count = head.decode().split()
    assert int(seg_text) == SEG
    base = int(first[16:], 16) * SEG
    sysid = int.from_bytes(data[24:32], "little")  # the long page header's xlp_sysid
    decoder = WalStreamDecoder(Lsn(base), SEG, zero_is_end=True, sysid=sysid)
    decoder.feed(data)
    records = list(decoder)
    ends = {r.end_lsn for r in records}
    start, prev = records[0].end_lsn, records[0].lsn
    stream_end = records[-1].end_lsn
    cluster = Cluster(start=start, prev=prev, sysid=sysid)
    p = Proposer(config(system_id=sysid, max_append_bytes=5000), random.Random(7))
    cluster.take(p.start(0.0))
    cluster.run(p)
    assert elected(cluster.events).start_lsn == Lsn(start)
    rng = random.Random(8)
    off = start - base
    while off < stream_end - base:
        size = rng.choice((1, 100, 3000, 9000, 40000))
        cluster.take(p.append_wal(cluster.now, data[off:min(off + size, stream_end - base)]))
        cluster.run(p)
        off += size
    commits = [e.commit_lsn.value for e in cluster.events if isinstance(e, CommitAdvanced)]
    assert len(commits) > 50 and set(commits) <= ends, set(commits) - ends
    assert commits[-1] == stream_end
    for node in (1, 2, 3):
        assert bytes(cluster.wal[node]) == data[start - base:stream_end - base]

"""The proposer core in pull mode, against the real acceptor cores (`allow_pull=True`).

After the election and the recovery up to the term start E (unchanged), every voter whose
flush LSN reached E gets `PullFrom(term, host, port, sk<node>, E)`, once per connection
(again after a new greeting: a restarted safekeeper forgot its source); the proposer sends
no WAL itself past E. A compute's walsenders feed each pulling acceptor (`pulled_wal`), and
each acceptor answers its proposer one `AppendResponse` per fsync batch (the feedback of
/work/briefs/pull-interface.md): the proposer's commit LSN is the majority-th highest record
end at or past E, and goes back to the acceptors in commit-only appends. One acceptor down:
commits go on; two: they wait, and catch up when one is back; a higher term fences.
Backpressure: `limit_pull` sends `PullLimit` to every pulling acceptor, right after each
`PullFrom` too (a restarted acceptor forgot it), and never lowers it.
In-memory network in order, like tests/unit/test_proposer.py."""

from __future__ import annotations

import random

import pytest

from acceptor_cores import SEG, CoreCluster, elected, proposer_config
from sim.walgen import WalGenerator
from strata.common.errors import UserError
from strata.common.lsn import Lsn
from strata.safekeeper.messages import (
    AppendRequest,
    PullFrom,
    PullLimit,
)
from strata.safekeeper.proposer import (
    CommitAdvanced,
    Elected,
    Fenced,
    Phase,
    Proposer,
    ProposerConfig,
    PullTarget,
    pull_slot_name,
)

START = 3 * SEG - 8192 + 600
PREV = START - 64
TARGET = PullTarget("/run/strata/main.sock", 55432)


def config(**kwargs: object) -> ProposerConfig:
    return proposer_config(**{"pull": TARGET, **kwargs})


class PullCluster(CoreCluster):
    """Acceptor cores on memory disks, an in-order network to one proposer, and the
    compute's WAL (`log`) that pulling acceptors replicate when `pull()` is called."""

    def __init__(self) -> None:
        super().__init__(START, PREV, allow_pull=True)
        self.log = bytearray()  # the compute's WAL from E
        self.term_start = 0

    def write(self, records: int, seed: int = 0) -> int:
        """The compute writes `records` records; returns the end of its WAL."""
        if self.gen is None:
            e = next(e for e in self.events if isinstance(e, Elected))
            self.term_start = e.start_lsn.value
            self.gen = WalGenerator(e.start_lsn.value, e.prev_record_lsn.value, SEG)
        rng = random.Random(seed)
        for _ in range(records):
            self.log += self.gen.random_record(rng)[1]
        return int(self.gen.end_lsn)

    def pull(self, p: Proposer, chunk: int = 700) -> None:
        """Every pulling acceptor that is up replicates what it lacks of the compute's WAL,
        in XLogData pieces of `chunk` bytes, and answers its proposer once per batch; then
        the driver's timer ticks (20 ms), which sends the commit LSN."""
        for node, start in sorted(self.pulling.items()):
            if node in self.down:
                continue
            acc = self.acceptors[node]
            pos = acc.flush_lsn.value
            end = self.term_start + len(self.log)
            while pos < end:
                piece = bytes(self.log[pos - self.term_start:pos - self.term_start + chunk])
                self.execute(node, acc.pulled_wal(start.source.term, Lsn(pos), piece))
                pos += len(piece)
            self.queue.append((node, 0, acc._append_response()))
        self.run(p)
        self.tick(p, 0.02)

    def reconnect(self, p: Proposer, node: int) -> None:
        """A new proposer connection to `node`: our greeting, its answer."""
        self.queue.append((0, node, p._greeting()))
        self.run(p)

    def pull_froms(self, node: int | None = None) -> list[tuple[int, PullFrom]]:
        return [(n, m) for n, m in self.sent
                if isinstance(m, PullFrom) and (node is None or n == node)]


def elect(cluster: PullCluster, p: Proposer) -> Elected:
    """Elected; then (the driver checked the compute's start) told to pull."""
    cluster.take(p.start(0.0))
    cluster.run(p)
    e = elected(cluster.events)
    cluster.take(p.start_pulling(cluster.now))
    cluster.run(p)
    return e


def commits(cluster: PullCluster) -> list[Lsn]:
    return [e.commit_lsn for e in cluster.events if isinstance(e, CommitAdvanced)]


def test_after_the_election_every_voter_is_told_to_pull_from_the_term_start() -> None:
    cluster = PullCluster()
    p = Proposer(config(), random.Random(1))
    # Not before the driver checked the compute's start (its slots at E), ticks or not.
    cluster.take(p.start(0.0))
    cluster.run(p)
    cluster.tick(p, 1.0)
    assert p.phase is Phase.ELECTED and cluster.pull_froms() == [] and not cluster.pulling
    cluster.take(p.start_pulling(cluster.now, "c0ffee"))
    cluster.run(p)
    e = next(e for e in cluster.events if isinstance(e, Elected))
    froms = cluster.pull_froms()
    assert sorted(n for n, _ in froms) == [1, 2, 3]
    for node, msg in froms:
        # The compute the driver checked, by its id: an acceptor pulls from no other one.
        assert msg == PullFrom(e.term, TARGET.host, TARGET.port, pull_slot_name(node),
                               e.start_lsn, "c0ffee")
        assert cluster.pulling[node].source.slot_name == f"sk{node}"
        assert cluster.pulling[node].source.compute_id == "c0ffee"
    end = cluster.write(30)
    cluster.pull(p)
    assert commits(cluster)[-1] == Lsn(end) and p.commit_lsn == Lsn(end)
    # The proposer sent no WAL: only empty appends (the commit LSN) went out.
    appends = [m for _, m in cluster.sent if isinstance(m, AppendRequest)]
    assert appends and all(not a.data for a in appends)
    assert max(a.commit_lsn for a in appends) == Lsn(end)
    for node in (1, 2, 3):
        assert len(cluster.wal[node]) == end - START
        assert cluster.acceptors[node].commit_lsn == Lsn(end)
    # Nothing moved: no more PullFrom, no commit-only append.
    before = len(cluster.sent)
    cluster.pull(p)
    assert cluster.sent[before:] == []
    # Feedback alone sends nothing: the commit LSN goes out at the tick, one commit-only
    # append per acceptor however many answers came.
    cluster.write(5, seed=9)
    for node, start in sorted(cluster.pulling.items()):
        acc = cluster.acceptors[node]
        pos = acc.flush_lsn.value
        for piece in (cluster.log[pos - cluster.term_start:][:100],
                      cluster.log[pos - cluster.term_start + 100:]):
            cluster.execute(node, acc.pulled_wal(start.source.term, Lsn(pos), bytes(piece)))
            pos += len(piece)
            cluster.queue.append((node, 0, acc._append_response()))
    cluster.run(p)
    assert cluster.sent[before:] == [] and p.commit_lsn == Lsn(cluster.term_start +
                                                              len(cluster.log))
    cluster.tick(p, 0.02)
    assert sorted(n for n, m in cluster.sent[before:] if isinstance(m, AppendRequest)) == \
        [1, 2, 3]
    before = len(cluster.sent)
    # While WAL keeps coming, heartbeats do not ask for a durable commit LSN; once the
    # stream is idle, one does.
    for seed in range(1, 4):
        cluster.tick(p, 0.3)
        end = cluster.write(3, seed=seed)
        cluster.pull(p)
    busy = [m for _, m in cluster.sent[before:] if isinstance(m, AppendRequest)]
    assert busy and not any(m.persist_commit for m in busy)
    assert cluster.durable[1].commit_lsn < Lsn(end)
    cluster.tick(p, 1.0)
    assert all(cluster.durable[n].commit_lsn == Lsn(end) for n in (1, 2, 3))


def test_commits_go_on_with_one_down_wait_with_two_and_catch_up() -> None:
    cluster = PullCluster()
    p = Proposer(config(), random.Random(2))
    elect(cluster, p)
    cluster.down = {3}
    end = cluster.write(20)
    cluster.pull(p)
    assert p.commit_lsn == Lsn(end)
    cluster.down = {2, 3}
    end2 = cluster.write(10, seed=1)
    cluster.pull(p)
    cluster.tick(p, 1.0)
    assert p.commit_lsn == Lsn(end)  # only one acceptor has [end, end2)
    assert len(cluster.wal[1]) == end2 - START
    cluster.down = {3}
    cluster.pull(p)
    assert p.commit_lsn == Lsn(end2)
    cluster.down = set()
    cluster.pull(p)
    cluster.tick(p, 1.0)
    assert cluster.wal[3] == cluster.wal[1]
    assert p.commit_lsn == Lsn(end2) and cluster.acceptors[3].commit_lsn == Lsn(end2)
    assert commits(cluster) == sorted(commits(cluster))


def test_a_restarted_or_reconnected_safekeeper_is_told_again() -> None:
    cluster = PullCluster()
    p = Proposer(config(), random.Random(3))
    e = elect(cluster, p)
    cluster.write(10)
    cluster.pull(p)
    assert len(cluster.pull_froms(2)) == 1
    # A new connection (the proxy's link dropped): PullFrom again, which starts nothing new.
    cluster.reconnect(p, 2)
    cluster.tick(p, 1.0)
    assert len(cluster.pull_froms(2)) == 2 and 2 in cluster.pulling
    # A restart: the acceptor forgot its source; the repeat starts the stream again.
    cluster.restart(2)
    assert 2 not in cluster.pulling
    cluster.reconnect(p, 2)
    cluster.tick(p, 1.0)
    assert cluster.pull_froms(2)[-1][1] == PullFrom(e.term, TARGET.host, TARGET.port, "sk2",
                                                    e.start_lsn)
    assert 2 in cluster.pulling
    end = cluster.write(10, seed=4)
    cluster.down = {1}
    cluster.pull(p)
    assert p.commit_lsn == Lsn(end)


def test_a_voter_behind_the_term_start_is_recovered_before_it_pulls() -> None:
    cluster = PullCluster()
    # A first proposer (push mode) commits some WAL with node 3 down.
    writer = Proposer(config(pull=None, proposer_id=7), random.Random(4))
    cluster.down = {3}
    cluster.take(writer.start(0.0))
    cluster.run(writer)
    gen = WalGenerator(START, PREV, SEG)
    rng = random.Random(5)
    for _ in range(15):
        cluster.take(writer.append_wal(0.0, gen.random_record(rng)[1]))
        cluster.run(writer)
    old_end = int(gen.end_lsn)
    assert len(cluster.wal[3]) == 0
    # The compute restarts (new term, pull mode); node 3 is back but far behind E.
    cluster.down = set()
    cluster.events.clear()
    p = Proposer(config(proposer_id=8), random.Random(6))
    e = elect(cluster, p)
    assert e.start_lsn == Lsn(old_end)
    for _ in range(4):
        cluster.tick(p, 1.0)
    # It got the old WAL up to E by appends (from a donor), then PullFrom at E.
    data_appends = [m for n, m in cluster.sent if n == 3 and isinstance(m, AppendRequest)
                    and m.data]
    assert data_appends and max(m.end_lsn for m in data_appends) == Lsn(old_end)
    assert [m.start_lsn for _, m in cluster.pull_froms(3)] == [Lsn(old_end)]
    assert cluster.wal[3] == cluster.wal[1]
    cluster.down = {1}
    end = cluster.write(10)
    cluster.pull(p)
    assert p.commit_lsn == Lsn(end)


def test_a_higher_term_fences_the_pulling_proposer() -> None:
    cluster = PullCluster()
    old = Proposer(config(), random.Random(7))
    elect(cluster, old)
    cluster.write(5)
    cluster.pull(old)
    # Another compute's sidecar elects itself on 1 and 2: their streams close first.
    new = Proposer(config(proposer_id=9), random.Random(8))
    cluster.down = {3}
    cluster.take(new.start(0.0))
    cluster.run(new)
    assert new.phase is Phase.ELECTED
    # The old term's streams closed before the promise (the new sidecar has not checked
    # its compute yet, so nobody pulls for the new term).
    assert [cluster.pulling[n].source.term for n in cluster.pulling] == [old.term]
    assert 3 in cluster.pulling
    # The old proposer hears of it at its next heartbeat (a commit-only append).
    cluster.down = set()
    cluster.events.clear()
    cluster.tick(old, 1.0)
    assert [e for e in cluster.events if isinstance(e, Fenced)] == [Fenced(new.term)]
    assert old.phase is Phase.FENCED


def pull_limits(cluster: PullCluster, node: int) -> list[Lsn]:
    return [m.max_flush_lsn for n, m in cluster.sent if isinstance(m, PullLimit) and n == node]


def test_pull_limit_follows_every_pull_from_and_holds_what_acceptors_report() -> None:
    cluster = PullCluster()
    p = Proposer(config(), random.Random(11))
    # Set before anyone pulls (the sidecar sets it before start_pulling): nothing is sent
    # yet, and each PullFrom is followed by it.
    cluster.take(p.limit_pull(0.0, Lsn(START)))
    assert not cluster.queue
    e = elect(cluster, p)
    for node in (1, 2, 3):
        kinds = [type(m) for n, m in cluster.sent if n == node and
                 isinstance(m, PullFrom | PullLimit)]
        assert kinds == [PullFrom, PullLimit], (node, kinds)
        assert pull_limits(cluster, node) == [Lsn(START)]
    end = cluster.write(20)
    cluster.pull(p)
    # The acceptors have the WAL and the commit LSN moves (only what they tell the
    # compute is held) ...
    assert p.commit_lsn == Lsn(end)
    for acc in cluster.acceptors.values():
        assert acc.flush_lsn == Lsn(end) and acc.pull_limit == Lsn(START)
        assert acc.pull_report() == e.start_lsn  # ... but the compute hears only E
    # A lower limit is never sent; a higher one goes to every pulling acceptor at once.
    assert p.limit_pull(cluster.now, Lsn(START - 1)) == []
    mid = Lsn(START + (end - START) // 2)
    cluster.take(p.limit_pull(cluster.now, mid))
    cluster.run(p)
    assert all(pull_limits(cluster, n) == [Lsn(START), mid] for n in (1, 2, 3))
    assert all(acc.pull_report() == mid for acc in cluster.acceptors.values())
    # A restarted safekeeper forgot its source and its limit: told both again.
    cluster.restart(2)
    assert cluster.acceptors[2].pull_limit is None
    cluster.reconnect(p, 2)
    cluster.tick(p, 1.0)
    assert pull_limits(cluster, 2) == [Lsn(START), mid, mid]
    assert 2 in cluster.pulling and cluster.acceptors[2].pull_limit == mid
    # Lifted past the end: everything is reported.
    cluster.take(p.limit_pull(cluster.now, Lsn(end + (16 << 20))))
    cluster.run(p)
    assert all(acc.pull_report() == Lsn(end) for acc in cluster.acceptors.values())


def test_pull_mode_refuses_sync_and_appended_wal() -> None:
    with pytest.raises(UserError, match="pull mode"):
        config(sync=True)
    p = Proposer(config(), random.Random(9))
    cluster = PullCluster()
    elect(cluster, p)
    with pytest.raises(AssertionError, match="pull mode"):
        p.append_wal(0.0, b"x")

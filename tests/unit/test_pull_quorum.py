"""Pull mode's safety claim, as a state machine (docs/safekeeper-protocol.md, "Pull mode").

Three acceptor cores (`allow_pull=True`) and a series of computes, one per elected term.
Each election runs the real `Proposer` core against a reachable subset of the acceptors
(its messages encoded, decoded and delivered a few at a time, between the other steps),
then its compute tells every reachable acceptor `PullFrom(term, ...)`. Computes keep
writing WAL after a newer term was elected (an old compute only stops when its sidecar sees
`Fenced`, which need not happen soon), and their walsenders' bytes reach acceptors in any
order, also after the acceptor closed that stream. A compute releases a commit when two of
the three acceptors reported a flush past it:
`synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)'`.

Checked after every step: no acceptor reports a flush for a term after persisting a
higher promise, and the pull stream is closed before that promise is persisted; once a
majority promised a term above T, compute T releases nothing beyond what those acceptors
had acknowledged before promising (ANY 2 cannot release the old term's later commits);
everything a compute released is held, byte for byte, by a majority of acceptors and is
part of every later term's log (never lost, never overwritten); `check_invariants()`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from acceptor_cores import SEG, new_timeline, proposer_config, restart_core
from sim.walgen import WalGenerator
from strata.common.lsn import Lsn
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
    AcceptorMessage,
    PullFrom,
    ReadWalResponse,
    VoteRequest,
    decode,
    encode,
)
from strata.safekeeper.proposer import (
    Elected,
    Fenced,
    Proposer,
    ProposerAction,
    Send,
)

START = 2 * SEG - 8192 + 400
PREV = START - 80
NODES = (1, 2, 3)
QUORUM = 2  # ANY 2 (sk1, sk2, sk3)
MAX_COMPUTES = 4  # elections per example: enough for fenced terms, and time to stream
ELECTION_ROUNDS = 4  # retry rounds (`tick`) before an election is over, elected or not


@dataclass
class Node:
    acc: Acceptor
    durable: AcceptorState  # the control file: the last PersistControl
    wal: bytearray = field(default_factory=bytearray)  # its WAL from START (all fsynced here)
    stream: int | None = None  # the term of its open pull connection

    @property
    def end(self) -> int:
        return START + len(self.wal)


@dataclass
class Compute:
    term: int
    start: int  # E: the term's start
    log: bytearray  # the whole log from START
    gen: WalGenerator
    record_ends: list[int]
    sent: dict[int, int] = field(default_factory=dict)  # its walsender's position per node
    feedback: dict[int, int] = field(default_factory=dict)  # flush each node reported
    released: int = 0  # ANY 2: the highest record end both of two acceptors flushed
    bound: int | None = None  # once a majority promised higher: what it may still release

    @property
    def end(self) -> int:
        return START + len(self.log)


@dataclass
class Election:
    proposer: Proposer
    reachable: set[int]
    queue: deque[ProposerAction]
    now: float = 0.0
    rounds: int = 0
    elected: Elected | None = None
    log: bytearray | None = None


class PullQuorumMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        state = new_timeline(START, PREV)
        self.nodes = {n: Node(Acceptor(state, allow_pull=True), state) for n in NODES}
        self.computes: dict[int, Compute] = {}
        self.next_proposer_id = 1
        self.election: Election | None = None

    # --- the driver: what a safekeeper does with each action --------------------------------
    def execute(self, n: int, actions: list[AcceptorAction]) -> list[AcceptorMessage]:
        node = self.nodes[n]
        replies: list[AcceptorMessage] = []
        for action in actions:
            match action:
                case PersistControl(state=state):
                    if state.term > node.durable.term:
                        # Fencing: the old term's stream is closed before the promise.
                        assert node.stream is None or node.stream >= state.term, \
                            (n, node.stream, state.term)
                    node.durable = state
                case WriteWal(lsn=lsn, data=data):
                    assert lsn.value == node.end, (n, lsn, node.end)
                    node.wal += data
                case FlushWal(upto=upto):
                    assert upto.value == node.end
                case TruncateWal(lsn=lsn):
                    del node.wal[lsn.value - START:]
                case SendWal(term=term, start_lsn=s, end_lsn=e):
                    data = bytes(node.wal[s.value - START:e.value - START])
                    replies.append(ReadWalResponse(term, s, data))
                case StartPull(source=source, start_lsn=start):
                    assert node.stream is None, (n, node.stream)
                    assert source.host == f"compute-{source.term}" and \
                        source.slot_name == f"sk{n}"
                    node.stream = source.term
                    self.computes[source.term].sent[n] = start.value
                case ClosePull(term=term):
                    assert node.stream == term, (n, node.stream, term)
                    node.stream = None
                case PullFeedback(term=term, flush_lsn=flush):
                    # Never after a higher promise was made durable.
                    assert node.durable.term == term, (n, node.durable.term, term)
                    assert node.stream == term
                    c = self.computes[term]
                    c.feedback[n] = max(c.feedback.get(n, 0), flush.value)
                    self._release(c)
                case _:
                    replies.append(action)
        return replies

    def _release(self, c: Compute) -> None:
        acks = sorted(c.feedback.values(), reverse=True)
        if len(acks) < QUORUM:
            return
        quorum_flush = acks[QUORUM - 1]
        ends = [e for e in c.record_ends if e <= quorum_flush]
        if ends and ends[-1] > c.released:
            c.released = ends[-1]

    # --- rules --------------------------------------------------------------------------------
    @initialize()
    def first_compute(self) -> None:
        self.elect(set(NODES))
        while self.election is not None:
            self.election_step(1000)
        assert self.computes

    @precondition(lambda self: len(self.computes) < MAX_COMPUTES and self.election is None)
    @rule(reachable=st.sets(st.sampled_from(NODES), min_size=1))
    def elect(self, reachable: set[int]) -> None:
        """A new compute's sidecar starts electing itself with the reachable acceptors; its
        messages are delivered by `election_step`, between other steps."""
        pid = self.next_proposer_id
        self.next_proposer_id += 1
        proposer = Proposer(proposer_config(proposer_id=pid, acceptors=NODES),
                            random.Random(pid))
        self.election = Election(proposer, reachable, deque(proposer.start(0.0)))

    @precondition(lambda self: self.election is not None)
    @rule(steps=st.integers(1, 40))
    def election_step(self, steps: int) -> None:
        """Deliver the next `steps` proposer actions (a retry round when none is left). Once
        elected and done, recover nothing more: the compute starts, and tells the reachable
        acceptors to pull from it."""
        el = self.election
        assert el is not None
        for _ in range(steps):
            if not el.queue:
                if el.rounds == ELECTION_ROUNDS:
                    self._finish_election(el)
                    return
                el.rounds += 1
                el.now += 10.0
                el.queue.extend(el.proposer.tick(el.now))
                continue
            action = el.queue.popleft()
            if isinstance(action, Send):
                if action.node not in el.reachable:
                    continue
                msg = decode(encode(action.msg))
                assert not isinstance(msg, AcceptorMessage)
                for r in self.execute(action.node, self.nodes[action.node].acc.handle(msg)):
                    answer = decode(encode(r))
                    assert isinstance(answer, AcceptorMessage)
                    el.queue.extend(el.proposer.handle(el.now, action.node, answer))
            elif isinstance(action, Elected):
                # The log up to E is the donor's (what it reported when it voted).
                el.elected = action
                e = action.start_lsn.value
                el.log = bytearray(self.nodes[el.proposer.donor].wal[:e - START])
                assert len(el.log) == e - START
            elif isinstance(action, Fenced):
                self.election = None  # the sidecar stops its PostgreSQL before it started
                return

    def _finish_election(self, el: Election) -> None:
        self.election = None
        if el.elected is None or el.log is None:
            return
        term, e, log = el.elected.term, el.elected.start_lsn.value, el.log
        for n in el.reachable:
            node = self.nodes[n]
            if node.acc.state.term == term and node.end >= e:
                assert node.wal[:e - START] == log, n  # recovered to the same log
        # Never lost: everything an older compute released is in this log.
        for c in self.computes.values():
            assert c.released <= e, (c.term, c.released, term, e)
            assert log[:c.released - START] == c.log[:c.released - START]
        assert term not in self.computes
        gen = WalGenerator(e, el.elected.prev_record_lsn.value, SEG)
        self.computes[term] = Compute(term, e, log, gen, [])
        for n in sorted(el.reachable):
            self.execute(n, self.nodes[n].acc.handle(
                PullFrom(term, f"compute-{term}", 5432, f"sk{n}", Lsn(e))))

    @rule(n=st.sampled_from(NODES))
    def promise_only(self, n: int) -> None:
        """A candidate that reached one acceptor with its VoteRequest, then died."""
        node = self.nodes[n]
        pid = self.next_proposer_id
        self.next_proposer_id += 1
        self.execute(n, node.acc.handle(VoteRequest(node.acc.term + 1, pid)))

    @precondition(lambda self: self.computes)
    @rule(data=st.data(), records=st.integers(1, 6), seed=st.integers(0, 1 << 32),
          streamed=st.sets(st.sampled_from(NODES)))
    def write(self, data: st.DataObject, records: int, seed: int, streamed: set[int]) -> None:
        """A compute (the newest or an old one that does not know yet) writes records, and
        the open streams of `streamed` deliver what their computes have."""
        c = self.computes[data.draw(st.sampled_from(sorted(self.computes)))]
        rng = random.Random(seed)
        for _ in range(records):
            _start, piece = c.gen.random_record(rng)
            c.log += piece
            c.record_ends.append(c.gen.end_lsn)
        for n in sorted(streamed):
            self._stream(n)

    def _stream(self, n: int, size: int | None = None) -> None:
        node = self.nodes[n]
        if node.stream is None:
            return
        c = self.computes[node.stream]
        pos = c.sent[n]
        size = c.end - pos if size is None else min(size, c.end - pos)
        if size:
            self.execute(n, node.acc.pulled_wal(c.term, Lsn(pos),
                                                bytes(c.log[pos - START:pos - START + size])))
            c.sent[n] = pos + size

    @precondition(lambda self: self.computes)
    @rule(data=st.data())
    def stream(self, data: st.DataObject) -> None:
        """Every open stream delivers what its compute has, or part of it."""
        for n in NODES:
            node = self.nodes[n]
            if node.stream is not None:
                c = self.computes[node.stream]
                self._stream(n, data.draw(st.integers(0, c.end - c.sent[n])))

    @precondition(lambda self: self.computes)
    @rule(n=st.sampled_from(NODES), data=st.data(), size=st.integers(1, 30000))
    def deliver(self, n: int, data: st.DataObject, size: int) -> None:
        """Bytes from a compute's walsender for acceptor `n` arrive: from its open stream, or
        left over from one it closed (they must be refused then)."""
        node = self.nodes[n]
        senders = sorted(t for t, c in self.computes.items() if n in c.sent)
        if not senders:
            return
        c = self.computes[data.draw(st.sampled_from(senders))]
        pos = c.sent[n]
        piece = bytes(c.log[pos - START:pos - START + size])
        if not piece:
            return
        flush_before = node.end
        actions = self.execute(n, node.acc.pulled_wal(c.term, Lsn(pos), piece))
        if node.stream != c.term:
            assert actions == [] and node.end == flush_before, (n, node.stream, c.term)
        else:
            c.sent[n] = pos + len(piece)

    @rule(n=st.sampled_from(NODES))
    def restart(self, n: int) -> None:
        """The safekeeper restarts from its control file and WAL (its pull connection dies)."""
        node = self.nodes[n]
        node.acc = restart_core(node.durable, node.wal, START, allow_pull=True)
        node.stream = None
        for c in self.computes.values():
            c.sent.pop(n, None)

    @precondition(lambda self: self.computes)
    @rule(n=st.sampled_from(NODES))
    def pull_again(self, n: int) -> None:
        """The newest compute's sidecar sends PullFrom again (after a restart)."""
        c = self.computes[max(self.computes)]
        self.execute(n, self.nodes[n].acc.handle(
            PullFrom(c.term, f"compute-{c.term}", 5432, f"sk{n}", Lsn(c.start))))

    # --- the claims ---------------------------------------------------------------------------
    @invariant()
    def fenced_terms_release_nothing_new(self) -> None:
        for c in self.computes.values():
            promised = [n for n in NODES if self.nodes[n].durable.term > c.term]
            if len(promised) >= QUORUM and c.bound is None:
                # Acknowledgements still possible: the others' (unbounded), these' so far.
                acks = sorted((c.feedback.get(n, 0) if n in promised else 1 << 64
                               for n in NODES), reverse=True)
                c.bound = acks[QUORUM - 1]
            if c.bound is not None:
                assert c.released <= c.bound, (c.term, c.released, c.bound)

    @invariant()
    def released_wal_is_on_a_majority(self) -> None:
        for c in self.computes.values():
            if not c.released:
                continue
            held = [n for n, node in self.nodes.items()
                    if node.wal[:c.released - START] == c.log[:c.released - START]
                    and node.end >= c.released]
            assert len(held) >= QUORUM, (c.term, c.released, held)

    @invariant()
    def cores_are_consistent(self) -> None:
        for node in self.nodes.values():
            node.acc.check_invariants()
            assert node.acc.flush_lsn.value == node.end
            assert (node.stream is None) == (node.acc.pull_source is None)


PullQuorumMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                               deadline=None)
TestPullQuorum = PullQuorumMachine.TestCase


def test_the_checks_can_fail() -> None:
    """The fencing check is live: a feedback after a higher promise is caught."""
    machine = PullQuorumMachine()
    machine.elect({1, 2, 3})
    machine.promise_only(1)
    with pytest.raises(AssertionError):
        machine.execute(1, [PullFeedback(1, Lsn(START))])

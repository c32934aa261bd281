"""Deterministic simulator of the WAL quorum: acceptors and proposers in one thread.

Virtual time; one seeded `random.Random` decides everything. The network delivers, drops,
duplicates, delays and so reorders each message (every message goes through the binary
codec). Acceptors crash and restart, losing what their PersistControl/FlushWal/TruncateWal
did not make durable (a crash can also fall between two actions of one step, and a random
prefix of the unsynced WAL may survive, as on a real disk); sometimes all of them crash at
once. Proposers with increasing ids compete, some in sync mode; the leaders append generated
WAL (`walgen`) in random pieces. No disk corruption: the design does not claim to survive it.

After every step `Checker` verifies: one leader per term; the committed WAL (the longest
prefix any proposer announced as committed) is durable and identical on a majority, and no
announcement contradicts an earlier one; every acceptor's log agrees with it up to the
acceptor's commit LSN (so any two agree up to the lower of theirs); a sync result is a
committed record end with its real previous record; `check_invariants()` of every node.
At the end the faults stop and a final sync proposer must finish (liveness).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from walgen import SYSID, WalGenerator

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper.acceptor import (
    Acceptor,
    AcceptorState,
    FlushWal,
    PersistControl,
    SendWal,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import (
    AcceptorMessage,
    Message,
    ProposerMessage,
    ReadWalResponse,
    decode,
    encode,
)
from strata.safekeeper.proposer import (
    CommitAdvanced,
    Elected,
    Fenced,
    Proposer,
    ProposerConfig,
    Send,
    SyncDone,
)
from strata.safekeeper.record_bounds import scan_record_bounds

SEG = 1 << 20
TENANT = TenantId(bytes(range(16)))
TIMELINE = TimelineId(bytes(range(16, 32)))
TICK_S = 0.25


@dataclass
class Faults:
    drop: float
    duplicate: float
    reorder: float  # chance that a message ignores its link's FIFO order
    max_delay_s: float
    crash_between_actions: float
    torn_unsynced: bool

    @classmethod
    def random(cls, rng: random.Random) -> Faults:
        return cls(drop=rng.choice((0.0, 0.05, 0.2)), duplicate=rng.choice((0.0, 0.05, 0.2)),
                   reorder=rng.choice((0.0, 0.1, 0.5)),
                   max_delay_s=rng.choice((0.01, 0.1, 0.5)),
                   crash_between_actions=rng.choice((0.0, 0.01, 0.05)),
                   torn_unsynced=rng.random() < 0.5)

    @classmethod
    def none(cls) -> Faults:
        return cls(0.0, 0.0, 0.0, 0.01, 0.0, False)


class SimAcceptor:
    """An acceptor with a simulated disk: durable control state and WAL, and a page cache."""

    def __init__(self, node: int, state: AcceptorState, commit_persist_bytes: int) -> None:
        self.node = node
        self.control = state  # durable
        self.wal = bytearray()  # from the timeline start: the page-cache view
        self.durable_len = 0  # bytes of self.wal that are on disk
        self.commit_persist_bytes = commit_persist_bytes
        self.core: Acceptor | None = Acceptor(state, commit_persist_bytes=commit_persist_bytes)

    @property
    def start(self) -> int:
        return self.control.timeline_start_lsn.value

    def crash(self, rng: random.Random, torn: bool) -> None:
        """Unsynced WAL is lost; with `torn`, a random prefix of it survives, partly garbage
        (a write that was in flight), which the restart must recognise and cut."""
        keep = self.durable_len
        if torn and len(self.wal) > keep:
            keep += rng.randrange(len(self.wal) - keep + 1)
            if keep > self.durable_len and rng.random() < 0.5:
                at = rng.randrange(self.durable_len, keep)
                size = min(keep - at, rng.randrange(1, 600))
                self.wal[at:at + size] = rng.randbytes(size)
        del self.wal[keep:]  # durable_len stays: only that much is known to be intact
        self.core = None

    def restart(self) -> None:
        assert self.core is None
        core = Acceptor(self.control, commit_persist_bytes=self.commit_persist_bytes)
        end = core.recover_wal(bytes(self.wal[self.control.scan_lsn.value - self.start:]))
        # Every complete record in the synced WAL survives the restart.
        synced_end, _ = scan_record_bounds(self.start, self.control.timeline_start_prev_lsn.value,
                                           bytes(self.wal[:self.durable_len]), SEG)
        assert end.value >= synced_end, (end, Lsn(synced_end))
        del self.wal[end.value - self.start:]  # the WAL after the last valid record
        self.durable_len = len(self.wal)  # the driver truncates and fsyncs
        self.core = core


@dataclass
class SimProposer:
    node: int
    core: Proposer
    records_left: int
    gen: WalGenerator | None = None
    alive: bool = True


@dataclass(order=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    args: tuple[object, ...] = field(compare=False, default=())


class Checker:
    """The safety properties, checked after every step (see module docstring)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.leaders: dict[int, int] = {}
        self.committed = bytearray()  # WAL from the timeline start up to the highest commit
        self.sync_results: list[tuple[int, int]] = []

    @property
    def commit_end(self) -> int:
        return self.sim.start_lsn + len(self.committed)

    def on_elected(self, proposer: SimProposer, term: int) -> None:
        other = self.leaders.setdefault(term, proposer.node)
        assert other == proposer.node, f"term {term} has two leaders: {other}, {proposer.node}"

    def on_commit(self, proposer: SimProposer, commit: int) -> None:
        """A proposer says WAL below `commit` is committed: it must extend what was."""
        core = proposer.core
        base = self.sim.start_lsn
        # The proposer may not hold its log below its term start; the acceptors whose
        # acknowledgements made the commit do.
        acked = [self.sim.acceptors[p.node - 1] for p in core.peers.values()
                 if p.synced and p.record_end.value >= commit]
        assert len(acked) >= self.sim.quorum, (proposer.node, Lsn(commit))
        log = acked[0].wal[:commit - base]
        assert len(log) == commit - base, (acked[0].node, Lsn(commit))
        start = max(core.wal_start.value, base)
        assert core.wal[:commit - start] == log[start - base:], \
            f"proposer {proposer.node}'s WAL below {Lsn(commit)} is not its acceptors'"
        overlap = min(commit, self.commit_end) - base
        assert log[:overlap] == self.committed[:overlap], \
            f"proposer {proposer.node} commits {Lsn(commit)} over different committed WAL"
        if commit > self.commit_end:
            self.committed += log[len(self.committed):]
        assert self.commit_end >= commit

    def on_sync_done(self, end: int, prev: int) -> None:
        assert end <= self.commit_end, (Lsn(end), Lsn(self.commit_end))
        got = scan_record_bounds(self.sim.start_lsn, self.sim.start_prev,
                                 bytes(self.committed[:end - self.sim.start_lsn]), SEG)
        assert got == (end, prev), (got, end, prev)
        durable = [a for a in self.sim.acceptors if a.control.commit_lsn.value >= end]
        assert len(durable) >= self.sim.quorum, "sync done without a durable majority"
        self.sync_results.append((end, prev))

    def check(self) -> None:
        sim = self.sim
        n = len(self.committed)
        holders = [a.node for a in sim.acceptors
                   if a.durable_len >= n and a.wal[:n] == self.committed]
        assert len(holders) >= sim.quorum, \
            f"committed WAL up to {Lsn(self.commit_end)} is durable only on {holders}"
        for a in sim.acceptors:
            durable_commit = a.control.commit_lsn.value - sim.start_lsn
            assert durable_commit <= n, (a.node, a.control.commit_lsn, Lsn(self.commit_end))
            assert a.wal[:durable_commit] == self.committed[:durable_commit], a.node
            if a.core is None:
                continue
            a.core.check_invariants()
            assert a.core.flush_lsn.value == a.start + len(a.wal), (a.core.flush_lsn, len(a.wal))
            commit = a.core.commit_lsn.value - sim.start_lsn
            assert commit <= n, (a.node, a.core.commit_lsn, Lsn(self.commit_end))
            assert a.wal[:commit] == self.committed[:commit], \
                f"acceptor {a.node} disagrees with committed WAL below {a.core.commit_lsn}"
        for p in sim.proposers:
            if p.alive:
                p.core.check_invariants()


class Simulation:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        rng = self.rng
        self.n_acceptors = rng.choice((3, 3, 5))
        self.quorum = self.n_acceptors // 2 + 1
        self.faults = Faults.random(rng)
        # A timeline starts at a record end mid-page, near a segment end so that records
        # soon cross into the next segment's long page header.
        self.start_lsn = 3 * SEG - rng.randrange(1, 6) * 8192 + 8 * rng.randrange(5, 1000)
        self.start_prev = self.start_lsn - 120
        state = AcceptorState.new_timeline(TENANT, TIMELINE, SYSID, SEG, Lsn(self.start_lsn),
                                           Lsn(self.start_prev))
        persist_bytes = rng.choice((1, 5000, 16 << 20))
        self.acceptors = [SimAcceptor(i + 1, state, persist_bytes)
                          for i in range(self.n_acceptors)]
        self.proposers: list[SimProposer] = []
        self.checker = Checker(self)
        self.events: list[Event] = []
        self.now = 0.0
        self.seq = 0
        self.steps = 0
        self.healed = False
        self.final: SimProposer | None = None
        self.link_time: dict[tuple[int, int], float] = {}

    # --- scheduling ---------------------------------------------------------------------------
    def at(self, time: float, kind: str, *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, Event(time, self.seq, kind, args))

    def send(self, src: int, dst: int, msg: Message) -> None:
        faults = self.faults
        if self.rng.random() < faults.drop:
            return
        copies = 2 if self.rng.random() < faults.duplicate else 1
        payload = encode(msg)
        for _ in range(copies):
            when = self.now + self.rng.uniform(0.0005, faults.max_delay_s)
            if self.rng.random() >= faults.reorder:
                # A connection delivers in order (TCP); reordering models reconnections.
                when = max(when, self.link_time.get((src, dst), 0.0))
                self.link_time[(src, dst)] = when
            self.at(when, "deliver", src, dst, payload)

    # --- nodes --------------------------------------------------------------------------------
    def spawn_proposer(self, sync: bool) -> SimProposer:
        node = 100 + len(self.proposers) + 1
        release = self.rng.choice((1, 20_000, 4 << 20))
        config = ProposerConfig(TENANT, TIMELINE, SYSID, SEG, node,
                                tuple(a.node for a in self.acceptors), sync=sync,
                                max_append_bytes=self.rng.choice((512, 4096, 65536)),
                                max_inflight_bytes=self.rng.choice((4096, 1 << 20)),
                                max_read_bytes=self.rng.choice((1000, 1 << 20)),
                                release_bytes=release)
        records = 0 if sync else self.rng.randrange(0, 25)
        p = SimProposer(node, Proposer(config, random.Random(self.rng.random())), records)
        self.proposers.append(p)
        self.run_proposer_actions(p, p.core.start(self.now))
        self.at(self.now + TICK_S, "tick_proposer", p)
        return p

    def run_proposer_actions(self, p: SimProposer, actions: Sequence[object]) -> None:
        for action in actions:
            match action:
                case Send(node, msg):
                    self.send(p.node, node, msg)
                case Elected(term, start_lsn, prev):
                    self.checker.on_elected(p, term)
                    if not p.core.config.sync:
                        p.gen = WalGenerator(start_lsn.value, prev.value, SEG)
                        self.at(self.now + self.rng.uniform(0, 0.2), "produce", p)
                case CommitAdvanced(commit):
                    self.checker.on_commit(p, commit.value)
                case SyncDone(end, prev):
                    self.checker.on_sync_done(end.value, prev.value)
                case Fenced():
                    p.alive = False
                case _:
                    raise AssertionError(action)

    def run_acceptor(self, a: SimAcceptor, src: int, msg: ProposerMessage) -> None:
        assert a.core is not None
        actions = a.core.handle(msg)
        for action in actions:
            if self.rng.random() < self.faults.crash_between_actions:
                self.crash(a)
                return
            match action:
                case PersistControl(state):
                    a.control = state
                case WriteWal(lsn, data):
                    assert lsn.value == a.start + len(a.wal), (lsn, len(a.wal))
                    a.wal += data
                case FlushWal(upto):
                    assert upto.value == a.start + len(a.wal), (upto, len(a.wal))
                    a.durable_len = len(a.wal)
                case TruncateWal(lsn):
                    del a.wal[lsn.value - a.start:]
                    a.durable_len = min(a.durable_len, len(a.wal))
                case SendWal(term, start_lsn, end_lsn):
                    data = bytes(a.wal[start_lsn.value - a.start:end_lsn.value - a.start])
                    self.send(a.node, src, ReadWalResponse(term, start_lsn, data))
                case _:
                    self.send(a.node, src, action)

    def crash(self, a: SimAcceptor) -> None:
        a.crash(self.rng, self.faults.torn_unsynced)
        self.at(self.now + self.rng.uniform(0.1, 3.0), "restart", a)

    # --- events -------------------------------------------------------------------------------
    def step(self, ev: Event) -> None:
        self.now = ev.time
        target = ev.args[0] if ev.args else None
        if ev.kind == "deliver":
            src, dst, payload = ev.args
            assert isinstance(src, int) and isinstance(dst, int) and isinstance(payload, bytes)
            self.deliver(src, dst, decode(payload))
        elif ev.kind == "tick_proposer":
            assert isinstance(target, SimProposer)
            if target.alive:
                self.run_proposer_actions(target, target.core.tick(self.now))
                self.at(self.now + TICK_S, "tick_proposer", target)
        elif ev.kind == "produce":
            assert isinstance(target, SimProposer)
            self.produce(target)
        elif ev.kind == "restart":
            assert isinstance(target, SimAcceptor)
            if target.core is None:
                target.restart()
        elif ev.kind == "chaos":
            self.chaos()
        elif ev.kind == "heal":
            self.heal()
        else:
            raise AssertionError(ev.kind)

    def deliver(self, src: int, dst: int, msg: Message) -> None:
        if dst < 100:
            a = self.acceptors[dst - 1]
            if a.core is not None:
                assert isinstance(msg, ProposerMessage), msg
                self.run_acceptor(a, src, msg)
            return
        p = self.proposers[dst - 101]
        if p.alive:
            assert isinstance(msg, AcceptorMessage), msg
            self.run_proposer_actions(p, p.core.handle(self.now, src, msg))

    def produce(self, p: SimProposer) -> None:
        """The compute writes one record; it reaches the proposer in random pieces."""
        assert p.gen is not None
        if not p.alive or p.records_left <= 0:
            return
        p.records_left -= 1
        _start, data = p.gen.random_record(self.rng)
        while data:
            cut = self.rng.randrange(1, len(data) + 1)
            self.run_proposer_actions(p, p.core.append_wal(self.now, data[:cut]))
            data = data[cut:]
        self.at(self.now + self.rng.uniform(0, 0.3), "produce", p)

    def chaos(self) -> None:
        """One random fault or a new competing proposer."""
        if self.healed:
            return
        rng = self.rng
        roll = rng.random()
        if roll < 0.3:
            self.spawn_proposer(sync=rng.random() < 0.3)
        elif roll < 0.5:
            live = [p for p in self.proposers if p.alive]
            if live:
                rng.choice(live).alive = False  # a compute or walproposer dies
        elif roll < 0.9:
            up = [a for a in self.acceptors if a.core is not None]
            if up:
                self.crash(rng.choice(up))
        else:
            for a in self.acceptors:
                if a.core is not None:
                    self.crash(a)
        self.at(self.now + rng.expovariate(1.5), "chaos")

    def heal(self) -> None:
        """Stop the faults; every acceptor up; a last sync proposer must finish."""
        self.healed = True
        self.faults = Faults.none()
        for p in self.proposers:
            p.alive = False
        for a in self.acceptors:
            if a.core is None:
                a.restart()
        self.final = self.spawn_proposer(sync=True)

    def run(self, chaos_s: float = 6.0, heal_timeout_s: float = 20.0) -> None:
        self.spawn_proposer(sync=False)
        self.at(self.rng.uniform(0, 1.0), "chaos")
        self.at(chaos_s, "heal")
        deadline = chaos_s + heal_timeout_s
        while self.events:
            ev = heapq.heappop(self.events)
            if ev.time > deadline:
                break
            self.step(ev)
            self.steps += 1
            self.checker.check()
            if self.final is not None and self.final.core.phase.value == "done":
                break
            if self.final is not None and not self.final.alive:
                # Fenced by a term it did not see in its greetings: retry, as the walproposer would.
                self.final = self.spawn_proposer(sync=True)
        assert self.final is not None, self.seed
        assert self.final.core.phase.value == "done", \
            f"seed {self.seed}: the final sync proposer is stuck in {self.final.core.phase}"
        end, _prev = self.checker.sync_results[-1]
        # The agreed end keeps all committed WAL.
        assert end >= self.checker.commit_end, (Lsn(end), Lsn(self.checker.commit_end))

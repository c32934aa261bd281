"""Acceptor cores (strata.safekeeper.acceptor) on memory disks, for the proposer core's unit
tests: tests/unit/test_proposer.py (push mode), test_proposer_pull.py (pull mode) and the
pull-mode state machine test_pull_quorum.py. `CoreCluster` puts the cores behind an
in-memory, in-order network to one proposer core and does with each acceptor action what a
safekeeper does (write, truncate, persist, send); `restart_core` is a safekeeper restart.
Import as `from acceptor_cores import ...` (pytest puts `tests/` on sys.path through the
root conftest).
"""

from __future__ import annotations

from collections import deque

from sim.walgen import SYSID, WalGenerator
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
    SendWal,
    StartPull,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import (
    AcceptorMessage,
    AppendRequest,
    ProposerElected,
    ProposerMessage,
    ReadWalResponse,
)
from strata.safekeeper.proposer import (
    Elected,
    Proposer,
    ProposerAction,
    ProposerConfig,
    Send,
)

SEG = 1 << 20
TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(range(16)))


def proposer_config(**kwargs: object) -> ProposerConfig:
    """The proposer of TENANT/TIMELINE on acceptors 1, 2 and 3 (id 1, push mode), with
    `kwargs` changed."""
    base: dict[str, object] = dict(tenant_id=TENANT, timeline_id=TIMELINE, system_id=SYSID,
                                   wal_seg_size=SEG, proposer_id=1, acceptors=(1, 2, 3))
    base.update(kwargs)
    return ProposerConfig(**base)  # type: ignore[arg-type]


def new_timeline(start: int, prev: int, sysid: int = SYSID) -> AcceptorState:
    """The acceptors' state of TENANT/TIMELINE created at record end `start`."""
    return AcceptorState.new_timeline(TENANT, TIMELINE, sysid, SEG, Lsn(start), Lsn(prev))


def restart_core(durable: AcceptorState, wal: bytearray, start: int, *,
                 allow_pull: bool) -> Acceptor:
    """A safekeeper's restart: a new core from its control file (`durable`) and its WAL
    (`wal`, from `start`); what lies past the WAL's recovered end is cut from `wal`."""
    acc = Acceptor(durable, allow_pull=allow_pull)
    scan = durable.scan_lsn.value
    end = acc.recover_wal(bytes(wal[scan - start:]))
    del wal[end.value - start:]
    return acc


def elected(events: list[ProposerAction]) -> Elected:
    """The one `Elected` among `events`."""
    found = [e for e in events if isinstance(e, Elected)]
    assert len(found) == 1, events
    return found[0]


class CoreCluster:
    """Acceptor cores 1..n with memory disks (`wal` from `start`, `durable` the last
    persisted state) behind a perfect in-order network to one proposer at a time (`run`).
    Nodes in `down` get nothing; (proposer id, node) pairs in `cut` lose that proposer's
    ProposerElected and AppendRequests to that node. Pull mode: `pulling` holds each
    node's open replication connection (StartPull until ClosePull)."""

    def __init__(self, start: int, prev: int, *, n: int = 3, sysid: int = SYSID,
                 allow_pull: bool = False) -> None:
        self.start = start
        self.allow_pull = allow_pull
        state = new_timeline(start, prev, sysid)
        self.acceptors = {i: Acceptor(state, allow_pull=allow_pull) for i in range(1, n + 1)}
        self.durable = {i: state for i in self.acceptors}
        self.wal = {i: bytearray() for i in self.acceptors}
        self.pulling: dict[int, StartPull] = {}
        self.down: set[int] = set()
        self.cut: set[tuple[int, int]] = set()
        self.queue: deque[tuple[int, int, ProposerMessage | AcceptorMessage]] = deque()
        self.events: list[ProposerAction] = []  # the proposer's actions other than Send
        self.sent: list[tuple[int, ProposerMessage]] = []  # what reached each node
        self.now = 0.0
        self.gen: WalGenerator | None = None  # the compute's WAL, once a test writes

    def take(self, actions: list[ProposerAction]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.queue.append((0, a.node, a.msg))
            else:
                self.events.append(a)

    def run(self, p: Proposer) -> None:
        """Deliver until nothing is in flight; the proposer's invariants hold after each
        answer it handled."""
        while self.queue:
            src, dst, msg = self.queue.popleft()
            if (p.config.proposer_id, dst) in self.cut and \
                    isinstance(msg, ProposerElected | AppendRequest):
                continue
            if dst == 0:
                assert not isinstance(msg, ProposerMessage)
                self.take(p.handle(self.now, src, msg))
                p.check_invariants()
            elif dst not in self.down:
                assert isinstance(msg, ProposerMessage)
                self.sent.append((dst, msg))
                self.execute(dst, self.acceptors[dst].handle(msg))

    def execute(self, node: int, actions: list[AcceptorAction]) -> None:
        """What safekeeper `node` does with its core's actions; replies go to the proposer."""
        wal = self.wal[node]
        for action in actions:
            match action:
                case WriteWal(lsn=lsn, data=data):
                    assert lsn.value == self.start + len(wal), (node, lsn)
                    wal += data
                case TruncateWal(lsn=lsn):
                    del wal[lsn.value - self.start:]
                case PersistControl(state=state):
                    self.durable[node] = state
                case FlushWal():
                    pass
                case SendWal(term=term, start_lsn=s, end_lsn=e):
                    data = bytes(wal[s.value - self.start:e.value - self.start])
                    self.queue.append((node, 0, ReadWalResponse(term, s, data)))
                case StartPull():
                    assert node not in self.pulling, node
                    self.pulling[node] = action
                case ClosePull():
                    self.pulling.pop(node, None)
                case PullFeedback():
                    pass  # to the compute's walsender: the ANY 2 test is test_pull_quorum
                case _:
                    self.queue.append((node, 0, action))
        self.acceptors[node].check_invariants()

    def tick(self, p: Proposer, seconds: float) -> None:
        self.now += seconds
        self.take(p.tick(self.now))
        self.run(p)

    def restart(self, node: int) -> None:
        """Safekeeper `node` restarts from its control file and WAL (and forgets its pull
        source: its replication connection is gone)."""
        self.acceptors[node] = restart_core(self.durable[node], self.wal[node], self.start,
                                            allow_pull=self.allow_pull)
        self.pulling.pop(node, None)

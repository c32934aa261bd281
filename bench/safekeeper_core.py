"""Safekeeper protocol cores, on one core, no I/O: what the Python protocol logic costs.

- `record_bounds_mb_per_s`: `RecordBoundaryTracker` over generated WAL (XLOG_NOOP records of
  0-20 KB, fed in 128 KB pieces). Baseline: `WalStreamDecoder` (full decode + CRC) over the
  same bytes.
- `record_bounds_small_mb_per_s`: the same over records of 50-300 bytes (OLTP-like).
- `acceptor_append_mb_per_s`: `Acceptor.handle(AppendRequest)` with 128 KB appends (tracker,
  actions, reply); the driver's writes and fsyncs are not included.
- `quorum_commit_mb_per_s`: a `Proposer` and 3 `Acceptor`s in memory, WAL appended in 8 KB
  pieces until all of it is committed (messages encoded and decoded on the way).
- `sim_seeds_per_s`: simulator seeds (tests/sim) per second.
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.walreader import WalStreamDecoder
from strata.safekeeper.acceptor import Acceptor, AcceptorState, SendWal
from strata.safekeeper.messages import (
    AppendRequest,
    ProposerElected,
    TermEntry,
    decode,
    encode,
)
from strata.safekeeper.proposer import CommitAdvanced, Proposer, ProposerConfig, Send
from strata.safekeeper.record_bounds import RecordBoundaryTracker

sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "sim"))
from quorum_sim import Simulation  # noqa: E402
from walgen import SYSID, WalGenerator  # noqa: E402

_MB = 1024 * 1024
SEG = 16 * _MB
START = SEG + 4096
TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(range(16)))


def _wal(size: int, small: bool = False) -> bytes:
    """Generated WAL; `small`: records of 50-300 bytes, like OLTP WAL."""
    gen = WalGenerator(START, START - 100, SEG)
    rng = random.Random(1)
    out = []
    total = 0
    while total < size:
        if small:
            _s, data = gen.record(rng.randbytes(rng.randrange(26, 276)))
        else:
            _s, data = gen.random_record(rng)
        out.append(data)
        total += len(data)
    return b"".join(out)


def _state() -> AcceptorState:
    return AcceptorState.new_timeline(TENANT, TIMELINE, SYSID, SEG, Lsn(START), Lsn(START - 100))


def _rate(fn: object, size: int) -> float:
    assert callable(fn)
    t0 = time.perf_counter()
    fn()
    return size / _MB / (time.perf_counter() - t0)


def _quorum(wal: bytes) -> None:
    accs = {i: Acceptor(_state()) for i in (1, 2, 3)}
    config = ProposerConfig(TENANT, TIMELINE, SYSID, SEG, 1, (1, 2, 3))
    p = Proposer(config, random.Random(0))
    queue: deque[tuple[int, bytes]] = deque()
    commit = Lsn(0)

    def take(actions: Sequence[object]) -> None:
        nonlocal commit
        for a in actions:
            if isinstance(a, Send):
                queue.append((a.node, encode(a.msg)))
            elif isinstance(a, CommitAdvanced):
                commit = a.commit_lsn

    def run() -> None:
        while queue:
            node, payload = queue.popleft()
            for action in accs[node].handle(decode(payload)):  # type: ignore[arg-type]
                if hasattr(action, "TAG") and not isinstance(action, SendWal):
                    take(p.handle(0.0, node, decode(encode(action))))  # type: ignore[arg-type]

    take(p.start(0.0))
    run()
    for off in range(0, len(wal), 8192):
        take(p.append_wal(0.0, wal[off:off + 8192]))
        run()
    assert commit == Lsn(START + len(wal)), (commit, START + len(wal))


def run(report: Report, quick: bool) -> None:
    size = (8 if quick else 64) * _MB
    wal = _wal(size)
    small = _wal(size // 4, small=True)

    def track_small() -> None:
        t = RecordBoundaryTracker(START, START - 100, SEG)
        for off in range(0, len(small), 128 * 1024):
            t.feed(small[off:off + 128 * 1024])
        assert t.last_record_end == START + len(small)

    def track() -> None:
        t = RecordBoundaryTracker(START, START - 100, SEG)
        for off in range(0, len(wal), 128 * 1024):
            t.feed(wal[off:off + 128 * 1024])
        assert t.last_record_end == START + len(wal)

    def full_decode() -> None:
        d = WalStreamDecoder(Lsn(START), SEG, at_record_start=True)
        for off in range(0, len(wal), 128 * 1024):
            d.feed(wal[off:off + 128 * 1024])
            for _ in d:
                pass

    def append() -> None:
        acc = Acceptor(_state())
        acc.handle(_elected())
        for off in range(0, len(wal), 128 * 1024):
            acc.handle(AppendRequest(1, Lsn(START + off), Lsn(0), wal[off:off + 128 * 1024]))
        assert acc.last_record_end == Lsn(START + len(wal))

    report.add("record_bounds_mb_per_s", _rate(track, len(wal)), "MB/s",
               baseline=_rate(full_decode, len(wal)))
    report.add("record_bounds_small_mb_per_s", _rate(track_small, len(small)), "MB/s")
    report.add("acceptor_append_mb_per_s", _rate(append, len(wal)), "MB/s")
    report.add("quorum_commit_mb_per_s", _rate(lambda: _quorum(wal), len(wal)), "MB/s")
    seeds = 100 if quick else 500
    t0 = time.perf_counter()
    for seed in range(seeds):
        Simulation(seed).run()
    report.add("sim_seeds_per_s", seeds / (time.perf_counter() - t0), "seeds/s")
    report.note(f"{len(wal) / _MB:.0f} MB of generated XLOG_NOOP WAL, records of 0-20 KB")


def _elected() -> ProposerElected:
    return ProposerElected(1, Lsn(START), (TermEntry(1, Lsn(START), Lsn(START - 100)),))

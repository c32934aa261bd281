"""Crash at every failpoint of flush, compaction, GC and metadata writes, then restart.

Each test ingests a deterministic workload, makes part of it durable, arms one
failpoint, runs the operation that hits it (the raise simulates a crash: nothing is
cleaned up, the process state is abandoned), and reopens the repository from disk.
It then proves: disk_consistent_lsn did not go back; every read at or below it
matches the model; no ephemeral or half-written file survived the load; re-feeding
the WAL above disk_consistent_lsn restores every LSN exactly; and the timeline keeps
working (flush, compaction, GC, another restart).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strata.common import failpoint as fp
from strata.common.errors import UserError
from strata.common.failpoint import FailpointHit
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.relfile import RelTag
from strata.storage.compaction import compact
from strata.storage.gc import gc_timeline
from strata.storage.metadata import load_metadata
from strata.storage.repository import Repository
from strata.storage.tenant import TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image

RELS = [RelTag(1663, 5, 100, 0), RelTag(1663, 5, 101, 0)]
ZERO = bytes(8192)
TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(15) + b"\x07")

State = dict[RelTag, tuple[int, dict[int, bytes]]]


def page(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * 64 + bytes((tag + i) % 249 for i in range(8128))


class Workload:
    """Records i = 1..n: writes, a truncate and a drop/re-create, and the model states."""

    def __init__(self) -> None:
        self.records: list[tuple[int, list[tuple[str, RelTag, int]]]] = []
        self.states: list[tuple[int, State]] = []
        state: State = {}
        for i in range(1, 41):
            lsn = 0x1000 + i * 0x40
            rel = RELS[i % 2]
            if i == 17:
                ops = [("truncate", RELS[1], 1)]
            elif i == 25:
                ops = [("drop", RELS[0], 0)]
            elif i == 26:
                ops = [("create", RELS[0], 0)]
            else:
                ops = [("put", rel, (i * 5) % 6), ("put", rel, i % 3)]
            for kind, r, n in ops:
                state = self._apply(state, kind, r, n, i)
            self.records.append((lsn, ops))
            self.states.append((lsn, state))

    @staticmethod
    def _apply(state: State, kind: str, rel: RelTag, n: int, i: int) -> State:
        new = dict(state)
        nblocks, blocks = new.get(rel, (0, {}))
        if kind == "put":
            new[rel] = (max(nblocks, n + 1), {**blocks, n: page(i * 8 + n)})
        elif kind == "truncate" and rel in new and n < nblocks:
            new[rel] = (n, {b: v for b, v in blocks.items() if b < n})
        elif kind == "drop":
            new.pop(rel, None)
        elif kind == "create" and rel not in new:
            new[rel] = (0, {})
        return new

    def feed(self, tl: Timeline, after: int, upto: int) -> None:
        prev = 0
        for i, (lsn, ops) in enumerate(self.records, start=1):
            if after < lsn <= upto:
                for kind, rel, n in ops:
                    if kind == "put":
                        tl.put_rel_page(rel, n, Lsn(lsn), Image(page(i * 8 + n)))
                    elif kind == "truncate":
                        tl.truncate_rel(rel, n, Lsn(lsn))
                    elif kind == "drop":
                        tl.drop_rel(rel, Lsn(lsn))
                    else:
                        tl.create_rel(rel, Lsn(lsn))
                tl.finish_record(Lsn(lsn), Lsn(prev))
            prev = lsn

    def check(self, tl: Timeline, upto: int) -> None:
        for lsn, state in self.states:
            if lsn > upto or lsn < tl.gc_cutoff.value:
                continue
            at = Lsn(lsn)
            for rel in RELS:
                if rel not in state:
                    assert not tl.rel_exists(rel, at), (rel, at)
                    continue
                nblocks, blocks = state[rel]
                assert tl.rel_size(rel, at) == nblocks, (rel, at)
                for blkno in range(nblocks):
                    assert tl.get_rel_page(rel, blkno, at) == blocks.get(blkno, ZERO), \
                        (rel, blkno, at)


WL = Workload()
LAST = WL.records[-1][0]
MID = WL.records[19][0]
CONF = TenantConfig(checkpoint_distance=1 << 30, gc_horizon=0x100, pitr_interval_s=0.0,
                    image_creation_threshold=2, image_layer_keys=3)


def prepare(workdir: Path) -> tuple[Repository, Timeline, int]:
    """Ingest everything; the first half is durable in several layers, the rest in memory."""
    repo = Repository(workdir)
    tenant = repo.create_tenant(TENANT, CONF)
    tl = tenant.create_timeline(TIMELINE, Lsn(0x1000))
    for start in range(0, 20, 5):
        WL.feed(tl, WL.records[start][0] - 1, WL.records[start + 4][0])
        tl.flush()
    assert tl.disk_consistent_lsn == Lsn(MID)
    WL.feed(tl, MID, LAST)
    return repo, tl, MID


def reopen_and_verify(workdir: Path, acknowledged: int) -> Timeline:
    repo = Repository(workdir)
    tl = repo.get_tenant(TENANT).get_timeline(TIMELINE)
    dcl = tl.disk_consistent_lsn.value
    assert dcl >= acknowledged, (Lsn(dcl), Lsn(acknowledged))
    leftovers = [n for n in os.listdir(tl.dir)
                 if n.startswith("ephemeral-") or n.endswith(".tmp") or n.endswith("___temp")]
    assert not leftovers, leftovers
    for desc in tl.layers():
        assert desc.lsn_range[1].value <= dcl + 1, (desc, Lsn(dcl))
    WL.check(tl, dcl)
    WL.feed(tl, dcl, LAST)  # ingest re-feeds from disk_consistent_lsn
    WL.check(tl, LAST)
    return tl


FLUSH_POINTS = ["flush-before-write-layer", "flush-mid-layer", "flush-after-write-layer",
                "flush-before-metadata", "metadata-before-write", "metadata-before-rename",
                "metadata-before-dir-fsync", "flush-after-metadata"]
COMPACTION_POINTS = ["compaction-before-write-image", "compaction-mid-image",
                     "compaction-after-write-image"]
GC_POINTS = ["gc-before-cutoff-metadata", "gc-before-remove-layer"]


@pytest.fixture(autouse=True)
def _disarm() -> None:
    fp.disable_all()


@pytest.mark.parametrize("point", FLUSH_POINTS)
def test_crash_during_flush(tmp_path: Path, point: str) -> None:
    """Acknowledged data survives a crash at each step of a flush."""
    _, tl, acknowledged = prepare(tmp_path)
    with fp.armed(point), pytest.raises(FailpointHit):
        tl.flush()
    assert fp.hits(point) == 0  # disarmed on exit
    tl2 = reopen_and_verify(tmp_path, acknowledged)
    tl2.flush()
    compact(tl2)
    reopen_and_verify(tmp_path, LAST)


@pytest.mark.parametrize("point", COMPACTION_POINTS)
def test_crash_during_compaction(tmp_path: Path, point: str) -> None:
    _, tl, acknowledged = prepare(tmp_path)
    with fp.armed(point), pytest.raises(FailpointHit):
        compact(tl, force=True)
    tl2 = reopen_and_verify(tmp_path, acknowledged)
    assert compact(tl2, force=True).image_layers
    tl2.flush()
    reopen_and_verify(tmp_path, LAST)


@pytest.mark.parametrize("point", GC_POINTS)
def test_crash_during_gc(tmp_path: Path, point: str) -> None:
    repo, tl, _ = prepare(tmp_path)
    assert compact(tl, force=True).image_layers  # images at MID, below the coming cutoff
    tl.flush()
    with fp.armed(point), pytest.raises(FailpointHit):
        repo.get_tenant(TENANT).gc()
    cutoff_before = tl.gc_cutoff
    tl2 = reopen_and_verify(tmp_path, LAST)
    assert tl2.gc_cutoff == cutoff_before  # a persisted cutoff is never forgotten
    if point == "gc-before-remove-layer":
        assert tl2.gc_cutoff.value == LAST - CONF.gc_horizon
        with pytest.raises(UserError, match="GC cutoff"):
            tl2.get_rel_page(RELS[0], 0, Lsn(MID))
    result = gc_timeline(tl2, 0.0)  # GC again after the restart completes the job
    assert result.cutoff.value == LAST - CONF.gc_horizon
    assert result.removed
    WL.check(tl2, LAST)


def test_crash_while_creating_branch(tmp_path: Path) -> None:
    """A branch directory is created atomically: a crash leaves nothing that loads."""
    repo, tl, _ = prepare(tmp_path)
    with fp.armed("timeline-create-before-rename"), pytest.raises(FailpointHit):
        repo.get_tenant(TENANT).branch_timeline(TimelineId(os.urandom(16)), TIMELINE, Lsn(MID))
    repo2 = Repository(tmp_path)
    assert repo2.get_tenant(TENANT).list_timelines() == [TIMELINE]


def test_failpoint_callback_sees_consistent_reads(tmp_path: Path) -> None:
    """Between writing the layer file and the metadata, reads still see every version."""
    _, tl, _ = prepare(tmp_path)
    seen: list[int] = []

    def check_now() -> None:
        WL.check(tl, LAST)
        seen.append(1)

    with fp.armed("flush-after-write-layer", action=check_now):
        tl.flush()
    assert seen == [1]
    assert load_metadata(tl.dir).disk_consistent_lsn == Lsn(LAST)


def test_is_armed_follows_enable_and_disable() -> None:
    assert not fp.is_armed("test-is-armed")
    fp.enable("test-is-armed")
    try:
        assert fp.is_armed("test-is-armed") and not fp.is_armed("test-is-armed-other")
    finally:
        fp.disable("test-is-armed")
    assert not fp.is_armed("test-is-armed")

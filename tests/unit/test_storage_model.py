"""The storage engine against a plain model, under random operations (hypothesis).

Random writes (images and byte patches, several per record), truncates with sparse
regrowth, drops and re-creates, branches, leases, freezes, flushes, compactions, GC
runs and restarts (reopen the repository from disk and re-feed the WAL above
disk_consistent_lsn, as ingest does). The model is a list of whole-state snapshots
per timeline: {rel: (nblocks, {blkno: page})}. After each step a random timeline is
read at random LSNs: every read at a retained LSN must equal the model; a read below
a GC cutoff must raise, never return data.

SLRU pages (long delta chains, read through the timeline's value cache with its
threshold lowered to one delta) are in the same model as one-block pseudo relations
`SLRU_TAGS` (tablespace 0, so never listed as relations): puts of images and patches,
and tombstones. Ingest's bound on their delta chains is lowered to `SLRU_BOUND` deltas,
so patches often become images; no read of them applies more.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from strata.common.errors import NotFound, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.constants import BKPIMAGE_COMPRESS_ZSTD
from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind
from strata.storage import timeline as timeline_module
from strata.storage.compaction import compact
from strata.storage.key import slru_block_key
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image, Patch, PatchOp, Tombstone, Value, WalImage

RELS = [RelTag(1663, 5, 16384, 0), RelTag(1663, 5, 16384, 1), RelTag(1663, 5, 16390, 0)]
MAX_BLOCK = 7
SLRU_KEYS = [slru_block_key(SlruKind.CLOG, 0, 0), slru_block_key(SlruKind.CLOG, 0, 1),
             slru_block_key(SlruKind.MULTIXACT_MEMBERS, 0, 0)]
SLRU_TAGS = [RelTag(0, 0, i, 0) for i in range(len(SLRU_KEYS))]  # the model's names
ZERO = bytes(8192)
SLRU_BOUND = 2  # timeline.SLRU_IMAGE_DELTAS in this test
INITDB = 0x100
_zstd = zstandard.ZstdCompressor()

RelState = tuple[int, dict[int, bytes]]
State = dict[RelTag, RelState]
Op = tuple[str, RelTag, int, Value | None]


def page(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * 16 + bytes(((tag * 31 + i) % 253) for i in range(8176))


def wal_image(data: bytes) -> WalImage:
    """The page as PostgreSQL logs it with wal_compression=zstd (pd_lsn set on read)."""
    return WalImage(BKPIMAGE_COMPRESS_ZSTD, 0, 0, _zstd.compress(data), 0x5000, False)


def apply_model(state: State, op: Op) -> State:
    kind, rel, n, value = op
    new = dict(state)
    nblocks, blocks = new.get(rel, (0, {}))
    if kind == "put":
        assert value is not None
        blocks = dict(blocks)
        if isinstance(value, Image):
            blocks[n] = value.data
        elif isinstance(value, WalImage):
            blocks[n] = value.materialize()
        else:
            assert isinstance(value, Patch)
            base = bytearray(blocks.get(n, ZERO))
            value.apply(base)
            blocks[n] = bytes(base)
        new[rel] = (max(nblocks, n + 1), blocks)
    elif kind == "truncate":
        if rel in new and n < nblocks:
            new[rel] = (n, {b: v for b, v in blocks.items() if b < n})
    elif kind == "drop":
        new.pop(rel, None)
    elif kind == "create":
        if rel not in new:
            new[rel] = (0, {})
    elif kind == "slru_put":  # a Tombstone's page reads as zeros under a patch
        assert value is not None
        if isinstance(value, Image):
            data = value.data
        else:
            assert isinstance(value, Patch)
            base = bytearray(blocks.get(0, ZERO))
            value.apply(base)
            data = bytes(base)
        new[rel] = (1, {0: data})
    elif kind == "slru_drop":
        new.pop(rel, None)
    return new


def apply_timeline(tl: Timeline, lsn: int, op: Op) -> None:
    kind, rel, n, value = op
    if kind == "put":
        assert value is not None
        tl.put_rel_page(rel, n, Lsn(lsn), value)
    elif kind == "truncate":
        tl.truncate_rel(rel, n, Lsn(lsn))
    elif kind == "drop":
        tl.drop_rel(rel, Lsn(lsn))
    elif kind == "slru_put":
        assert value is not None
        tl.put(SLRU_KEYS[rel.relnode], Lsn(lsn), value)
    elif kind == "slru_drop":
        tl.put(SLRU_KEYS[rel.relnode], Lsn(lsn), Tombstone())
    else:
        tl.create_rel(rel, Lsn(lsn))


@dataclass
class ModelTimeline:
    timeline_id: TimelineId
    ancestor: ModelTimeline | None
    branch_lsn: int
    history: list[tuple[int, State]]  # (record end lsn, state after it), lsn increasing
    records: list[tuple[int, int, list[Op]]] = field(default_factory=list)
    leases: dict[int, float] = field(default_factory=dict)

    def state_at(self, lsn: int) -> State:
        for rec_lsn, state in reversed(self.history):
            if rec_lsn <= lsn:
                return state
        assert self.ancestor is not None, (lsn, self.history[0][0])
        return self.ancestor.state_at(min(lsn, self.branch_lsn))

    @property
    def last_lsn(self) -> int:
        return self.history[-1][0]


class StorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="strata-model-"))
        self.now = 1000.0
        self.conf = TenantConfig(checkpoint_distance=0x200, checkpoint_timeout_s=1e9,
                                 gc_horizon=0x80, pitr_interval_s=0.0,
                                 image_creation_threshold=2, image_layer_keys=4)
        self.repo = Repository(self.dir, clock=lambda: self.now)
        self.tenant_id = TenantId(bytes(16))
        self.repo.create_tenant(self.tenant_id, self.conf)
        self.model: dict[TimelineId, ModelTimeline] = {}
        # Every SLRU value built from a delta is remembered, not only long chains.
        self.chain_deltas = timeline_module.CACHE_CHAIN_DELTAS
        timeline_module.CACHE_CHAIN_DELTAS = 1
        self.image_deltas = timeline_module.SLRU_IMAGE_DELTAS
        timeline_module.SLRU_IMAGE_DELTAS = SLRU_BOUND

    @property
    def tenant(self) -> Tenant:
        return self.repo.get_tenant(self.tenant_id)

    def tl(self, m: ModelTimeline) -> Timeline:
        return self.tenant.get_timeline(m.timeline_id)

    def teardown(self) -> None:
        timeline_module.CACHE_CHAIN_DELTAS = self.chain_deltas
        timeline_module.SLRU_IMAGE_DELTAS = self.image_deltas
        self.repo.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def create_root(self) -> None:
        tid = TimelineId(bytes(15) + b"\x01")
        self.tenant.create_timeline(tid, Lsn(INITDB))
        self.model[tid] = ModelTimeline(tid, None, 0, [(0, {})])

    def pick(self, data: st.DataObject) -> ModelTimeline:
        ids = sorted(self.model)
        return self.model[data.draw(st.sampled_from(ids), label="timeline")]

    def ingest(self, m: ModelTimeline, lsn: int, prev: int, ops: list[Op]) -> None:
        tl = self.tl(m)
        state = m.history[-1][1]
        for op in ops:
            apply_timeline(tl, lsn, op)
            state = apply_model(state, op)
        tl.finish_record(Lsn(lsn), Lsn(prev))
        m.history.append((lsn, state))
        m.records.append((lsn, prev, ops))

    def next_lsn(self, m: ModelTimeline, data: st.DataObject) -> tuple[int, int]:
        last = max(m.last_lsn, INITDB)
        return last + 8 * data.draw(st.integers(1, 40), label="step"), m.last_lsn

    # --- WAL -----------------------------------------------------------------
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        m = self.pick(data)
        ops: list[Op] = []
        for _ in range(data.draw(st.integers(1, 3), label="puts")):
            rel = data.draw(st.sampled_from(RELS), label="rel")
            blkno = data.draw(st.integers(0, MAX_BLOCK), label="blkno")
            kind = data.draw(st.sampled_from(["image", "wal", "patch"]), label="value")
            if kind == "image":
                value: Value = Image(page(data.draw(st.integers(0, 255), label="tag")))
            elif kind == "wal":
                value = wal_image(page(data.draw(st.integers(0, 255), label="tag")))
            else:
                offset = data.draw(st.integers(16, 8191), label="offset")
                value = Patch((PatchOp(offset, 0x0F, data.draw(st.integers(0, 255))),))
            ops.append(("put", rel, blkno, value))
        lsn, prev = self.next_lsn(m, data)
        self.ingest(m, lsn, prev, ops)

    @rule(data=st.data())
    def write_slru(self, data: st.DataObject) -> None:
        """A run of records on SLRU pages, mostly patches (as commits set status bits)."""
        m = self.pick(data)
        for _ in range(data.draw(st.integers(1, 6), label="records")):
            tag = data.draw(st.sampled_from(SLRU_TAGS), label="slru page")
            kind = data.draw(st.sampled_from(["patch"] * 6 + ["image", "tombstone"]),
                             label="slru value")
            if kind == "tombstone":
                op: Op = ("slru_drop", tag, 0, None)
            elif kind == "image":
                op = ("slru_put", tag, 0, Image(page(data.draw(st.integers(0, 255)))))
            else:
                offset = data.draw(st.integers(0, 8191), label="offset")
                op = ("slru_put", tag, 0,
                      Patch((PatchOp(offset, 0x03, data.draw(st.integers(0, 3))),)))
            lsn, prev = self.next_lsn(m, data)
            self.ingest(m, lsn, prev, [op])

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        m = self.pick(data)
        rel = data.draw(st.sampled_from(RELS), label="rel")
        lsn, prev = self.next_lsn(m, data)
        self.ingest(m, lsn, prev, [("truncate", rel, data.draw(st.integers(0, 4)), None)])

    @rule(data=st.data())
    def drop_or_create(self, data: st.DataObject) -> None:
        m = self.pick(data)
        rel = data.draw(st.sampled_from(RELS), label="rel")
        kind = data.draw(st.sampled_from(["drop", "create"]), label="kind")
        lsn, prev = self.next_lsn(m, data)
        self.ingest(m, lsn, prev, [(kind, rel, 0, None)])

    # --- branches and leases ---------------------------------------------------
    def retained_lsns(self, m: ModelTimeline) -> list[int]:
        tl = self.tl(m)
        own = [lsn for lsn, _ in m.history if lsn >= INITDB]
        return [lsn for lsn in own if lsn >= tl.gc_cutoff.value and self.readable(tl, lsn)]

    def readable(self, tl: Timeline, lsn: int) -> bool:
        if lsn < tl.gc_cutoff.value:
            return False
        if tl.ancestor is not None and lsn <= tl.ancestor_lsn.value:
            return self.readable(tl.ancestor, lsn)
        return True

    @precondition(lambda self: len(self.model) < 4)
    @rule(data=st.data())
    def branch(self, data: st.DataObject) -> None:
        m = self.pick(data)
        candidates = self.retained_lsns(m)
        if not candidates:
            return
        lsn = data.draw(st.sampled_from(candidates), label="branch lsn")
        tid = TimelineId(bytes(15) + bytes([len(self.model) + 1]))  # deterministic order
        prev = next((p for rec_lsn, p, _ in m.records if rec_lsn == lsn), 0)
        self.tenant.branch_timeline(tid, m.timeline_id, Lsn(lsn), Lsn(prev))
        self.model[tid] = ModelTimeline(tid, m, lsn, [(lsn, m.state_at(lsn))])

    @rule(data=st.data())
    def lease(self, data: st.DataObject) -> None:
        m = self.pick(data)
        candidates = self.retained_lsns(m)
        if not candidates:
            return
        lsn = data.draw(st.sampled_from(candidates), label="lease lsn")
        duration = data.draw(st.sampled_from([5.0, 50.0]), label="duration")
        tl = self.tl(m)
        expiry = tl.leases.lease(Lsn(lsn), duration, self.now, tl.gc_cutoff)
        m.leases[lsn] = expiry

    @rule(seconds=st.sampled_from([1.0, 10.0, 100.0]))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    # --- maintenance -----------------------------------------------------------
    @rule(data=st.data())
    def freeze(self, data: st.DataObject) -> None:
        self.tl(self.pick(data)).freeze()

    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        self.tl(self.pick(data)).flush()

    @rule(data=st.data(), force=st.booleans())
    def compaction(self, data: st.DataObject, force: bool) -> None:
        m = self.pick(data)
        self.tl(m).flush()
        compact(self.tl(m), force=force)

    @rule()
    def gc(self) -> None:
        self.tenant.gc()

    @rule()
    def restart(self) -> None:
        """Crash-restart: in-memory layers are lost; re-feed WAL above disk_consistent_lsn."""
        self.repo.close()
        self.repo = Repository(self.dir, clock=lambda: self.now)
        for m in sorted(self.model.values(), key=lambda m: m.branch_lsn):
            tl = self.tl(m)
            dcl = tl.disk_consistent_lsn.value
            assert dcl <= m.last_lsn, (dcl, m.last_lsn)
            for lsn, prev, ops in m.records:
                if lsn > dcl:
                    for op in ops:
                        apply_timeline(tl, lsn, op)
                    tl.finish_record(Lsn(lsn), Lsn(prev))
            assert tl.last_record_lsn.value == m.last_lsn
            # Leases live in memory only: the compute renews them; renew here.
            for lsn, expiry in m.leases.items():
                if expiry > self.now and lsn >= tl.gc_cutoff.value:
                    tl.leases.lease(Lsn(lsn), expiry - self.now, self.now, tl.gc_cutoff)

    # --- checks ----------------------------------------------------------------
    @invariant()
    def timelines_consistent(self) -> None:
        for m in self.model.values():
            self.tl(m).check_invariants()

    @invariant()
    def cutoff_respects_leases_and_branches(self) -> None:
        for m in self.model.values():
            tl = self.tl(m)
            for lsn, expiry in m.leases.items():
                if expiry > self.now:
                    assert tl.gc_cutoff.value <= lsn, (tl.gc_cutoff, Lsn(lsn))
            for child in tl.children:
                assert tl.gc_cutoff <= child.ancestor_lsn, (tl.gc_cutoff, child.ancestor_lsn)

    @invariant()
    def slru_chains_bounded(self) -> None:
        for m in self.model.values():
            tl = self.tl(m)
            at = Lsn(max(m.last_lsn, INITDB))
            if self.readable(tl, at.value):
                for key in SLRU_KEYS:
                    assert tl.delta_chain(key, at) <= SLRU_BOUND, (key, at)

    @rule(data=st.data())
    def check_reads(self, data: st.DataObject) -> None:
        m = self.pick(data)
        tl = self.tl(m)
        lsns = [lsn for lsn, _ in m.history if lsn >= INITDB]
        if m.ancestor is not None:
            lsns += [lsn for lsn, _ in m.ancestor.history if INITDB <= lsn <= m.branch_lsn]
        if not lsns:
            return
        lsn = data.draw(st.sampled_from(sorted(set(lsns))), label="read lsn")
        lsn += data.draw(st.sampled_from([0, 0, 4]), label="between")
        self.check_at(m, tl, min(lsn, m.last_lsn))

    def check_at(self, m: ModelTimeline, tl: Timeline, lsn: int) -> None:
        at = Lsn(lsn)
        if not self.readable(tl, lsn):
            try:
                tl.get_rel_page(RELS[0], 0, at)
            except UserError as err:
                assert "GC cutoff" in str(err), err
            else:
                raise AssertionError(f"read at {at} below the GC cutoff returned data")
            return
        state = m.state_at(lsn)
        for key, tag in zip(SLRU_KEYS, SLRU_TAGS, strict=True):
            if tag in state:
                assert tl.get(key, at) == state[tag][1][0], (key, at)
            else:
                try:
                    tl.get(key, at)
                except NotFound:
                    pass
                else:
                    raise AssertionError(f"SLRU page {key} at {at} exists, not in the model")
        state = {rel: v for rel, v in state.items() if rel.spcnode != 0}
        assert tl.list_rels(1663, 5, at) == set(state), (at, sorted(state))
        for rel in RELS:
            if rel not in state:
                assert not tl.rel_exists(rel, at), (rel, at)
                continue
            nblocks, blocks = state[rel]
            assert tl.rel_size(rel, at) == nblocks, (rel, at)
            for blkno in range(nblocks):
                got = tl.get_rel_page(rel, blkno, at)
                assert got == blocks.get(blkno, ZERO), (rel, blkno, at, got[:16])
            try:
                tl.get_rel_page(rel, nblocks, at)
            except NotFound:
                pass
            else:
                raise AssertionError(f"block {nblocks} of {rel} at {at} is beyond the size")


TestStorageModel = StorageMachine.TestCase
TestStorageModel.settings = settings(max_examples=30, stateful_step_count=60, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])

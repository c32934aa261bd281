"""Timeline behaviour: reads across in-memory, frozen and on-disk layers, relation sizes and
cuts, branches, LSN waits, the LSN-time index, compaction, GC, leases, corruption, restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import zstandard

from strata.common.errors import CorruptionError, NotFound, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.datadir import drop_database, list_databases, put_database
from strata.pg.constants import BKPIMAGE_COMPRESS_ZSTD
from strata.pg.page import page_lsn
from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind
from strata.storage import timeline as timeline_module
from strata.storage.compaction import compact
from strata.storage.key import (
    Key,
    checkpoint_key,
    slru_block_key,
    twophase_key,
    twophase_range,
)
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline, TimelineBroken
from strata.storage.value import Image, Patch, PatchOp, WalImage

REL = RelTag(1663, 5, 16384, 0)
REL2 = RelTag(1663, 5, 16385, 0)
ZERO = bytes(8192)


def page(tag: int) -> bytes:
    """A recognizable 8 KB page: tag in the first and last byte, rest a pattern."""
    body = bytearray((tag * 7 + i) % 251 for i in range(8192))
    body[0] = tag & 0xFF
    return bytes(body)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_tenant(tmp_path: Path, clock: Clock | None = None, **conf: object) -> tuple[
        Repository, Tenant]:
    repo = Repository(tmp_path, clock=clock or Clock())
    tenant = repo.create_tenant(TenantId(bytes(range(16))), TenantConfig(**conf))  # type: ignore[arg-type]
    return repo, tenant


def new_timeline(tenant: Tenant) -> Timeline:
    return tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(0x100))


def record(tl: Timeline, lsn: int, *puts: tuple[int, bytes]) -> None:
    """One WAL record ending at `lsn` writing block -> page of REL."""
    for blkno, data in puts:
        tl.put_rel_page(REL, blkno, Lsn(lsn), Image(data))
    tl.finish_record(Lsn(lsn), Lsn(lsn - 8))


def test_reads_across_open_frozen_and_disk_layers(tmp_path: Path) -> None:
    """A key's versions read correctly at every LSN wherever they live."""
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)))
    tl.freeze()
    tl.flush_frozen()
    record(tl, 0x300, (0, page(2)), (1, page(3)))
    tl.freeze()  # frozen, not flushed
    record(tl, 0x400, (0, page(4)))  # open
    assert tl.disk_consistent_lsn == Lsn(0x200)
    assert tl.get_rel_page(REL, 0, Lsn(0x200)) == page(1)
    assert tl.get_rel_page(REL, 0, Lsn(0x2FF)) == page(1)
    assert tl.get_rel_page(REL, 0, Lsn(0x300)) == page(2)
    assert tl.get_rel_page(REL, 0, Lsn(0x400)) == page(4)
    assert tl.get_rel_page(REL, 1, Lsn(0x400)) == page(3)
    assert tl.rel_size(REL, Lsn(0x200)) == 1
    assert tl.rel_size(REL, Lsn(0x300)) == 2
    with pytest.raises(NotFound, match="block 1 of rel 1663/5/16384 fork 0"):
        tl.get_rel_page(REL, 1, Lsn(0x200))
    with pytest.raises(NotFound):
        tl.rel_size(REL, Lsn(0x1FF))


def test_deltas_apply_on_images_and_zero_base(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    tl.put_rel_page(REL, 0, Lsn(0x200), Image(page(1)))
    tl.put_rel_page(REL, 1, Lsn(0x200), Patch((PatchOp(10, 0, 0x80),)))
    tl.finish_record(Lsn(0x200), Lsn(0x1F0))
    tl.flush()
    tl.put_rel_page(REL, 0, Lsn(0x300), Patch((PatchOp(0, 0xFF, 0x42),)))
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    expected = bytearray(page(1))
    expected[0] = 0x42
    assert tl.get_rel_page(REL, 0, Lsn(0x300)) == bytes(expected)
    one = bytearray(ZERO)
    one[10] = 0x80
    assert tl.get_rel_page(REL, 1, Lsn(0x300)) == bytes(one)


def test_wal_image_compressed_is_materialized_with_page_lsn(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    raw = bytearray(page(9))
    raw[0:8] = bytes(8)  # a stale pd_lsn
    data = zstandard.ZstdCompressor().compress(bytes(raw))
    tl.put_rel_page(REL, 0, Lsn(0x2000), WalImage(BKPIMAGE_COMPRESS_ZSTD, 0, 0, data, 0x2000,
                                                  False))
    tl.finish_record(Lsn(0x2000), Lsn(0x1FF0))
    got = tl.get_rel_page(REL, 0, Lsn(0x2000))
    assert page_lsn(got) == 0x2000
    assert got[8:] == bytes(raw[8:])
    tl.flush()
    assert tl.get_rel_page(REL, 0, Lsn(0x2000)) == got


def test_truncate_then_sparse_regrowth_reads_zeros(tmp_path: Path) -> None:
    """Versions from before a truncate are never served, even after the fork grows back."""
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, *[(b, page(b + 1)) for b in range(6)])
    tl.flush()
    tl.truncate_rel(REL, 2, Lsn(0x300))
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    assert tl.rel_size(REL, Lsn(0x300)) == 2
    with pytest.raises(NotFound):
        tl.get_rel_page(REL, 3, Lsn(0x300))
    tl.truncate_rel(REL, 0, Lsn(0x400))
    tl.finish_record(Lsn(0x400), Lsn(0x300))
    record(tl, 0x500, (5, page(50)))
    for blkno in range(5):
        assert tl.get_rel_page(REL, blkno, Lsn(0x500)) == ZERO, blkno
    assert tl.get_rel_page(REL, 5, Lsn(0x500)) == page(50)
    # History is intact at older LSNs.
    assert tl.get_rel_page(REL, 1, Lsn(0x300)) == page(2)
    assert tl.get_rel_page(REL, 4, Lsn(0x200)) == page(5)
    # And the same after flushing and compacting everything into image layers.
    tl.flush()
    compact(tl, force=True)
    for blkno in range(5):
        assert tl.get_rel_page(REL, blkno, Lsn(0x500)) == ZERO, blkno
    assert tl.get_rel_page(REL, 5, Lsn(0x500)) == page(50)
    assert tl.get_rel_page(REL, 1, Lsn(0x300)) == page(2)


def test_current_nblocks_is_the_size_at_the_record_in_progress(tmp_path: Path) -> None:
    """Ingest's `current_nblocks` sees the puts of the record not yet finished, 0 for a
    fork that does not exist, and agrees with `rel_size` once the record is finished,
    also for a fork whose size only an on-disk layer holds (a restart: no cache)."""
    repo, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    assert tl.current_nblocks(REL) == 0
    tl.put_rel_page(REL, 3, Lsn(0x200), Image(page(1)))
    assert tl.current_nblocks(REL) == 4  # before finish_record
    tl.finish_record(Lsn(0x200), Lsn(0x100))
    assert tl.current_nblocks(REL) == tl.rel_size(REL, Lsn(0x200)) == 4
    tl.truncate_rel(REL, 2, Lsn(0x300))
    assert tl.current_nblocks(REL) == 2
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    tl.flush()
    tl_id = tl.timeline_id
    repo.close()
    repo2 = Repository(tmp_path, clock=Clock())
    tl2 = repo2.get_tenant(tenant.tenant_id).get_timeline(tl_id)
    assert tl2.current_nblocks(REL) == tl2.rel_size(REL, Lsn(0x300)) == 2
    tl2.drop_rel(REL, Lsn(0x400))
    assert tl2.current_nblocks(REL) == 0
    assert tl2.current_nblocks(REL2) == 0
    repo2.close()


def test_key_sizes_by_makes_the_callers_reltag_the_cache_key(tmp_path: Path) -> None:
    """After `key_sizes_by(rel)` the size cache holds that very object for the fork (so
    ingest's lookups match by identity), and the sizes it answers do not change."""
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, (2, page(1)))
    ours = RelTag(REL.spcnode, REL.dbnode, REL.relnode, REL.forknum)
    assert ours == REL and ours is not REL
    tl.key_sizes_by(ours)
    assert [k for k in tl._rel_cache if k == REL][0] is ours
    assert tl.current_nblocks(ours) == tl.rel_size(REL, Lsn(0x200)) == 3
    tl.key_sizes_by(REL2)  # not cached: nothing to re-key, nothing added
    assert REL2 not in tl._rel_cache


def test_drop_and_recreate_forgets_old_blocks(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)), (1, page(2)))
    tl.drop_rel(REL, Lsn(0x300))
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    assert not tl.rel_exists(REL, Lsn(0x300))
    with pytest.raises(NotFound, match="does not exist"):
        tl.get_rel_page(REL, 0, Lsn(0x300))
    tl.create_rel(REL, Lsn(0x400))
    tl.finish_record(Lsn(0x400), Lsn(0x300))
    assert tl.rel_size(REL, Lsn(0x400)) == 0
    record(tl, 0x500, (1, page(7)))
    assert tl.get_rel_page(REL, 0, Lsn(0x500)) == ZERO
    assert tl.get_rel_page(REL, 1, Lsn(0x500)) == page(7)
    assert tl.get_rel_page(REL, 1, Lsn(0x200)) == page(2)


def test_list_rels_dbs_and_drop_db(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    put_database(tl, 1663, 5, Lsn(0x200), b"15\n")
    put_database(tl, 1663, 6, Lsn(0x200), b"15\n")
    tl.create_rel(REL, Lsn(0x200))
    tl.put_rel_page(REL2, 0, Lsn(0x200), Image(page(1)))
    tl.create_rel(RelTag(1663, 6, 1, 0), Lsn(0x200))
    tl.finish_record(Lsn(0x200), Lsn(0x100))
    assert list_databases(tl, Lsn(0x200)) == {(1663, 5), (1663, 6)}
    assert tl.list_rels(1663, 5, Lsn(0x200)) == {REL, REL2}
    tl.flush()
    drop_database(tl, 1663, 5, Lsn(0x300))
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    assert list_databases(tl, Lsn(0x300)) == {(1663, 6)}
    assert tl.list_rels(1663, 5, Lsn(0x300)) == set()
    assert tl.list_rels(1663, 6, Lsn(0x300)) == {RelTag(1663, 6, 1, 0)}
    assert tl.list_rels(1663, 5, Lsn(0x200)) == {REL, REL2}
    # rel_sizes is list_rels with rel_size, at every LSN (the dropped database too).
    assert tl.rel_sizes(1663, 5, Lsn(0x200)) == {REL: 0, REL2: 1}
    assert tl.rel_sizes(1663, 5, Lsn(0x300)) == {}
    assert tl.rel_sizes(1663, 6, Lsn(0x300)) == {RelTag(1663, 6, 1, 0): 0}
    assert tl.rel_sizes(1663, 5, Lsn(0x200)) == {REL: 0, REL2: 1}


def test_generic_keys_scan_and_tombstones(tmp_path: Path) -> None:
    from strata.storage.value import Tombstone

    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    tl.put(twophase_key(700), Lsn(0x200), Image(b"state-700"))
    tl.put(twophase_key(701), Lsn(0x200), Image(b"state-701"))
    tl.put(checkpoint_key(), Lsn(0x200), Image(b"ckpt"))
    tl.finish_record(Lsn(0x200), Lsn(0x100))
    tl.flush()
    tl.put(twophase_key(700), Lsn(0x300), Tombstone())
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    assert list(tl.scan(twophase_range(), Lsn(0x300))) == [(twophase_key(701), b"state-701")]
    assert [k for k, _ in tl.scan(twophase_range(), Lsn(0x200))] == [
        twophase_key(700), twophase_key(701)]
    with pytest.raises(NotFound):
        tl.get(twophase_key(700), Lsn(0x300))
    assert tl.get(checkpoint_key(), Lsn(0x300)) == b"ckpt"


def test_branch_reads_fall_through_and_diverge(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    main = new_timeline(tenant)
    record(main, 0x200, (0, page(1)))
    main.flush()
    record(main, 0x300, (0, page(2)))
    branch = tenant.branch_timeline(TimelineId(os.urandom(16)), main.timeline_id, Lsn(0x200))
    assert branch.ancestor is main
    assert branch.last_record_lsn == Lsn(0x200)
    record(branch, 0x280, (1, page(10)))
    record(main, 0x400, (1, page(20)))
    assert branch.get_rel_page(REL, 0, Lsn(0x280)) == page(1)
    assert branch.get_rel_page(REL, 1, Lsn(0x280)) == page(10)
    assert branch.get_rel_page(REL, 0, Lsn(0x200)) == page(1)
    assert main.get_rel_page(REL, 0, Lsn(0x400)) == page(2)
    assert main.get_rel_page(REL, 1, Lsn(0x400)) == page(20)
    with pytest.raises(NotFound):
        branch.get_rel_page(REL, 1, Lsn(0x200))
    # Branch of a branch, below the first branch's own writes.
    sub = tenant.branch_timeline(TimelineId(os.urandom(16)), branch.timeline_id, Lsn(0x280))
    assert sub.get_rel_page(REL, 1, Lsn(0x280)) == page(10)
    assert sub.prev_record_lsn == Lsn(0x280 - 8)


def test_branch_refusals(tmp_path: Path) -> None:
    clock = Clock()
    _, tenant = make_tenant(tmp_path, clock, gc_horizon=0x100, pitr_interval_s=0.0)
    main = new_timeline(tenant)
    with pytest.raises(UserError, match="initdb"):
        tenant.branch_timeline(TimelineId(os.urandom(16)), main.timeline_id, Lsn(0x80))
    for i in range(2, 10):
        record(main, i * 0x100, (0, page(i)))
    with pytest.raises(UserError, match="beyond its last_record_lsn"):
        tenant.branch_timeline(TimelineId(os.urandom(16)), main.timeline_id, Lsn(0x1000))
    main.flush()
    tenant.gc()
    assert main.gc_cutoff == Lsn(0x800)
    with pytest.raises(UserError, match="below its GC cutoff"):
        tenant.branch_timeline(TimelineId(os.urandom(16)), main.timeline_id, Lsn(0x700))
    with pytest.raises(UserError, match="GC cutoff"):
        main.get_rel_page(REL, 0, Lsn(0x700))
    assert main.get_rel_page(REL, 0, Lsn(0x800)) == page(8)


def test_wait_for_lsn(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)

    async def scenario() -> None:
        waiter = asyncio.create_task(tl.wait_for_lsn(Lsn(0x300), timeout_s=5))
        await asyncio.sleep(0)
        assert not waiter.done()
        record(tl, 0x200, (0, page(1)))
        await asyncio.sleep(0)
        assert not waiter.done()
        record(tl, 0x300, (0, page(2)))
        await asyncio.wait_for(waiter, 1)
        await tl.wait_for_lsn(Lsn(0x100), timeout_s=0.01)
        with pytest.raises(Unavailable, match="last_record_lsn is 0/300"):
            await tl.wait_for_lsn(Lsn(0x400), timeout_s=0.05)

    asyncio.run(scenario())


def test_lsn_for_timestamp_survives_restart(tmp_path: Path) -> None:
    repo, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    for i, ts in enumerate([100, 200, 300, 400]):
        lsn = Lsn(0x200 + i * 0x100)
        record(tl, lsn.value, (0, page(i)))
        tl.put_lsn_time(lsn, ts)
    assert tl.find_lsn_for_timestamp(250) == Lsn(0x300)
    assert tl.find_lsn_for_timestamp(300) == Lsn(0x400)
    assert tl.find_lsn_for_timestamp(10_000) == Lsn(0x500)
    with pytest.raises(NotFound):
        tl.find_lsn_for_timestamp(99)
    branch = tenant.branch_timeline(TimelineId(os.urandom(16)), tl.timeline_id, Lsn(0x300))
    assert branch.find_lsn_for_timestamp(10_000) == Lsn(0x300)
    tl.flush()
    tid = tl.timeline_id
    repo.close()
    repo2 = Repository(tmp_path, clock=Clock())
    tl2 = repo2.get_tenant(tenant.tenant_id).get_timeline(tid)
    assert tl2.find_lsn_for_timestamp(250) == Lsn(0x300)
    assert tl2.find_lsn_for_timestamp(10_000) == Lsn(0x500)


def test_mark_broken_refuses_reads(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)))
    tl.mark_broken("block ref without image at 0/200 (Heap)")
    with pytest.raises(TimelineBroken, match="without image at 0/200"):
        tl.get_rel_page(REL, 0, Lsn(0x200))


def test_freeze_at_checkpoint_distance_and_timeout(tmp_path: Path) -> None:
    clock = Clock()
    _, tenant = make_tenant(tmp_path, clock, checkpoint_distance=0x1000,
                            checkpoint_timeout_s=60.0)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)))
    record(tl, 0x1000, (0, page(2)))
    assert tl._open is not None
    record(tl, 0x1300, (0, page(3)))  # 0x1300 - 0x101 >= 0x1000: freeze
    assert tl._open is None and len(tl._frozen) == 1
    record(tl, 0x1400, (0, page(4)))
    clock.now += 61
    record(tl, 0x1500, (0, page(5)))
    assert len(tl._frozen) == 2
    tl.flush_frozen()
    assert tl.disk_consistent_lsn == Lsn(0x1500)
    assert tl.get_rel_page(REL, 0, Lsn(0x1300)) == page(3)


def test_compaction_creates_images_and_gc_removes_layers(tmp_path: Path) -> None:
    clock = Clock()
    _, tenant = make_tenant(tmp_path, clock, image_creation_threshold=3, gc_horizon=0,
                            pitr_interval_s=0.0)
    tl = new_timeline(tenant)
    for i in range(1, 7):
        record(tl, 0x100 + i * 0x100, (0, page(i)), (i, page(100 + i)))
        tl.flush()
        compact(tl)
    images = [d for d in tl.layers() if not d.is_delta]
    assert images, tl.layers()
    expected = {i: tl.get_rel_page(REL, 0, Lsn(0x100 + i * 0x100)) for i in range(1, 7)}
    assert expected == {i: page(i) for i in range(1, 7)}
    lease_lsn = Lsn(0x400)
    tl.leases.lease(lease_lsn, 100.0, clock.now, tl.gc_cutoff)
    before = set(tl.layers())
    result = tenant.gc()[tl.timeline_id]
    assert result.cutoff == lease_lsn  # the lease holds the cutoff back
    assert tl.get_rel_page(REL, 0, Lsn(0x400)) == page(3)
    assert tl.get_rel_page(REL, 3, Lsn(0x400)) == page(103)
    clock.now += 200  # the lease expires
    result = tenant.gc()[tl.timeline_id]
    assert result.expired_leases == 1
    assert result.cutoff == Lsn(0x700)
    assert result.removed, "layers fully below an image layer at the cutoff must go"
    assert set(tl.layers()) < before
    for desc in result.removed:
        assert not (tl.dir / desc.file_name()).exists()
    with pytest.raises(UserError, match="GC cutoff"):
        tl.get_rel_page(REL, 0, Lsn(0x600))
    assert tl.get_rel_page(REL, 0, Lsn(0x700)) == page(6)
    for i in range(1, 7):
        assert tl.get_rel_page(REL, i, Lsn(0x700)) == page(100 + i)


def test_gc_leaves_a_reader_in_use_readable(tmp_path: Path) -> None:
    """A layer GC removes while another thread holds its reader stays readable through
    that reader (the file is unlinked, not closed under it)."""
    clock = Clock()
    _, tenant = make_tenant(tmp_path, clock, image_creation_threshold=2, gc_horizon=0,
                            pitr_interval_s=0.0)
    tl = new_timeline(tenant)
    for i in range(1, 5):
        record(tl, 0x100 + i * 0x100, (0, page(i)))
        tl.flush()
        compact(tl)
    held = {desc: tl._reader(desc) for desc in tl.layers()}
    removed = tenant.gc()[tl.timeline_id].removed
    assert removed and set(removed) <= set(held), (removed, held)
    for desc in removed:
        assert not (tl.dir / desc.file_name()).exists()
        entries = list(held[desc].distinct_keys_raw(None, desc.lsn_range[1].value))
        assert entries, desc
        assert held[desc].get_versions_raw(entries[0], desc.lsn_range[1].value), desc


def test_gc_keeps_branch_point(tmp_path: Path) -> None:
    _, tenant = make_tenant(tmp_path, gc_horizon=0, pitr_interval_s=0.0,
                            image_creation_threshold=1)
    main = new_timeline(tenant)
    record(main, 0x200, (0, page(1)))
    main.flush()
    branch = tenant.branch_timeline(TimelineId(os.urandom(16)), main.timeline_id)
    for i in range(3, 8):
        record(main, i * 0x100, (0, page(i)))
        main.flush()
        compact(main)
    tenant.gc()
    assert main.gc_cutoff == Lsn(0x200)
    assert branch.get_rel_page(REL, 0, Lsn(0x200)) == page(1)


def test_corrupt_layer_byte_fails_that_read_only(tmp_path: Path) -> None:
    """A flipped byte in one layer file fails reads touching it, naming the file."""
    _, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)))
    tl.flush()
    record(tl, 0x300, (1, page(2)))
    tl.flush()
    first = min(tl.layers(), key=lambda d: d.lsn_range[0])
    path = tl.dir / first.file_name()
    data = bytearray(path.read_bytes())
    # Flip a byte inside the blob region (after the 128-byte header).
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    tl._readers.clear()  # drop the cached reader so the file is re-read
    with pytest.raises(CorruptionError) as info:
        tl.get_rel_page(REL, 0, Lsn(0x300))
    assert first.file_name() in str(info.value)
    assert tl.get_rel_page(REL, 1, Lsn(0x300)) == page(2)


def test_restart_cleans_up_and_resumes_at_disk_consistent_lsn(tmp_path: Path) -> None:
    repo, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)))
    tl.flush()
    record(tl, 0x300, (0, page(2)))  # only in memory: lost on restart
    tid = tl.timeline_id
    (tl.dir / "0000.tmp").write_bytes(b"half a layer")
    ephemerals = [p for p in os.listdir(tl.dir) if p.startswith("ephemeral-")]
    assert ephemerals
    repo2 = Repository(tmp_path, clock=Clock())
    tl2 = repo2.get_tenant(tenant.tenant_id).get_timeline(tid)
    names = os.listdir(tl2.dir)
    assert not [n for n in names if n.startswith("ephemeral-") or n.endswith(".tmp")], names
    assert tl2.last_record_lsn == Lsn(0x200)
    assert tl2.prev_record_lsn == Lsn(0x1F8)
    assert tl2.get_rel_page(REL, 0, Lsn(0x300)) == page(1)
    record(tl2, 0x300, (0, page(2)))  # ingest re-feeds
    assert tl2.get_rel_page(REL, 0, Lsn(0x300)) == page(2)
    repo.close()


def test_tenants_create_list_delete_and_config(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    t1 = repo.create_tenant(conf=TenantConfig(gc_horizon=1234))
    t2 = repo.create_tenant()
    assert repo.list_tenants() == sorted([t1.tenant_id, t2.tenant_id])
    with pytest.raises(UserError):
        repo.create_tenant(t1.tenant_id)
    repo.delete_tenant(t2.tenant_id)
    with pytest.raises(NotFound):
        repo.get_tenant(t2.tenant_id)
    repo2 = Repository(tmp_path)
    assert repo2.list_tenants() == [t1.tenant_id]
    assert repo2.get_tenant(t1.tenant_id).conf.gc_horizon == 1234
    with pytest.raises(UserError, match="unknown tenant config keys"):
        TenantConfig.from_dict({"gc_horizont": 1})
    with pytest.raises(UserError, match="image_creation_threshold"):
        TenantConfig(image_creation_threshold=0)


def test_tick_freezes_idle_layer_after_timeout(tmp_path: Path) -> None:
    clock = Clock()
    _, tenant = make_tenant(tmp_path, clock, checkpoint_timeout_s=30.0)
    tl = new_timeline(tenant)
    record(tl, 0x200, (0, page(1)))
    tl.tick()
    assert tl.disk_consistent_lsn == Lsn(0)  # young layer: nothing to do
    clock.now += 31
    tl.tick()  # no WAL arrived, but the layer is old: freeze and flush it
    assert tl.disk_consistent_lsn == Lsn(0x200)
    assert tl.get_rel_page(REL, 0, Lsn(0x200)) == page(1)


def test_background_flush_and_compaction_with_concurrent_reads(tmp_path: Path) -> None:
    """Ingest, flush/compaction on another thread and readers together: every read exact."""
    import threading

    _, tenant = make_tenant(tmp_path, checkpoint_distance=0x400, image_creation_threshold=2,
                            image_layer_keys=4)
    tl = new_timeline(tenant)
    errors: list[BaseException] = []
    done = threading.Event()
    # Made up front: page() is pure Python, and a thread that never releases the GIL makes
    # every file operation of the others wait a switch interval (the test took minutes).
    pages = [page(k) for k in range(300)]

    def maintain() -> None:
        try:
            while not done.is_set():
                tl.flush_frozen()
                compact(tl)
                done.wait(0.001)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    def read() -> None:
        try:
            while not done.is_set():
                last = tl.last_record_lsn.value
                if last < 0x200:
                    continue
                n = (last - 0x100) // 0x40  # records so far; record k wrote block k % 8
                for k in range(max(1, n - 8), n + 1):
                    lsn = 0x100 + k * 0x40
                    assert tl.get_rel_page(REL, k % 8, Lsn(lsn)) == pages[k], k
                done.wait(0.001)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    threads = [threading.Thread(target=maintain), threading.Thread(target=read)]
    for t in threads:
        t.start()
    try:
        for k in range(1, 300):
            record(tl, 0x100 + k * 0x40, (k % 8, page(k)))
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    tl.check_invariants()
    assert [d for d in tl.layers() if not d.is_delta]


def test_gc_cutoff_honours_pitr_interval(tmp_path: Path) -> None:
    """History newer than now - pitr_interval stays readable, whatever gc_horizon says."""
    clock = Clock(10_000.0)
    _, tenant = make_tenant(tmp_path, clock, gc_horizon=0, pitr_interval_s=100.0)
    tl = new_timeline(tenant)
    for i, ts in enumerate([9_800.0, 9_850.0, 9_950.0, 9_990.0], start=2):
        record(tl, i * 0x100, (0, page(i)))
        tl.put_lsn_time(Lsn(i * 0x100), int(ts * 1_000_000))
    tl.flush()
    tenant.gc()
    # now - pitr = 9_900: the last commit at or before it ends at 0x300.
    assert tl.gc_cutoff == Lsn(0x300)
    assert tl.get_rel_page(REL, 0, Lsn(0x300)) == page(3)
    clock.now += 1_000
    tenant.gc()
    assert tl.gc_cutoff == Lsn(0x500)


def test_delete_timeline_refused_with_branches(tmp_path: Path) -> None:
    repo, tenant = make_tenant(tmp_path)
    main = new_timeline(tenant)
    record(main, 0x200, (0, page(1)))
    child = tenant.branch_timeline(TimelineId(os.urandom(16)), main.timeline_id)
    with pytest.raises(UserError, match="has branches"):
        tenant.delete_timeline(main.timeline_id)
    tenant.delete_timeline(child.timeline_id)
    tenant.delete_timeline(main.timeline_id)
    assert tenant.list_timelines() == []
    assert Repository(tmp_path).get_tenant(tenant.tenant_id).list_timelines() == []
    repo.close()


def clog_commit(tl: Timeline, lsn: int, xid: int) -> bytes:
    """One commit record: the status bits of `xid` on pg_xact page 0 (a delta); the
    page's expected content after it is returned by `clog_page`."""
    tl.put(slru_block_key(SlruKind.CLOG, 0, 0), Lsn(lsn),
           Patch((PatchOp(xid // 4, 0x03 << (2 * (xid % 4)), 0x01 << (2 * (xid % 4))),)))
    tl.finish_record(Lsn(lsn), Lsn(lsn - 8))
    return clog_page(xid + 1)


def clog_page(xids: int) -> bytes:
    """pg_xact page 0 with xids 0 .. xids - 1 committed."""
    data = bytearray(8192)
    for xid in range(xids):
        data[xid // 4] |= 0x01 << (2 * (xid % 4))
    return bytes(data)


def clog_timeline(tmp_path: Path) -> tuple[Repository, Tenant, Timeline, Key]:
    """A new timeline whose pg_xact page 0 is an all-zero image at 0/108."""
    key = slru_block_key(SlruKind.CLOG, 0, 0)
    repo, tenant = make_tenant(tmp_path)
    tl = new_timeline(tenant)
    tl.put(key, Lsn(0x108), Image(ZERO))
    tl.finish_record(Lsn(0x108), Lsn(0x100))
    return repo, tenant, tl, key


def test_slru_images_are_built_from_the_kept_chain(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the first image, `put` builds each SLRU image from the page's last image and
    the deltas it put since, without a read; a page whose chain was dropped (more pages
    than `_SLRU_CHAINS_KEPT` imaged since) is read again. Both give the exact page."""
    bound = timeline_module.SLRU_IMAGE_DELTAS
    kept = timeline_module._SLRU_CHAINS_KEPT
    _repo, _tenant, tl, key = clog_timeline(tmp_path)
    lsn, commits = 0x108, 2 * (bound + 1)
    reads: list[Key] = []
    get_value = tl._get_value

    def counting_get_value(k: Key, at: int, floor: int = 0) -> bytes | None:
        reads.append(k)
        return get_value(k, at, floor)

    monkeypatch.setattr(tl, "_get_value", counting_get_value)
    for xid in range(commits):
        lsn += 8
        clog_commit(tl, lsn, xid)
    assert tl.slru_images_written == 2
    assert reads == []  # both images came from the chain
    monkeypatch.undo()
    assert tl.get(key, Lsn(lsn)) == clog_page(commits)
    assert tl.get(key, Lsn(0x108 + 8 * (bound + 1))) == clog_page(bound + 1)  # an image

    # Image `kept` other pages: the chain of page 0 is dropped, and its next image read.
    for page in range(1, kept + 1):
        lsn += 8
        tl.put(slru_block_key(SlruKind.CLOG, 0, page), Lsn(lsn), Image(ZERO))
        tl.finish_record(Lsn(lsn), Lsn(lsn - 8))
    assert not tl._slru_chains.is_kept(key)
    monkeypatch.setattr(tl, "_get_value", counting_get_value)
    for xid in range(commits, commits + bound + 1):
        lsn += 8
        clog_commit(tl, lsn, xid)
    assert tl.slru_images_written == 3
    assert reads == [key]
    monkeypatch.undo()
    assert tl.get(key, Lsn(lsn)) == clog_page(commits + bound + 1)


def test_slru_delta_chains_are_bounded(tmp_path: Path) -> None:
    """A commit per record: a read of the pg_xact page never applies more than
    SLRU_IMAGE_DELTAS deltas, on the timeline, on a new branch and after a restart
    (the delta count is not on disk: the first delta after either is an image)."""
    bound = timeline_module.SLRU_IMAGE_DELTAS
    repo, tenant, tl, key = clog_timeline(tmp_path)
    lsn, commits = 0x108, 3 * bound + 10
    for xid in range(commits):
        lsn += 8
        clog_commit(tl, lsn, xid)
        if xid % 100 == 99:
            tl.flush()
        assert tl.delta_chain(key, Lsn(lsn)) == (xid + 1) % (bound + 1)
    assert tl.slru_images_written == commits // (bound + 1)
    assert tl.get(key, Lsn(lsn)) == clog_page(commits)
    assert tl.get(key, Lsn(0x108 + 8 * bound)) == clog_page(bound)  # older LSNs: exact

    branch = tenant.branch_timeline(TimelineId(os.urandom(16)), tl.timeline_id, Lsn(lsn))
    assert branch.delta_chain(key, Lsn(lsn)) <= bound
    assert clog_commit(branch, lsn + 8, commits) == branch.get(key, Lsn(lsn + 8))
    assert branch.delta_chain(key, Lsn(lsn + 8)) == 0  # the branch's first delta: an image
    assert branch.slru_images_written == 1

    tid = tl.timeline_id
    tl.flush()
    repo.close()
    repo2 = Repository(tmp_path, clock=Clock())
    tl2 = repo2.get_tenant(tenant.tenant_id).get_timeline(tid)
    expected = clog_commit(tl2, lsn + 8, commits)
    assert tl2.delta_chain(key, Lsn(lsn + 8)) == 0
    assert tl2.get(key, Lsn(lsn + 8)) == expected
    assert tl2.get(key, Lsn(lsn)) == clog_page(commits)
    repo2.close()

"""The pure mapping pieces of WAL ingest (xid arithmetic, SLRU and VM patches, truncation
plans), and `WalIngest` on a real Timeline fed hand-built PostgreSQL 15 records."""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import UserError
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.ingest import (
    WalIngest,
    clog_patches,
    is_gist_left_child,
    multixact_create_patches,
    vm_clear_encoded,
    vm_clear_patches,
    vm_truncate_plan,
)
from strata.pg.checkpoint import CheckPoint
from strata.pg.constants import BLCKSZ, RmgrId
from strata.pg.page import page_lsn
from strata.pg.relfile import RelTag
from strata.pg.slru import (
    CLOG_XACTS_PER_PAGE,
    MULTIXACT_MEMBERS_PER_PAGE,
    MULTIXACT_OFFSETS_PER_PAGE,
    SLRU_PAGES_PER_SEGMENT,
    SlruKind,
    XidStatus,
    clog_get_status,
    clog_set_status,
)
from strata.pg.transam import (
    advance_next_xid,
    clog_segments_to_remove,
    later_u32,
    merge_checkpoint,
    multixact_segments_to_remove,
)
from strata.pg.visibilitymap import HEAPBLOCKS_PER_PAGE, MAP_OFFSET, get_bits
from strata.pg.walreader import BlockRef, DecodedRecord
from strata.pg.wire import POSTGRES_EPOCH_UNIX_US
from strata.storage.key import (
    checkpoint_key,
    slru_block_key,
    slru_segment_size_key,
    twophase_key,
    twophase_range,
)
from strata.storage.repository import Repository
from strata.storage.timeline import Timeline, TimelineBroken
from strata.storage.value import Image, Patch, PatchOp, encode_value

U32 = 0xFFFFFFFF


# --- nextXid ---------------------------------------------------------------------------

def test_next_xid_moves_past_a_newer_xid_only() -> None:
    assert advance_next_xid(1000, 1000) == 1001
    assert advance_next_xid(1000, 1500) == 1501
    assert advance_next_xid(1000, 999) == 1000  # already covered
    assert advance_next_xid(1000, 0) == 1000  # InvalidTransactionId
    assert advance_next_xid(1000, 2) == 1000  # FrozenTransactionId
    epoch = 7 << 32
    assert advance_next_xid(epoch | 1000, 1200) == epoch | 1201


def test_next_xid_wraps_into_the_next_epoch_skipping_special_xids() -> None:
    epoch = 3 << 32
    # The last xid of an epoch: the next one is 3 (FirstNormalTransactionId) of the next.
    assert advance_next_xid(epoch | 0xFFFF_FFF0, U32) == (4 << 32) | 3
    # An xid just past the wrap, while nextXid is still near the end of the epoch.
    assert advance_next_xid(epoch | 0xFFFF_FFF0, 10) == (4 << 32) | 11
    # An xid from the end of the previous epoch, seen after the wrap: old.
    assert advance_next_xid((4 << 32) | 11, 0xFFFF_FFF5) == (4 << 32) | 11


@settings(max_examples=200)
@given(st.integers(0, 1 << 20), st.integers(3, U32), st.integers(0, (1 << 31) - 1))
def test_next_xid_is_the_full_xid_after_a_following_xid(epoch: int, base: int,
                                                        step: int) -> None:
    full = (epoch << 32) | base
    xid = (base + step) & U32
    after = advance_next_xid(full, xid)
    if xid < 3:
        assert after == full  # a special xid never moves nextXid
        return
    expected = full + step + 1  # the full xid of `xid`, plus one
    if expected & U32 < 3:
        expected += 3 - (expected & U32)  # TransactionIdAdvance skips the special xids
    assert after == expected


def test_later_u32_compares_in_wrapping_order() -> None:
    assert later_u32(100, 200) == 200
    assert later_u32(200, 100) == 200
    assert later_u32(0xFFFF_FF00, 16384) == 16384  # an OID counter that wrapped
    assert later_u32(16384, 0xFFFF_FF00) == 16384


def _checkpoint(**changes: Any) -> CheckPoint:
    base = CheckPoint(Lsn(0x100), 1, 1, True, 1000, 20000, 5, 40, 700, 1, 1, 1, 0, 0, 0, 900)
    return dataclasses.replace(base, **changes)


def test_merge_checkpoint_keeps_maxima_and_takes_horizons() -> None:
    current = _checkpoint(next_xid=2000, next_oid=30000, next_multi=9, next_multi_offset=80)
    seen = _checkpoint(next_xid=1500, next_oid=25000, next_multi=12, next_multi_offset=60,
                       oldest_xid=750)
    merged = merge_checkpoint(current, seen)
    assert (merged.next_xid, merged.next_oid, merged.next_multi,
            merged.next_multi_offset) == (2000, 30000, 12, 80)
    assert merged.oldest_xid == 750
    assert merged.redo == seen.redo
    # A truncation that moved oldestXid past the checkpoint's own value is kept.
    truncated = _checkpoint(oldest_xid=800, oldest_xid_db=7)
    kept = merge_checkpoint(truncated, seen)
    assert (kept.oldest_xid, kept.oldest_xid_db) == (800, 7)


# --- pg_xact ---------------------------------------------------------------------------

def _apply(patch: Patch, base: bytes = bytes(BLCKSZ)) -> bytes:
    page = bytearray(base)
    patch.apply(page)
    return bytes(page)


def test_clog_patches_set_final_status_per_page() -> None:
    xids = [100, 101, CLOG_XACTS_PER_PAGE + 5]
    patches = clog_patches(xids, XidStatus.COMMITTED)
    assert set(patches) == {(SlruKind.CLOG, 0, 0), (SlruKind.CLOG, 0, 1)}
    page0 = _apply(patches[(SlruKind.CLOG, 0, 0)])
    assert clog_get_status(page0, 100) == XidStatus.COMMITTED
    assert clog_get_status(page0, 101) == XidStatus.COMMITTED
    assert clog_get_status(page0, 102) == XidStatus.IN_PROGRESS
    # An abort over a page where the neighbours are committed leaves them alone.
    aborted = _apply(clog_patches([102], XidStatus.ABORTED)[(SlruKind.CLOG, 0, 0)], page0)
    assert [clog_get_status(aborted, x) for x in (100, 101, 102)] == \
        [XidStatus.COMMITTED, XidStatus.COMMITTED, XidStatus.ABORTED]
    far = CLOG_XACTS_PER_PAGE * SLRU_PAGES_PER_SEGMENT * 3 + 7
    assert set(clog_patches([far], XidStatus.ABORTED)) == {(SlruKind.CLOG, 3, 0)}


def test_clog_patches_agree_with_clog_set_status() -> None:
    """clog_patches works the pg_xact rules out inline: the same page and bits as
    `slru.clog_set_status` (TransactionIdToPage/Byte/BIndex) for xids at byte, page,
    segment and 32-bit boundaries."""
    per_segment = CLOG_XACTS_PER_PAGE * SLRU_PAGES_PER_SEGMENT
    xids = [0, 3, 4, 5, CLOG_XACTS_PER_PAGE - 1, CLOG_XACTS_PER_PAGE, per_segment - 1,
            per_segment, 5 * per_segment + 12345, 0xFFFFFFFF]
    for status in (XidStatus.COMMITTED, XidStatus.ABORTED):
        for xid in xids:
            bits = clog_set_status(xid, status)
            where = (SlruKind.CLOG, bits.page // SLRU_PAGES_PER_SEGMENT,
                     bits.page % SLRU_PAGES_PER_SEGMENT)
            assert clog_patches([xid], status) == {
                where: Patch((PatchOp(bits.offset, bits.clear_mask, bits.set_mask),))}, xid


def test_clog_truncate_removes_whole_segments_before_the_cutoff() -> None:
    cutoff = 2 * SLRU_PAGES_PER_SEGMENT + 5  # in segment 2
    assert clog_segments_to_remove(cutoff, [0, 1, 2, 3]) == [0, 1]
    assert clog_segments_to_remove(SLRU_PAGES_PER_SEGMENT, [0, 1]) == [0]
    assert clog_segments_to_remove(3, [0]) == []


# --- pg_multixact ------------------------------------------------------------------------

def _member(page: bytes, offset: int) -> tuple[int, int]:
    """(xid, status) of member `offset` in its page, by the layout in multixact.c."""
    group = (offset // 4) % 409
    base = group * 20
    flags = struct.unpack_from("<I", page, base)[0]
    xid = struct.unpack_from("<I", page, base + 4 + (offset % 4) * 4)[0]
    return xid, (flags >> ((offset % 4) * 8)) & 0xFF


def test_multixact_create_writes_offsets_and_members() -> None:
    members = ((700, 0), (701, 1), (702, 5))
    patches = multixact_create_patches(3, 10, members)
    offsets = _apply(patches[(SlruKind.MULTIXACT_OFFSETS, 0, 0)])
    assert struct.unpack_from("<II", offsets, 3 * 4) == (10, 13)  # this multi, the next
    page = _apply(patches[(SlruKind.MULTIXACT_MEMBERS, 0, 0)])
    assert [_member(page, 10 + i) for i in range(3)] == list(members)
    assert _member(page, 13) == (0, 0)


def test_multixact_create_spans_pages_and_wraps_the_next_multi() -> None:
    last = MULTIXACT_OFFSETS_PER_PAGE - 1
    moff = MULTIXACT_MEMBERS_PER_PAGE - 1
    patches = multixact_create_patches(last, moff, ((800, 2), (801, 3)))
    assert (SlruKind.MULTIXACT_OFFSETS, 0, 1) in patches  # the next multi's entry
    assert (SlruKind.MULTIXACT_MEMBERS, 0, 0) in patches
    assert (SlruKind.MULTIXACT_MEMBERS, 0, 1) in patches
    second = _apply(patches[(SlruKind.MULTIXACT_MEMBERS, 0, 1)])
    assert _member(second, 0) == (801, 3)
    wrapped = multixact_create_patches(U32, 5, ((900, 0),))
    # After multi 2^32-1 comes 1 (FirstMultiXactId): its entry is on page 0.
    first_page = _apply(wrapped[(SlruKind.MULTIXACT_OFFSETS, 0, 0)])
    assert struct.unpack_from("<I", first_page, 4)[0] == 6


def test_multixact_truncate_segments() -> None:
    per_seg_multis = MULTIXACT_OFFSETS_PER_PAGE * SLRU_PAGES_PER_SEGMENT
    assert multixact_segments_to_remove(SlruKind.MULTIXACT_OFFSETS, 1, 2 * per_seg_multis + 1,
                                        [0, 1, 2]) == [0, 1]
    # The segment holding the last multi before the new oldest one is kept.
    assert multixact_segments_to_remove(SlruKind.MULTIXACT_OFFSETS, 1, per_seg_multis,
                                        [0, 1]) == []
    per_seg_members = MULTIXACT_MEMBERS_PER_PAGE * SLRU_PAGES_PER_SEGMENT
    assert multixact_segments_to_remove(SlruKind.MULTIXACT_MEMBERS, 5, 3 * per_seg_members,
                                        [0, 1, 2, 3]) == [0, 1, 2]
    # Member offsets wrap: from the last segment around to segment 1.
    last_seg = U32 // MULTIXACT_MEMBERS_PER_PAGE // SLRU_PAGES_PER_SEGMENT
    assert multixact_segments_to_remove(
        SlruKind.MULTIXACT_MEMBERS, last_seg * per_seg_members, per_seg_members + 1,
        [0, 1, last_seg]) == [0, last_seg]


# --- visibility map ---------------------------------------------------------------------

@settings(max_examples=100)
@given(st.integers(0, 3 * HEAPBLOCKS_PER_PAGE), st.integers(0, 1 << 32))
def test_vm_truncate_keeps_exactly_the_bits_below_the_new_end(nblocks: int, seed: int) -> None:
    random_page = random.Random(seed).randbytes(BLCKSZ)
    plan = vm_truncate_plan(nblocks)
    if nblocks % HEAPBLOCKS_PER_PAGE == 0:
        assert plan.tail_patch is None and plan.new_nblocks == nblocks // HEAPBLOCKS_PER_PAGE
        return
    assert plan.tail_block == nblocks // HEAPBLOCKS_PER_PAGE
    assert plan.new_nblocks == plan.tail_block + 1
    assert plan.tail_patch is not None
    page = _apply(plan.tail_patch, random_page)
    assert page[:MAP_OFFSET] == random_page[:MAP_OFFSET]  # the page header is untouched
    first = plan.tail_block * HEAPBLOCKS_PER_PAGE
    window = range(nblocks - 9, nblocks + 9)
    for heap_block in {first, first + HEAPBLOCKS_PER_PAGE - 1, *window}:
        if not first <= heap_block < first + HEAPBLOCKS_PER_PAGE:
            continue
        expected = get_bits(random_page, heap_block) if heap_block < nblocks else 0
        assert get_bits(page, heap_block) == expected, heap_block


def test_vm_clear_patches_group_by_map_page() -> None:
    patches = vm_clear_patches([0, 5, HEAPBLOCKS_PER_PAGE + 1], 0x03)
    assert set(patches) == {0, 1}
    page = _apply(patches[0], bytes(MAP_OFFSET) + b"\xff" * (BLCKSZ - MAP_OFFSET))
    assert get_bits(page, 0) == 0 and get_bits(page, 5) == 0
    assert get_bits(page, 1) == 3 and get_bits(page, 4) == 3


@settings(max_examples=200, deadline=None)
@given(heap_blocks=st.lists(st.integers(0, 0xFFFFFFFE), max_size=4)
       | st.lists(st.integers(0, 3 * HEAPBLOCKS_PER_PAGE), max_size=6),
       flags=st.sampled_from([1, 2, 3]))
def test_vm_clear_encoded_is_vm_clear_patches_encoded(heap_blocks: list[int],
                                                      flags: int) -> None:
    """Ingest's inline VM clear stores the same bytes as `vm_clear_patches`."""
    assert vm_clear_encoded(heap_blocks, flags) == {
        block: encode_value(patch)
        for block, patch in vm_clear_patches(heap_blocks, flags).items()}


def test_gist_left_child_blocks() -> None:
    assert is_gist_left_child(RmgrId.GIST, 0x00, 1)  # PAGE_UPDATE block 1
    assert not is_gist_left_child(RmgrId.GIST, 0x00, 0)
    assert is_gist_left_child(RmgrId.GIST, 0x30, 0)  # PAGE_SPLIT block 0
    assert not is_gist_left_child(RmgrId.GIST, 0x30, 1)
    assert not is_gist_left_child(RmgrId.GIST, 0x60, 0)  # PAGE_DELETE
    assert not is_gist_left_child(RmgrId.BTREE, 0x00, 1)


# --- WalIngest on a timeline, with hand-built records ---------------------------------------

X0 = 0x1000
HEAP = RelTag(1663, 5, 16384, 0)
VM = RelTag(1663, 5, 16384, 2)
START_CP = CheckPoint(Lsn(0xF00), 1, 1, True, 1000, 20000, 1, 0, 700, 1, 1, 1, 0, 0, 0, 0)


class Feeder:
    """Builds records at consecutive LSNs and feeds them to a WalIngest."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.ingest = WalIngest(timeline)
        self.lsn = X0

    def feed(self, rmid: int, info: int, main_data: bytes = b"", xid: int = 0,
             blocks: list[BlockRef] | None = None) -> int:
        end = self.lsn + 0x100
        self.ingest.ingest(DecodedRecord(self.lsn, end, 0x100, xid, 0, info, rmid,
                                         blocks or [], main_data))
        self.lsn = end
        return end


@pytest.fixture
def feeder(tmp_path: Path) -> Feeder:
    tenant = Repository(tmp_path).create_tenant()
    tl = tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(X0))
    lsn = Lsn(X0)
    tl.put(checkpoint_key(), lsn, Image(START_CP.to_bytes()))
    tl.create_rel(HEAP, lsn)
    tl.create_rel(VM, lsn)
    tl.put_rel_page(VM, 0, lsn, Image(bytes(MAP_OFFSET) + b"\xff" * (BLCKSZ - MAP_OFFSET)))
    tl.finish_record(lsn, Lsn(0xF00))
    return Feeder(tl)


def _block(block_id: int, rel: RelTag, blkno: int, image: bytes | None) -> BlockRef:
    return BlockRef(block_id, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, blkno,
                    0, image is not None, False, False, False, 0, 0, 0, image or b"", b"")


def test_heap_insert_image_and_vm_clear(feeder: Feeder) -> None:
    page = bytearray(BLCKSZ)
    page[100] = 0x42
    # Heap INSERT: xl_heap_insert {offnum, flags = ALL_VISIBLE_CLEARED}.
    end = feeder.feed(RmgrId.HEAP, 0x00, struct.pack("<HB", 1, 0x01), xid=1200,
                      blocks=[_block(0, HEAP, 7, bytes(page))])
    tl = feeder.timeline
    got = tl.get_rel_page(HEAP, 7, Lsn(end))
    assert got[100] == 0x42 and page_lsn(got) == end  # pd_lsn is the record's end
    assert tl.rel_size(HEAP, Lsn(end)) == 8
    vm = tl.get_rel_page(VM, 0, Lsn(end))
    assert get_bits(vm, 7) == 0 and get_bits(vm, 6) == 3
    cp = CheckPoint.from_bytes(tl.get(checkpoint_key(), Lsn(end)))
    assert cp.next_xid == 1201
    assert tl.last_record_lsn == Lsn(end) and tl.prev_record_lsn == Lsn(end - 0x100)


def test_commit_sets_clog_bits_and_lsn_time(feeder: Feeder) -> None:
    # CLOG ZEROPAGE 0, then a commit of 1200 with subxact 1201 (xinfo HAS_SUBXACTS).
    feeder.feed(RmgrId.CLOG, 0x00, struct.pack("<i", 0))
    ts = 800_000_000_000_000  # TimestampTz, microseconds since 2000-01-01
    body = struct.pack("<qIiI", ts, 0x02, 1, 1201)
    end = feeder.feed(RmgrId.TRANSACTION, 0x80, body, xid=1200)
    tl = feeder.timeline
    page = tl.get(slru_block_key(SlruKind.CLOG, 0, 0), Lsn(end))
    assert clog_get_status(page, 1200) == XidStatus.COMMITTED
    assert clog_get_status(page, 1201) == XidStatus.COMMITTED
    assert clog_get_status(page, 1199) == XidStatus.IN_PROGRESS
    assert tl.get(slru_segment_size_key(SlruKind.CLOG, 0), Lsn(end)) == (1).to_bytes(4, "little")
    assert tl.find_lsn_for_timestamp(ts + POSTGRES_EPOCH_UNIX_US) == Lsn(end)
    cp = CheckPoint.from_bytes(tl.get(checkpoint_key(), Lsn(end)))
    assert cp.next_xid == 1202


def test_smgr_truncate_cuts_main_and_vm_and_clears_the_vm_tail(feeder: Feeder) -> None:
    tl = feeder.timeline
    for b in range(10):
        feeder.feed(RmgrId.XLOG, 0xB0, b"", blocks=[_block(0, HEAP, b, bytes([b + 1]) * BLCKSZ)])
    # xl_smgr_truncate {blkno 5, rnode, flags HEAP|VM|FSM}
    end = feeder.feed(RmgrId.STORAGE, 0x20, struct.pack("<IIIIi", 5, 1663, 5, 16384, 7))
    assert tl.rel_size(HEAP, Lsn(end)) == 5
    assert tl.rel_size(VM, Lsn(end)) == 1
    vm = tl.get_rel_page(VM, 0, Lsn(end))
    assert [get_bits(vm, b) for b in range(3, 8)] == [3, 3, 0, 0, 0]
    assert get_bits(vm, HEAPBLOCKS_PER_PAGE - 1) == 0
    # Regrowth past the old end: the truncated blocks never come back.
    end = feeder.feed(RmgrId.XLOG, 0xB0, b"", blocks=[_block(0, HEAP, 8, b"\x09" * BLCKSZ)])
    assert tl.get_rel_page(HEAP, 6, Lsn(end)) == bytes(BLCKSZ)
    assert tl.get_rel_page(HEAP, 4, Lsn(end))[100] == 5


def test_prepare_then_commit_prepared(feeder: Feeder) -> None:
    state = _prepare_state(xid=1400)
    end = feeder.feed(RmgrId.TRANSACTION, 0x10, state, xid=1400)
    tl = feeder.timeline
    assert tl.get(twophase_key(1400), Lsn(end)) == state
    feeder.feed(RmgrId.CLOG, 0x00, struct.pack("<i", 0))
    # COMMIT_PREPARED: xact_time, xinfo HAS_TWOPHASE, twophase xid.
    end = feeder.feed(RmgrId.TRANSACTION, 0x30 | 0x80, struct.pack("<qII", 1, 0x10, 1400))
    assert not list(tl.scan(twophase_range(), Lsn(end)))
    page = tl.get(slru_block_key(SlruKind.CLOG, 0, 0), Lsn(end))
    assert clog_get_status(page, 1400) == XidStatus.COMMITTED


def _prepare_state(xid: int) -> bytes:
    """A TwoPhaseFileHeader with a 2-byte GID and nothing else (twophase.c layout)."""
    gid = b"g\0"
    total = 72 + 8 + 4  # header, MAXALIGNed gid, CRC
    header = struct.pack("<IIIIqIiiiiii?xHQq", 0x57F94534, total, xid, 5, 0, 10,
                         0, 0, 0, 0, 0, 0, False, len(gid), 0, 0)
    return header + gid + bytes(6)


def test_block_without_image_marks_the_timeline_broken(feeder: Feeder) -> None:
    tl = feeder.timeline
    before = tl.last_record_lsn
    lsn = feeder.lsn
    with pytest.raises(TimelineBroken) as err:
        feeder.feed(RmgrId.BTREE, 0x00, b"", blocks=[_block(0, HEAP, 1, None)])
    message = str(err.value)
    assert str(Lsn(lsn)) in message and "Btree" in message, message
    assert tl.last_record_lsn == before  # nothing of the record was applied
    assert tl.broken_reason is not None and str(Lsn(lsn)) in tl.broken_reason
    with pytest.raises(TimelineBroken):
        tl.get_rel_page(HEAP, 0, before)


def test_a_record_fed_twice_is_refused_without_breaking(feeder: Feeder) -> None:
    record = DecodedRecord(feeder.lsn, feeder.lsn + 0x100, 0x100, 0, 0, 0x30, RmgrId.XLOG, [],
                           struct.pack("<I", 30000))  # XLOG NEXTOID
    feeder.ingest.ingest(record)
    with pytest.raises(UserError, match="not after last_record_lsn"):
        feeder.ingest.ingest(record)
    assert feeder.timeline.broken_reason is None
    cp = CheckPoint.from_bytes(feeder.timeline.get(checkpoint_key(), Lsn(record.end_lsn)))
    assert cp.next_oid == 30000

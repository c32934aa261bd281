"""Heap/Heap2 decoders: which visibility-map bits each record clears on which heap block
(heapam_xlog.h layouts, redo rules of heapam.c)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.pg.constants import RmgrId
from strata.pg.records import (
    HeapDelete,
    HeapInsert,
    HeapLock,
    HeapMultiInsert,
    HeapUpdate,
    HeapVisible,
    VmClear,
    decode_record,
)
from strata.pg.records import heap as h
from strata.pg.visibilitymap import VISIBILITYMAP_ALL_FROZEN, VISIBILITYMAP_VALID_BITS

REL = (1663, 5, 16384)


@dataclass(frozen=True)
class Block:
    """A block reference as the WAL reader reports it (only the fields decoders use)."""

    block_id: int
    blkno: int
    spcnode: int = REL[0]
    dbnode: int = REL[1]
    relnode: int = REL[2]
    forknum: int = 0


def test_insert_clears_both_bits_only_when_flagged() -> None:
    data = struct.pack("<HB", 7, h.XLH_INSERT_ALL_VISIBLE_CLEARED)
    d = decode_record(RmgrId.HEAP, h.XLOG_HEAP_INSERT | h.XLOG_HEAP_INIT_PAGE, data,
                      [Block(0, 12)])
    assert d == HeapInsert(offnum=7, flags=1, init_page=True,
                           vm_clear=VmClear(heap_blocks=((REL, 12),),
                                            flags=VISIBILITYMAP_VALID_BITS))
    plain = decode_record(RmgrId.HEAP, h.XLOG_HEAP_INSERT, struct.pack("<HB", 7, 0x08),
                          [Block(0, 12)])
    assert isinstance(plain, HeapInsert)
    assert plain.vm_clear is None and not plain.init_page


def test_delete() -> None:
    data = struct.pack("<IHBB", 900, 3, 0x20, h.XLH_DELETE_ALL_VISIBLE_CLEARED)
    d = decode_record(RmgrId.HEAP, h.XLOG_HEAP_DELETE, data, [Block(0, 4)])
    assert isinstance(d, HeapDelete)
    assert (d.xmax, d.offnum, d.infobits_set) == (900, 3, 0x20)
    assert d.vm_clear == VmClear(((REL, 4),), VISIBILITYMAP_VALID_BITS)


def update_bytes(flags: int) -> bytes:
    return struct.pack("<IHBBIH", 900, 5, 0, flags, 0, 9)


@pytest.mark.parametrize(("flags", "blocks", "want"), [
    # New version on block 0 (blk 20), old on block 1 (blk 3).
    (0x03, [Block(0, 20), Block(1, 3)], [(REL, 20), (REL, 3)]),
    (0x01, [Block(0, 20), Block(1, 3)], [(REL, 3)]),
    (0x02, [Block(0, 20), Block(1, 3)], [(REL, 20)]),
    # Same page: the old tuple is on block 0 too; the block is listed once.
    (0x03, [Block(0, 20)], [(REL, 20)]),
    (0x01, [Block(0, 20)], [(REL, 20)]),
    (0x00, [Block(0, 20), Block(1, 3)], []),
])
def test_update_old_and_new_blocks(flags: int, blocks: list[Block],
                                   want: list[tuple[tuple[int, int, int], int]]) -> None:
    for op in (h.XLOG_HEAP_UPDATE, h.XLOG_HEAP_HOT_UPDATE):
        d = decode_record(RmgrId.HEAP, op, update_bytes(flags), blocks)
        assert isinstance(d, HeapUpdate)
        assert d.hot == (op == h.XLOG_HEAP_HOT_UPDATE)
        assert (d.old_xmax, d.old_offnum, d.new_offnum) == (900, 5, 9)
        got = [] if d.vm_clear is None else list(d.vm_clear.heap_blocks)
        assert got == want
        if d.vm_clear is not None:
            assert d.vm_clear.flags == VISIBILITYMAP_VALID_BITS


def test_lock_and_lock_updated_clear_only_all_frozen() -> None:
    data = struct.pack("<IHBB", 901, 2, 0, h.XLH_LOCK_ALL_FROZEN_CLEARED)
    lock = decode_record(RmgrId.HEAP, h.XLOG_HEAP_LOCK, data, [Block(0, 8)])
    assert lock == HeapLock(updated=False, xmax=901, offnum=2, infobits_set=0, flags=1,
                            vm_clear=VmClear(((REL, 8),), VISIBILITYMAP_ALL_FROZEN))
    upd = decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_LOCK_UPDATED, data, [Block(0, 8)])
    assert isinstance(upd, HeapLock) and upd.updated
    assert upd.vm_clear == VmClear(((REL, 8),), VISIBILITYMAP_ALL_FROZEN)
    none = decode_record(RmgrId.HEAP, h.XLOG_HEAP_LOCK, struct.pack("<IHBB", 901, 2, 0, 0),
                         [Block(0, 8)])
    assert isinstance(none, HeapLock) and none.vm_clear is None


def test_multi_insert_offsets_absent_on_init_page() -> None:
    data = struct.pack("<BxH3H", h.XLH_INSERT_ALL_VISIBLE_CLEARED, 3, 1, 2, 3)
    d = decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_MULTI_INSERT, data, [Block(0, 6)])
    assert d == HeapMultiInsert(flags=1, ntuples=3, offsets=(1, 2, 3), init_page=False,
                                vm_clear=VmClear(((REL, 6),), VISIBILITYMAP_VALID_BITS))
    init = decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_MULTI_INSERT | h.XLOG_HEAP_INIT_PAGE,
                         struct.pack("<BxH", 0x02, 97), [Block(0, 7)])
    assert isinstance(init, HeapMultiInsert)
    assert (init.ntuples, init.offsets, init.init_page, init.vm_clear) == (97, (), True, None)
    with pytest.raises(CorruptionError, match="offsets"):
        decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_MULTI_INSERT, data[:-2], [Block(0, 6)])


def test_visible_names_vm_and_heap_blocks() -> None:
    vm = Block(0, 0, forknum=2)
    d = decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_VISIBLE, struct.pack("<IB", 880, 3),
                      [vm, Block(1, 41)])
    assert d == HeapVisible(cutoff_xid=880, flags=3, vm_block=(REL, 0), heap_block=(REL, 41))
    with pytest.raises(CorruptionError, match="not a VM bit combination"):
        decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_VISIBLE, struct.pack("<IB", 880, 4),
                      [vm, Block(1, 41)])
    with pytest.raises(CorruptionError, match="block reference 1 is missing"):
        decode_record(RmgrId.HEAP2, h.XLOG_HEAP2_VISIBLE, struct.pack("<IB", 880, 1), [vm])


def test_records_without_vm_effects_decode_to_none() -> None:
    for op in (h.XLOG_HEAP_TRUNCATE, h.XLOG_HEAP_CONFIRM, h.XLOG_HEAP_INPLACE):
        assert decode_record(RmgrId.HEAP, op, b"\x01\x02", [Block(0, 1)]) is None
    for op in (h.XLOG_HEAP2_REWRITE, h.XLOG_HEAP2_PRUNE, h.XLOG_HEAP2_VACUUM,
               h.XLOG_HEAP2_FREEZE_PAGE, h.XLOG_HEAP2_NEW_CID):
        assert decode_record(RmgrId.HEAP2, op, b"", []) is None


def test_short_or_inconsistent_heap_records_are_corrupt() -> None:
    with pytest.raises(CorruptionError, match=r"Heap INSERT\+INIT record.*xl_heap_insert"):
        decode_record(RmgrId.HEAP, 0x80, b"\x01\x00", [Block(0, 1)])
    with pytest.raises(CorruptionError, match="Heap UPDATE record"):
        decode_record(RmgrId.HEAP, h.XLOG_HEAP_UPDATE, update_bytes(1)[:13], [Block(0, 1)])
    with pytest.raises(CorruptionError, match="block reference 0 is missing"):
        decode_record(RmgrId.HEAP, h.XLOG_HEAP_DELETE, struct.pack("<IHBB", 1, 1, 0, 1), [])
    with pytest.raises(CorruptionError, match="fork 2, expected the main fork"):
        decode_record(RmgrId.HEAP, h.XLOG_HEAP_DELETE, struct.pack("<IHBB", 1, 1, 0, 1),
                      [Block(0, 1, forknum=2)])


def test_vm_patches_point_at_the_vm_page_bits() -> None:
    """Heap block 32672 is the first block of VM page 1 (8168 map bytes x 4 blocks each)."""
    clear = VmClear(((REL, 0), (REL, 5), (REL, 32672)), VISIBILITYMAP_VALID_BITS)
    patches = clear.vm_patches()
    assert [(rel, p.vm_block, p.offset, p.clear_mask) for rel, p in patches] == [
        (REL, 0, 24, 0b11), (REL, 0, 25, 0b1100), (REL, 1, 24, 0b11)]
    page = bytearray(b"\xff" * 8192)
    frozen_only = VmClear(((REL, 2),), VISIBILITYMAP_ALL_FROZEN).vm_patches()[0][1]
    frozen_only.apply(page)
    # Block 2 has bits 4-5 of byte 24; only its all-frozen bit (the higher one) is cleared.
    assert page[24] == 0b11011111


@settings(max_examples=400, deadline=None)
@given(heap2=st.booleans(), info=st.integers(0, 0xFF), data=st.binary(max_size=20),
       two_blocks=st.booleans())
def test_images_only_agrees_with_the_decoders(heap2: bool, info: int, data: bytes,
                                              two_blocks: bool) -> None:
    """`heap.images_only` (ingest's shortcut) is True only for records the full decoder
    decodes without raising into None or a record that clears no VM bits."""
    blocks = [Block(0, 12), Block(1, 13)] if two_blocks else [Block(0, 12)]
    rmid = RmgrId.HEAP2 if heap2 else RmgrId.HEAP
    if not h.images_only(heap2, info, data):
        return
    d = decode_record(rmid, info, data, blocks)
    assert d is None or (isinstance(d, (HeapInsert, HeapMultiInsert, HeapDelete, HeapUpdate,
                                        HeapLock)) and d.vm_clear is None), d


def test_images_only_for_the_common_records() -> None:
    """Plain updates, inserts and locks skip the decoder; one that clears VM bits, a
    short one, VISIBLE and MULTI_INSERT do not."""
    update = struct.pack("<IHBBIH", 1, 2, 0, 0, 3, 4)
    assert h.images_only(False, h.XLOG_HEAP_HOT_UPDATE, update)
    assert h.images_only(False, h.XLOG_HEAP_UPDATE | h.XLOG_HEAP_INIT_PAGE, update)
    assert h.images_only(False, h.XLOG_HEAP_INSERT, struct.pack("<HB", 7, 0))
    assert h.images_only(False, h.XLOG_HEAP_LOCK, struct.pack("<IHBB", 1, 2, 0, 0))
    assert h.images_only(True, h.XLOG_HEAP2_PRUNE, b"")
    cleared = struct.pack("<IHBBIH", 1, 2, 0, h.XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED, 3, 4)
    assert not h.images_only(False, h.XLOG_HEAP_UPDATE, cleared)
    assert not h.images_only(False, h.XLOG_HEAP_UPDATE, update[:-1])
    assert not h.images_only(True, h.XLOG_HEAP2_VISIBLE, struct.pack("<IB", 1, 1))
    assert not h.images_only(True, h.XLOG_HEAP2_MULTI_INSERT, struct.pack("<BxH", 0, 0))

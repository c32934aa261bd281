"""Decode Heap (rmid 10) and Heap2 (rmid 9) records into the visibility-map bits
they clear, which PostgreSQL changes without a block reference on the VM page.

Layouts from PostgreSQL 15 `access/heapam_xlog.h`; which block and which bits
follow the redo routines in heapam.c (`heap_xlog_insert`, `_update`, ...):
INSERT, MULTI_INSERT, DELETE and UPDATE clear both bits
(`VISIBILITYMAP_VALID_BITS`) when their ALL_VISIBLE_CLEARED flag is set; LOCK and
LOCK_UPDATED clear only ALL_FROZEN (`XLH_LOCK_ALL_FROZEN_CLEARED`). An UPDATE's old
tuple is on block 1 when it moved to another page, else on block 0 with the new one.
The other record types (prune, vacuum, freeze, inplace, ...) change only pages
that have block references, so the dispatcher returns None for them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from strata.pg.constants import ForkNumber
from strata.pg.records._cursor import BlockLike, Cursor, RelFileNode, need_block, rel_of
from strata.pg.visibilitymap import (
    VISIBILITYMAP_ALL_FROZEN,
    VISIBILITYMAP_VALID_BITS,
    clear_bits,
)
from strata.pg.visibilitymap import VmClear as VmPagePatch

# Heap (xl_info & XLOG_HEAP_OPMASK)
XLOG_HEAP_INSERT = 0x00
XLOG_HEAP_DELETE = 0x10
XLOG_HEAP_UPDATE = 0x20
XLOG_HEAP_TRUNCATE = 0x30
XLOG_HEAP_HOT_UPDATE = 0x40
XLOG_HEAP_CONFIRM = 0x50
XLOG_HEAP_LOCK = 0x60
XLOG_HEAP_INPLACE = 0x70
XLOG_HEAP_OPMASK = 0x70
XLOG_HEAP_INIT_PAGE = 0x80  # the page is (re)initialized from the record

HEAP_NAMES = {XLOG_HEAP_INSERT: "INSERT", XLOG_HEAP_DELETE: "DELETE",
              XLOG_HEAP_UPDATE: "UPDATE", XLOG_HEAP_TRUNCATE: "TRUNCATE",
              XLOG_HEAP_HOT_UPDATE: "HOT_UPDATE", XLOG_HEAP_CONFIRM: "CONFIRM",
              XLOG_HEAP_LOCK: "LOCK", XLOG_HEAP_INPLACE: "INPLACE"}

# Heap2
XLOG_HEAP2_REWRITE = 0x00
XLOG_HEAP2_PRUNE = 0x10
XLOG_HEAP2_VACUUM = 0x20
XLOG_HEAP2_FREEZE_PAGE = 0x30
XLOG_HEAP2_VISIBLE = 0x40
XLOG_HEAP2_MULTI_INSERT = 0x50
XLOG_HEAP2_LOCK_UPDATED = 0x60
XLOG_HEAP2_NEW_CID = 0x70

HEAP2_NAMES = {XLOG_HEAP2_REWRITE: "REWRITE", XLOG_HEAP2_PRUNE: "PRUNE",
               XLOG_HEAP2_VACUUM: "VACUUM", XLOG_HEAP2_FREEZE_PAGE: "FREEZE_PAGE",
               XLOG_HEAP2_VISIBLE: "VISIBLE", XLOG_HEAP2_MULTI_INSERT: "MULTI_INSERT",
               XLOG_HEAP2_LOCK_UPDATED: "LOCK_UPDATED", XLOG_HEAP2_NEW_CID: "NEW_CID"}

# flags of xl_heap_insert / xl_heap_multi_insert
XLH_INSERT_ALL_VISIBLE_CLEARED = 1 << 0
XLH_INSERT_ALL_FROZEN_SET = 1 << 5
# flags of xl_heap_update
XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED = 1 << 0
XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED = 1 << 1
# flags of xl_heap_delete
XLH_DELETE_ALL_VISIBLE_CLEARED = 1 << 0
# flags of xl_heap_lock / xl_heap_lock_updated
XLH_LOCK_ALL_FROZEN_CLEARED = 0x01

_INSERT = struct.Struct("<HB")  # offnum, flags (SizeOfHeapInsert = 3)
_MULTI_INSERT = struct.Struct("<BxH")  # flags, ntuples (offsets[] follow unless INIT)
_DELETE = struct.Struct("<IHBB")  # xmax, offnum, infobits_set, flags
_UPDATE = struct.Struct("<IHBBIH")  # old_xmax, old_offnum, old_infobits_set, flags,
#                                     new_xmax, new_offnum (SizeOfHeapUpdate = 14)
_LOCK = struct.Struct("<IHBB")  # locking_xid / xmax, offnum, infobits_set, flags
_VISIBLE = struct.Struct("<IB")  # cutoff_xid, flags (SizeOfHeapVisible = 5)


# Per Heap op that may clear VM bits: (its main data's size, the offset of its flags
# byte in it, the flags that clear bits), from the xl_heap_* layouts above.
_VM_FLAGS: dict[int, tuple[int, int, int]] = {
    XLOG_HEAP_INSERT: (_INSERT.size, 2, XLH_INSERT_ALL_VISIBLE_CLEARED),
    XLOG_HEAP_DELETE: (_DELETE.size, 7, XLH_DELETE_ALL_VISIBLE_CLEARED),
    XLOG_HEAP_UPDATE: (_UPDATE.size, 7, XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED
                       | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED),
    XLOG_HEAP_HOT_UPDATE: (_UPDATE.size, 7, XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED
                           | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED),
    XLOG_HEAP_LOCK: (_LOCK.size, 7, XLH_LOCK_ALL_FROZEN_CLEARED),
    # TRUNCATE, CONFIRM, INPLACE: `decode_heap` reads nothing (no VM bits).
    XLOG_HEAP_TRUNCATE: (0, -1, 0),
    XLOG_HEAP_CONFIRM: (0, -1, 0),
    XLOG_HEAP_INPLACE: (0, -1, 0),
}
# The same for Heap2: LOCK_UPDATED; the ops `decode_heap2` reads nothing of. Not
# MULTI_INSERT (an offsets array to check) nor VISIBLE (its flags and blocks are checked).
_VM_FLAGS2: dict[int, tuple[int, int, int]] = {
    XLOG_HEAP2_LOCK_UPDATED: (_LOCK.size, 7, XLH_LOCK_ALL_FROZEN_CLEARED),
    XLOG_HEAP2_REWRITE: (0, -1, 0),
    XLOG_HEAP2_PRUNE: (0, -1, 0),
    XLOG_HEAP2_VACUUM: (0, -1, 0),
    XLOG_HEAP2_FREEZE_PAGE: (0, -1, 0),
    XLOG_HEAP2_NEW_CID: (0, -1, 0),
}


def images_only(heap2: bool, info: int, main_data: bytes) -> bool:
    """Whether a Heap (Heap2 if `heap2`) record changes nothing beyond its block images,
    known from its flags alone: `decode_heap` (`decode_heap2`) would return None or a
    record whose `vm_clear` is None, and would not raise. False means: decode it.
    Ingest's path (most records are heap records, and most clear no VM bits); a unit
    test checks it against the decoders."""
    found = (_VM_FLAGS2 if heap2 else _VM_FLAGS).get(info & XLOG_HEAP_OPMASK)
    if found is None:
        return False
    size, flags_at, clearing = found
    if len(main_data) < size:
        return False  # too short: the decoder raises CorruptionError
    return flags_at < 0 or not main_data[flags_at] & clearing


@dataclass(slots=True)
class VmClear:
    """Clear `flags` (VISIBILITYMAP_ALL_VISIBLE | _ALL_FROZEN) for each heap block.

    `heap_blocks` are (rel, heap block number) of the main fork; the bits live in
    that relation's visibility-map fork (`strata.pg.visibilitymap.clear_bits`).
    """

    heap_blocks: tuple[tuple[RelFileNode, int], ...]
    flags: int

    def vm_patches(self) -> tuple[tuple[RelFileNode, VmPagePatch], ...]:
        """For each heap block: its relation and the patch to its VM page (which names
        the VM block number, the byte offset in that page and the bits to clear)."""
        return tuple((rel, clear_bits(blkno, self.flags)) for rel, blkno in self.heap_blocks)


@dataclass(slots=True)
class HeapInsert:
    offnum: int
    flags: int
    init_page: bool
    vm_clear: VmClear | None


@dataclass(slots=True)
class HeapMultiInsert:
    """Heap2 MULTI_INSERT; `offsets` is empty when the page is initialized (INIT_PAGE)."""

    flags: int
    ntuples: int
    offsets: tuple[int, ...]
    init_page: bool
    vm_clear: VmClear | None


@dataclass(slots=True)
class HeapDelete:
    xmax: int
    offnum: int
    infobits_set: int
    flags: int
    vm_clear: VmClear | None


@dataclass(slots=True)
class HeapUpdate:
    """UPDATE or HOT_UPDATE (`hot`)."""

    hot: bool
    old_xmax: int
    old_offnum: int
    old_infobits_set: int
    flags: int
    new_xmax: int
    new_offnum: int
    init_page: bool
    vm_clear: VmClear | None


@dataclass(slots=True)
class HeapLock:
    """Heap LOCK, or Heap2 LOCK_UPDATED (`updated`); `xmax` is the locker."""

    updated: bool
    xmax: int
    offnum: int
    infobits_set: int
    flags: int
    vm_clear: VmClear | None


@dataclass(slots=True)
class HeapVisible:
    """Heap2 VISIBLE: set `flags` in the VM for `heap_block`; the VM page is `vm_block`
    (both have block references, so their images carry the change)."""

    cutoff_xid: int
    flags: int
    vm_block: tuple[RelFileNode, int]
    heap_block: tuple[RelFileNode, int]


def _heap_block(cur: Cursor, blocks: Sequence[BlockLike], block_id: int) -> tuple[RelFileNode, int]:
    block = need_block(cur, blocks, block_id)
    if block.forknum != ForkNumber.MAIN:
        raise cur.error(f"heap block reference {block_id} is in fork {block.forknum}, "
                        "expected the main fork")
    return rel_of(block), block.blkno


def _clear(cur: Cursor, blocks: Sequence[BlockLike], block_ids: Sequence[int],
           flags: int) -> VmClear | None:
    if not block_ids:
        return None
    heap_blocks: list[tuple[RelFileNode, int]] = []
    for block_id in block_ids:
        where = _heap_block(cur, blocks, block_id)
        if where not in heap_blocks:
            heap_blocks.append(where)
    return VmClear(heap_blocks=tuple(heap_blocks), flags=flags)


def _update(cur: Cursor, info: int, blocks: Sequence[BlockLike]) -> HeapUpdate:
    old_xmax, old_offnum, old_infobits, flags, new_xmax, new_offnum = cur.unpack(
        _UPDATE, "xl_heap_update")
    ids: list[int] = []
    if flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED:
        ids.append(0)
    if flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED:
        # The old tuple is on block 1 only when the new version went to another page.
        ids.append(1 if any(b.block_id == 1 for b in blocks) else 0)
    return HeapUpdate(
        hot=info & XLOG_HEAP_OPMASK == XLOG_HEAP_HOT_UPDATE, old_xmax=old_xmax,
        old_offnum=old_offnum, old_infobits_set=old_infobits, flags=flags,
        new_xmax=new_xmax, new_offnum=new_offnum,
        init_page=bool(info & XLOG_HEAP_INIT_PAGE),
        vm_clear=_clear(cur, blocks, ids, VISIBILITYMAP_VALID_BITS))


def _lock(cur: Cursor, blocks: Sequence[BlockLike], updated: bool) -> HeapLock:
    xmax, offnum, infobits, flags = cur.unpack(_LOCK, "xl_heap_lock")
    ids = [0] if flags & XLH_LOCK_ALL_FROZEN_CLEARED else []
    return HeapLock(updated=updated, xmax=xmax, offnum=offnum, infobits_set=infobits,
                    flags=flags, vm_clear=_clear(cur, blocks, ids, VISIBILITYMAP_ALL_FROZEN))


def decode_heap(cur: Cursor, info: int, blocks: Sequence[BlockLike]) -> (
        HeapInsert | HeapDelete | HeapUpdate | HeapLock | None):
    op = info & XLOG_HEAP_OPMASK
    if op == XLOG_HEAP_INSERT:
        offnum, flags = cur.unpack(_INSERT, "xl_heap_insert")
        ids = [0] if flags & XLH_INSERT_ALL_VISIBLE_CLEARED else []
        return HeapInsert(offnum=offnum, flags=flags,
                          init_page=bool(info & XLOG_HEAP_INIT_PAGE),
                          vm_clear=_clear(cur, blocks, ids, VISIBILITYMAP_VALID_BITS))
    if op == XLOG_HEAP_DELETE:
        xmax, offnum, infobits, flags = cur.unpack(_DELETE, "xl_heap_delete")
        ids = [0] if flags & XLH_DELETE_ALL_VISIBLE_CLEARED else []
        return HeapDelete(xmax=xmax, offnum=offnum, infobits_set=infobits, flags=flags,
                          vm_clear=_clear(cur, blocks, ids, VISIBILITYMAP_VALID_BITS))
    if op in (XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE):
        return _update(cur, info, blocks)
    if op == XLOG_HEAP_LOCK:
        return _lock(cur, blocks, updated=False)
    # TRUNCATE, CONFIRM, INPLACE: every page they change has a block reference.
    return None


def decode_heap2(cur: Cursor, info: int, blocks: Sequence[BlockLike]) -> (
        HeapMultiInsert | HeapLock | HeapVisible | None):
    op = info & XLOG_HEAP_OPMASK
    if op == XLOG_HEAP2_MULTI_INSERT:
        flags, ntuples = cur.unpack(_MULTI_INSERT, "xl_heap_multi_insert")
        init_page = bool(info & XLOG_HEAP_INIT_PAGE)
        # heap_multi_insert leaves the offsets out when the page is initialized.
        offsets = () if init_page else cur.array("H", ntuples, "offsets")
        ids = [0] if flags & XLH_INSERT_ALL_VISIBLE_CLEARED else []
        return HeapMultiInsert(flags=flags, ntuples=ntuples, offsets=offsets,
                               init_page=init_page,
                               vm_clear=_clear(cur, blocks, ids, VISIBILITYMAP_VALID_BITS))
    if op == XLOG_HEAP2_LOCK_UPDATED:
        return _lock(cur, blocks, updated=True)
    if op == XLOG_HEAP2_VISIBLE:
        cutoff_xid, flags = cur.unpack(_VISIBLE, "xl_heap_visible")
        if flags & ~VISIBILITYMAP_VALID_BITS or not flags:
            raise cur.error(f"visible flags {flags:#x} are not a VM bit combination")
        vm = need_block(cur, blocks, 0)
        return HeapVisible(cutoff_xid=cutoff_xid, flags=flags,
                           vm_block=(rel_of(vm), vm.blkno),
                           heap_block=_heap_block(cur, blocks, 1))
    # REWRITE, PRUNE, VACUUM, FREEZE_PAGE, NEW_CID: nothing outside block references.
    return None

"""WAL ingest: apply one decoded PostgreSQL 15 WAL record to a timeline (architecture D2).

`WalIngest(timeline)` holds the per-timeline decoding state (the checkpoint counters of
D6) and `ingest(record)` turns one `strata.pg.walreader.DecodedRecord` into puts at the
record's end LSN, then `finish_record(end, start)`. Keys and values follow the key space
in docs/storage.md; docs/ingest.md says what each record type becomes.

- Every block reference carries a page image (wal_consistency_checking = all); it is
  stored as a `WalImage` exactly as the WAL has it. A block reference without an image
  cannot be stored exactly: the timeline is marked broken and `TimelineBroken` raised.
- The changes PostgreSQL makes without a block image are applied here: VM bits cleared
  by heap records, pg_xact status bits, pg_multixact pages, relation create/truncate/
  drop, databases, relation maps, two-phase state, and the checkpoint counters.

The pure pieces (patches, VM truncation plans) are module functions on plain ints so
that unit tests can check them against PostgreSQL's rules directly; the xid rules
(wrapping order, nextXid epochs, multixact id and offset wraparound, which SLRU
segments a truncation removes, how a checkpoint record moves the counters) are
`strata.pg.transam`; the stored form of every non-block value is
`strata.pageserver.datadir`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from strata.common.errors import NotFound, UserError
from strata.common.lsn import Lsn
from strata.pageserver.datadir import (
    drop_database,
    get_checkpoint,
    get_relmap,
    put_checkpoint,
    put_checkpoint_bytes,
    put_database,
    put_relmap,
    put_slru_segment_size,
    put_twophase,
    remove_slru_segment,
    remove_twophase,
    slru_segment_pages,
    slru_segments,
)
from strata.pg import records as rec_types
from strata.pg import slru
from strata.pg.checkpoint import CheckPoint, with_next_xid_bytes
from strata.pg.constants import (
    BLCKSZ,
    XLOG_GIST_PAGE_SPLIT,
    XLOG_GIST_PAGE_UPDATE,
    ForkNumber,
    RmgrId,
)
from strata.pg.page import ZERO_PAGE
from strata.pg.records import decode_effects, record_type_name
from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind
from strata.pg.transam import (
    add_member_offset,
    advance_next_xid,
    clog_segments_to_remove,
    later_u32,
    merge_checkpoint,
    multixact_segments_to_remove,
    next_multixact_id,
    u32_follows,
)
from strata.pg.visibilitymap import (
    BITS_PER_HEAPBLOCK,
    HEAPBLOCKS_PER_BYTE,
    HEAPBLOCKS_PER_PAGE,
    MAP_OFFSET,
    MAX_BLOCK_NUMBER,
    VISIBILITYMAP_VALID_BITS,
    clear_bits,
    vm_bit_shift,
    vm_block,
    vm_page_offset,
)
from strata.pg.walreader import BlockRef, DecodedRecord
from strata.pg.wire import POSTGRES_EPOCH_UNIX_US
from strata.storage.key import Key, rel_block_key, slru_block_key
from strata.storage.timeline import Timeline, TimelineBroken
from strata.storage.value import (
    Image,
    Patch,
    PatchOp,
    PatchWrite,
    WalImage,
    encode_bits_patch,
    wal_image_header,
)

log = logging.getLogger(__name__)

_VM_FORK = int(ForkNumber.VISIBILITYMAP)
# The records whose only effect beyond their block images is clearing VM bits.
_VM_CLEARING = (rec_types.HeapInsert, rec_types.HeapMultiInsert, rec_types.HeapDelete,
                rec_types.HeapUpdate, rec_types.HeapLock)
_COMMITTED = slru.XidStatus.COMMITTED
_ABORTED = slru.XidStatus.ABORTED
_BLOCK_KEYS_KEPT = 1 << 16  # WalIngest's cache of block keys is emptied at this size

# --- pg_xact and pg_multixact patches ----------------------------------------------------

SlruPage = tuple[SlruKind, int, int]  # kind, segno, blkno within the segment


def _slru_page(kind: SlruKind, pageno: int) -> SlruPage:
    return kind, slru.segment_of_page(pageno), slru.page_in_segment(pageno)


def clog_patches(xids: Sequence[int], status: slru.XidStatus) -> dict[SlruPage, Patch]:
    """Set `status` for each xid in pg_xact: one Patch per page, ops in xid order.

    A commit with subtransactions ends with every xid COMMITTED, an abort with every
    xid ABORTED (TransactionIdSetTreeStatus, clog.c); the intermediate SUB_COMMITTED
    state is never visible after the record.
    """
    status_bits = int(status)
    if len(xids) == 1:
        # Most commits: no subtransactions, one op on one page, nothing to group.
        where, op = _clog_op(xids[0], status_bits)
        return {where: Patch((op,))}
    ops: dict[SlruPage, list[PatchOp | PatchWrite]] = {}
    for xid in xids:
        where, op = _clog_op(xid, status_bits)
        page_ops = ops.get(where)
        if page_ops is None:
            ops[where] = [op]
        else:
            page_ops.append(op)
    return {page: Patch(tuple(page_ops)) for page, page_ops in ops.items()}


_CLOG = SlruKind.CLOG
_CLOG_XACTS_PER_PAGE = slru.CLOG_XACTS_PER_PAGE
_CLOG_XACTS_PER_BYTE = slru.CLOG_XACTS_PER_BYTE
_CLOG_BITS_PER_XACT = slru.CLOG_BITS_PER_XACT
_CLOG_XACT_BITMASK = slru.CLOG_XACT_BITMASK
_SLRU_PAGES_PER_SEGMENT = slru.SLRU_PAGES_PER_SEGMENT


def _clog_op(xid: int, status_bits: int) -> tuple[SlruPage, PatchOp]:
    """The pg_xact page of `xid` and the op that sets its status bits: once per commit,
    `slru.clog_set_status` and `_slru_page` worked out inline on the xid (without their
    BitsPatch and checks; a unit test compares the two)."""
    assert 0 <= xid <= 0xFFFFFFFF, xid
    pageno, in_page = divmod(xid, _CLOG_XACTS_PER_PAGE)
    byte, slot = divmod(in_page, _CLOG_XACTS_PER_BYTE)
    shift = slot * _CLOG_BITS_PER_XACT
    segno, blkno = divmod(pageno, _SLRU_PAGES_PER_SEGMENT)
    return ((_CLOG, segno, blkno),
            PatchOp(byte, _CLOG_XACT_BITMASK << shift, status_bits << shift))


def multixact_create_patches(mid: int, moff: int,
                             members: Iterable[tuple[int, int]]) -> dict[SlruPage, Patch]:
    """RecordNewMultiXact (multixact.c): the offset of `mid` and of the multi after it,
    then each member's xid and flag byte, at consecutive member offsets from `moff`.

    PostgreSQL 15 minor releases since 2025 also store the next multi's starting offset
    (moff + nmembers) when creating one, so that readers never need nextOffset; the
    installed 15.18 does, as the integration test shows on its pg_multixact pages.
    """
    ops: dict[SlruPage, list[PatchOp | PatchWrite]] = {}
    members = tuple(members)
    next_mid = next_multixact_id(mid)
    for multi, offset in ((mid, moff), (next_mid, add_member_offset(moff, len(members)))):
        off = slru.multixact_set_offset(multi, offset)
        ops.setdefault(_slru_page(SlruKind.MULTIXACT_OFFSETS, off.page), []).append(
            PatchWrite(off.offset, off.data))
    for i, (xid, status) in enumerate(members):
        xid_patch, flag_patch = slru.member_set(add_member_offset(moff, i), xid,
                                                slru.MultiXactStatus(status))
        page_ops = ops.setdefault(_slru_page(SlruKind.MULTIXACT_MEMBERS, xid_patch.page), [])
        page_ops.append(PatchWrite(xid_patch.offset, xid_patch.data))
        page_ops.append(PatchOp(flag_patch.offset, flag_patch.clear_mask, flag_patch.set_mask))
    return {page: Patch(tuple(page_ops)) for page, page_ops in ops.items()}


# --- visibility map -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VmTruncate:
    """What smgr truncate does to a VM fork (visibilitymap_prepare_truncate, PG15).

    `tail_patch` clears the bits of heap blocks >= the new heap size on VM block
    `tail_block` (without WAL); `new_nblocks` is the VM fork's new size.
    """

    tail_block: int | None
    tail_patch: Patch | None
    new_nblocks: int


def vm_truncate_plan(heap_nblocks: int) -> VmTruncate:
    """The VM page and bits that stay when the heap is truncated to `heap_nblocks`."""
    block = vm_block(heap_nblocks)
    offset = vm_page_offset(heap_nblocks)
    shift = vm_bit_shift(heap_nblocks)
    if offset == MAP_OFFSET and shift == 0:
        # The new end is the first heap block of a map page: that page goes entirely.
        return VmTruncate(None, None, block)
    ops: list[PatchOp | PatchWrite] = [PatchOp(offset, 0xFF & ~((1 << shift) - 1), 0)]
    if offset + 1 < BLCKSZ:
        ops.append(PatchWrite(offset + 1, bytes(BLCKSZ - offset - 1)))
    return VmTruncate(block, Patch(tuple(ops)), block + 1)


def vm_clear_patches(heap_blocks: Iterable[int], flags: int) -> dict[int, Patch]:
    """visibilitymap_clear for each heap block: one Patch per VM block."""
    ops: dict[int, list[PatchOp | PatchWrite]] = {}
    for heap_block in heap_blocks:
        clear = clear_bits(heap_block, flags)
        ops.setdefault(clear.vm_block, []).append(PatchOp(clear.offset, clear.clear_mask, 0))
    return {block: Patch(tuple(block_ops)) for block, block_ops in ops.items()}


def vm_clear_encoded(heap_blocks: Iterable[int], flags: int) -> dict[int, bytes]:
    """`vm_clear_patches`, each patch encoded (`encode_value`), worked out inline on
    the block numbers without the `VmClear`/`PatchOp`/`Patch` objects: ingest's path
    (a heap record on a page that was all-visible; a unit test compares the two)."""
    assert flags and not flags & ~VISIBILITYMAP_VALID_BITS, flags
    ops: dict[int, list[tuple[int, int, int]]] = {}
    for heap_block in heap_blocks:
        assert 0 <= heap_block <= MAX_BLOCK_NUMBER, heap_block
        block, in_page = divmod(heap_block, HEAPBLOCKS_PER_PAGE)
        byte, slot = divmod(in_page, HEAPBLOCKS_PER_BYTE)
        op = (MAP_OFFSET + byte, flags << (slot * BITS_PER_HEAPBLOCK), 0)
        block_ops = ops.get(block)
        if block_ops is None:
            ops[block] = [op]
        else:
            block_ops.append(op)
    return {block: encode_bits_patch(block_ops) for block, block_ops in ops.items()}


def is_gist_left_child(rmid: int, info: int, block_id: int) -> bool:
    """The block whose NSN and F_FOLLOW_RIGHT gistplacetopage sets after XLogInsert:
    block 1 of PAGE_UPDATE, block 0 of PAGE_SPLIT (gistXLogUpdate / gistXLogSplit)."""
    if rmid != RmgrId.GIST:
        return False
    op = info & 0xF0
    return ((op == XLOG_GIST_PAGE_UPDATE and block_id == 1)
            or (op == XLOG_GIST_PAGE_SPLIT and block_id == 0))


def rel_forks(rel: tuple[int, int, int]) -> list[RelTag]:
    spc, db, relnode = rel
    return [RelTag(spc, db, relnode, int(fork)) for fork in ForkNumber]


# --- the ingest state machine ---------------------------------------------------------------

@dataclass(slots=True)
class CheckpointCounters:
    """The checkpoint counters (D6) as ingest keeps them, in three parts: `base`, the
    `CheckPoint` of every counter but nextXid; `next_xid`, which moves once per
    transaction and is kept apart as an int (making a 16-field CheckPoint per
    transaction cost more than the rest of a commit); and `encoding`, a base and its
    `to_bytes()`, which a new nextXid is spliced into (`with_next_xid_bytes`)."""

    base: CheckPoint
    next_xid: int
    encoding: tuple[CheckPoint, bytes]

    @classmethod
    def of(cls, checkpoint: CheckPoint) -> CheckpointCounters:
        return cls(checkpoint, checkpoint.next_xid, (checkpoint, checkpoint.to_bytes()))

    @property
    def checkpoint(self) -> CheckPoint:
        """All the counters as one `CheckPoint`."""
        cp = self.base
        return cp if cp.next_xid == self.next_xid else cp.with_next_xid(self.next_xid)

    def replace(self, checkpoint: CheckPoint) -> None:
        """Every counter from `checkpoint` (a new `base`, so `is` tells it changed)."""
        self.base = checkpoint
        self.next_xid = checkpoint.next_xid

    def to_bytes(self) -> bytes:
        """`self.checkpoint.to_bytes()`, from the last encoding of `base`."""
        cp, encoded = self.encoding
        if cp is not self.base:
            cp = self.base
            encoded = cp.to_bytes()
            self.encoding = (cp, encoded)
        return with_next_xid_bytes(encoded, self.next_xid)


@dataclass(slots=True)
class IngestStats:
    """Counts of what ingest did (for tests, benchmarks and metrics)."""

    records: int = 0
    wal_bytes: int = 0  # record bytes (xl_tot_len), not segment space skipped by SWITCH
    images: int = 0
    gist_fixups: int = 0
    vm_clears: int = 0
    clog_patches: int = 0
    truncates: int = 0
    vm_tail_clears: int = 0
    dropped_forks: int = 0
    databases_copied: int = 0
    multixacts: int = 0
    prepares: int = 0


class WalIngest:
    """Applies decoded WAL records, in order, to one timeline."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        lsn = timeline.last_record_lsn
        try:
            checkpoint = get_checkpoint(timeline, lsn)
        except NotFound as err:
            raise NotFound(f"timeline {timeline.timeline_id} has no checkpoint at {lsn}: "
                           f"import a data directory into it before ingesting WAL") from err
        self._counters = CheckpointCounters.of(checkpoint)
        self.stats = IngestStats()
        # (spcnode, dbnode, relnode, forknum, blkno) -> (RelTag, Key) of recently written
        # blocks: making both costs more than the rest of a block's put. One RelTag per
        # fork (`_rels`), so the timeline's caches find it by identity, not by __eq__.
        self._block_keys: dict[tuple[int, int, int, int, int], tuple[RelTag, Key]] = {}
        self._rels: dict[tuple[int, int, int, int], RelTag] = {}
        # (kind, segno, blkno) -> Key of the SLRU pages written (pg_xact: one per commit).
        self._slru_keys: dict[SlruPage, Key] = {}
        self._xid_seen = -1  # the xid `_advance_xid` saw last

    @property
    def checkpoint(self) -> CheckPoint:
        """The checkpoint counters as of the last record applied."""
        return self._counters.checkpoint

    @checkpoint.setter
    def checkpoint(self, checkpoint: CheckPoint) -> None:
        self._counters.replace(checkpoint)

    # --- entry point ----------------------------------------------------------------
    def ingest(self, record: DecodedRecord) -> None:
        """Apply `record` (the next one after last_record_lsn) and finish it."""
        tl = self.timeline
        if tl.broken_reason is not None:
            raise TimelineBroken(f"timeline {tl.timeline_id} is broken ({tl.broken_reason}); "
                                 f"not ingesting the record at {Lsn(record.lsn)}")
        if record.end_lsn <= tl.last_record_end:
            raise UserError(f"the record at {Lsn(record.lsn)} ends at {Lsn(record.end_lsn)}, "
                            f"not after last_record_lsn {tl.last_record_lsn} of timeline "
                            f"{tl.timeline_id}; feed WAL from last_record_lsn on")
        # Everything that can refuse the record comes before the first put.
        for block in record.blocks:
            if not block.has_image:
                self._refuse(record, block)
        # CorruptionError for a record that does not decode; None for most heap records
        decoded = decode_effects(record)
        # The end LSN as an int: the puts of the common records (block images, VM
        # clears, the checkpoint) and `finish_record_at` take it so, which spares an
        # `Lsn` per record; the rarer records make one (`_apply`).
        end = record.end_lsn
        counters = self._counters
        before, before_xid = counters.base, counters.next_xid
        try:
            self._advance_xid(record.xid)
            if record.blocks:
                self._put_images(record, end)
            if decoded is not None:
                self._apply(decoded, end)
            if counters.base is not before:
                # (`is not` first: the counters other than nextXid are replaced only by
                # the records that may change them)
                if counters.checkpoint != before.with_next_xid(before_xid):
                    put_checkpoint(tl, Lsn(end), counters.checkpoint)
            elif counters.next_xid != before_xid:
                put_checkpoint_bytes(tl, end, counters.to_bytes())
        except Exception as err:
            # Part of the record is stored and the rest cannot be: never serve that.
            tl.mark_broken(f"applying the {record_type_name(record.rmid, record.info)} "
                           f"record at {Lsn(record.lsn)} failed half-way: {err}")
            raise
        tl.finish_record_at(end, record.lsn)
        self.stats.records += 1
        self.stats.wal_bytes += record.tot_len

    def _refuse(self, record: DecodedRecord, block: BlockRef) -> NoReturn:
        """Mark the timeline broken for a block reference without an image, and raise."""
        reason = (f"the {record_type_name(record.rmid, record.info)} record at "
                  f"{Lsn(record.lsn)} (resource manager {record.rmgr_name}) has block "
                  f"reference {block.block_id} (rel {block.spcnode}/{block.dbnode}/"
                  f"{block.relnode} fork {block.forknum} block {block.blkno}) without a "
                  f"page image: wal_consistency_checking was not 'all' for it, so the "
                  f"page cannot be reconstructed")
        self.timeline.mark_broken(reason)
        raise TimelineBroken(f"timeline {self.timeline.timeline_id} marked broken: "
                             f"{reason}; re-create it from a branch before "
                             f"{Lsn(record.lsn)} and keep the setting on")

    def _put_images(self, record: DecodedRecord, lsn: int) -> None:
        """Each block's image as a `WalImage`, encoded directly (`encode_wal_image`) in
        two parts, its header and the image as the WAL has it (not joined)."""
        tl = self.timeline
        keys = self._block_keys
        gist = record.rmid == RmgrId.GIST
        for block in record.blocks:
            rel_key = keys.get((block.spcnode, block.dbnode, block.relnode, block.forknum,
                                block.blkno))
            if rel_key is None:
                rel_key = self._block_key(block.spcnode, block.dbnode, block.relnode,
                                          block.forknum, block.blkno)
            fixup = gist and is_gist_left_child(record.rmid, record.info, block.block_id)
            tl.put_rel_page_encoded(
                rel_key[0], block.blkno, rel_key[1], lsn,
                wal_image_header(block.bimg_info, block.hole_offset, block.hole_length, lsn,
                                 fixup), WalImage.is_image, block.image)
            if fixup:
                self.stats.gist_fixups += 1
        self.stats.images += len(record.blocks)

    def _block_key(self, spcnode: int, dbnode: int, relnode: int, forknum: int,
                   blkno: int) -> tuple[RelTag, Key]:
        """The (RelTag, Key) of a block, from `_block_keys` or made and kept there."""
        where = (spcnode, dbnode, relnode, forknum, blkno)
        rel_key = self._block_keys.get(where)
        if rel_key is None:
            if len(self._block_keys) >= _BLOCK_KEYS_KEPT:
                self._block_keys.clear()
                self._rels.clear()
            rel = self._rel(spcnode, dbnode, relnode, forknum)
            rel_key = self._block_keys[where] = (rel, rel_block_key(rel, blkno))
        return rel_key

    def _rel(self, spcnode: int, dbnode: int, relnode: int, forknum: int) -> RelTag:
        where = (spcnode, dbnode, relnode, forknum)
        rel = self._rels.get(where)
        if rel is None:
            rel = self._rels[where] = RelTag(spcnode, dbnode, relnode, forknum)
            self.timeline.key_sizes_by(rel)
        return rel

    def _slru_key(self, kind: SlruKind, segno: int, blkno: int) -> Key:
        page = (kind, segno, blkno)
        key = self._slru_keys.get(page)
        if key is None:
            if len(self._slru_keys) >= _BLOCK_KEYS_KEPT:
                self._slru_keys.clear()
            key = self._slru_keys[page] = slru_block_key(kind, segno, blkno)
        return key

    def _advance_xid(self, xid: int) -> None:
        if xid == self._xid_seen:
            return  # nextXid only grows: past this xid already (a transaction's records)
        self._xid_seen = xid
        counters = self._counters
        counters.next_xid = advance_next_xid(counters.next_xid, xid)

    # --- per record type ------------------------------------------------------------------
    def _apply(self, d: rec_types.Record, end: int) -> None:
        if isinstance(d, _VM_CLEARING):  # most records: heap changes, LSN kept an int
            if d.vm_clear is not None:
                self._vm_clear(d.vm_clear, end)
            return
        lsn = Lsn(end)
        match d:
            case rec_types.XactCommit() | rec_types.XactAbort():
                self._xact_end(d, lsn)
            case rec_types.XactPrepare():
                for xid in (d.xid, *d.subxacts):
                    self._advance_xid(xid)
                put_twophase(self.timeline, d.xid, lsn, d.state_data)
                self.stats.prepares += 1
            case rec_types.XactAssignment():
                for xid in (d.xtop, *d.subxacts):
                    self._advance_xid(xid)
            case rec_types.SmgrCreate():
                self.timeline.create_rel(RelTag(*d.rel, d.forknum), lsn)
            case rec_types.SmgrTruncate():
                self._smgr_truncate(d, lsn)
            case rec_types.DbaseCreateWalLog():
                put_database(self.timeline, d.tablespace_id, d.db_id, lsn)
            case rec_types.DbaseCreateFileCopy():
                self._create_db_file_copy(d, lsn)
            case rec_types.DbaseDrop():
                for spcnode in d.tablespace_ids:
                    drop_database(self.timeline, spcnode, d.db_id, lsn)
            case rec_types.RelmapUpdate():
                put_relmap(self.timeline, d.tsid, d.dbid, lsn, d.data)
            case rec_types.ClogZeroPage():
                self._zero_slru_page(SlruKind.CLOG, d.pageno, lsn)
            case rec_types.ClogTruncate():
                self._clog_truncate(d, lsn)
            case rec_types.MultiXactZeroOffPage():
                self._zero_slru_page(SlruKind.MULTIXACT_OFFSETS, d.pageno, lsn)
            case rec_types.MultiXactZeroMemPage():
                self._zero_slru_page(SlruKind.MULTIXACT_MEMBERS, d.pageno, lsn)
            case rec_types.MultiXactCreate():
                self._multixact_create(d, lsn)
            case rec_types.MultiXactTruncate():
                self._multixact_truncate(d, lsn)
            case rec_types.XlogCheckpoint():
                self.checkpoint = merge_checkpoint(self.checkpoint, d.checkpoint)
            case rec_types.XlogNextOid():
                self.checkpoint = dataclasses.replace(
                    self.checkpoint, next_oid=later_u32(self.checkpoint.next_oid, d.next_oid))
            case _:
                pass  # SWITCH, FPI (images only), standby, invalidations, logical messages

    def _vm_clear(self, clear: rec_types.VmClear, lsn: int) -> None:
        by_rel: dict[tuple[int, int, int], list[int]] = {}
        for rel, heap_block in clear.heap_blocks:
            by_rel.setdefault(rel, []).append(heap_block)
        for (spcnode, dbnode, relnode), heap_blocks in by_rel.items():
            nblocks = self.timeline.current_nblocks(self._rel(spcnode, dbnode, relnode,
                                                              _VM_FORK))
            for block, patch in vm_clear_encoded(heap_blocks, clear.flags).items():
                # visibilitymap_clear reads the map page without extending the fork.
                if block < nblocks:
                    vm, key = self._block_key(spcnode, dbnode, relnode, _VM_FORK, block)
                    self.timeline.put_rel_page_encoded(vm, block, key, lsn, patch,
                                                       Patch.is_image)
                    self.stats.vm_clears += 1


    def _xact_end(self, d: rec_types.XactCommit | rec_types.XactAbort, lsn: Lsn) -> None:
        xids = (d.xid, *d.subxacts)
        for xid in xids:
            self._advance_xid(xid)
        status = _COMMITTED if isinstance(d, rec_types.XactCommit) else _ABORTED
        for (kind, segno, blkno), patch in clog_patches(xids, status).items():
            self.timeline.put(self._slru_key(kind, segno, blkno), lsn, patch)
            self.stats.clog_patches += 1
        for rel in d.dropped_rels:
            for fork in rel_forks(rel):
                if self.timeline.rel_exists(fork, lsn):
                    self.timeline.drop_rel(fork, lsn)
                    self.stats.dropped_forks += 1
        if isinstance(d, rec_types.XactCommit):
            self.timeline.put_lsn_time(lsn, d.commit_time + POSTGRES_EPOCH_UNIX_US)
        if d.is_prepared:
            remove_twophase(self.timeline, d.xid, lsn)

    def _smgr_truncate(self, d: rec_types.SmgrTruncate, lsn: Lsn) -> None:
        tl = self.timeline
        self.stats.truncates += 1
        if d.truncates_heap:
            tl.truncate_rel(RelTag(*d.rel, int(ForkNumber.MAIN)), d.blkno, lsn)
        if d.truncates_fsm:
            # The FSM is a hint PostgreSQL rebuilds; a stale page past the new end could
            # name blocks that no longer exist, so the whole fork goes (docs/ingest.md).
            tl.truncate_rel(RelTag(*d.rel, int(ForkNumber.FSM)), 0, lsn)
        if d.truncates_vm:
            vm = RelTag(*d.rel, int(ForkNumber.VISIBILITYMAP))
            nblocks = self.timeline.current_nblocks(vm)
            plan = vm_truncate_plan(d.blkno)
            if plan.tail_patch is not None and plan.tail_block is not None \
                    and plan.tail_block < nblocks:
                tl.put_rel_page(vm, plan.tail_block, lsn, plan.tail_patch)
                self.stats.vm_tail_clears += 1
            tl.truncate_rel(vm, plan.new_nblocks, lsn)

    def _create_db_file_copy(self, d: rec_types.DbaseCreateFileCopy, lsn: Lsn) -> None:
        """Copy the source database as of this record: every fork, page by page."""
        tl = self.timeline
        src_spc, src_db = d.src_tablespace_id, d.src_db_id
        for src in sorted(tl.list_rels(src_spc, src_db, lsn)):
            dst = RelTag(d.tablespace_id, d.db_id, src.relnode, src.forknum)
            tl.create_rel(dst, lsn)
            for blkno in range(tl.rel_size(src, lsn)):
                tl.put_rel_page(dst, blkno, lsn, Image(tl.get_rel_page(src, blkno, lsn)))
        put_relmap(tl, d.tablespace_id, d.db_id, lsn, get_relmap(tl, src_spc, src_db, lsn))
        put_database(tl, d.tablespace_id, d.db_id, lsn)
        self.stats.databases_copied += 1

    # --- SLRUs ----------------------------------------------------------------------------
    def _zero_slru_page(self, kind: SlruKind, pageno: int, lsn: Lsn) -> None:
        _, segno, blkno = _slru_page(kind, pageno)
        self.timeline.put(slru_block_key(kind, segno, blkno), lsn, Image(ZERO_PAGE))
        self._extend_segment(kind, segno, blkno, lsn)

    def _extend_segment(self, kind: SlruKind, segno: int, blkno: int, lsn: Lsn) -> None:
        """The segment file holds at least blkno + 1 pages (SimpleLruWritePage extends)."""
        pages = slru_segment_pages(self.timeline, kind, segno, lsn)
        if pages is None or pages < blkno + 1:
            put_slru_segment_size(self.timeline, kind, segno, lsn, blkno + 1)

    def _remove_segments(self, kind: SlruKind, segnos: Iterable[int], lsn: Lsn) -> None:
        for segno in segnos:
            remove_slru_segment(self.timeline, kind, segno, lsn)

    def _clog_truncate(self, d: rec_types.ClogTruncate, lsn: Lsn) -> None:
        segnos = slru_segments(self.timeline, SlruKind.CLOG, lsn)
        self._remove_segments(SlruKind.CLOG, clog_segments_to_remove(d.pageno, segnos), lsn)
        if u32_follows(d.oldest_xact, self.checkpoint.oldest_xid):
            self.checkpoint = dataclasses.replace(self.checkpoint, oldest_xid=d.oldest_xact,
                                                  oldest_xid_db=d.oldest_xact_db)

    def _multixact_create(self, d: rec_types.MultiXactCreate, lsn: Lsn) -> None:
        for (kind, segno, blkno), patch in multixact_create_patches(d.mid, d.moff,
                                                                    d.members).items():
            self.timeline.put(slru_block_key(kind, segno, blkno), lsn, patch)
            # WAL of older minors has no ZERO_OFF_PAGE for the next multi's page; redo
            # then creates it (RecordNewMultiXact in recovery), and so do we.
            self._extend_segment(kind, segno, blkno, lsn)
        self.stats.multixacts += 1
        next_multi = next_multixact_id(d.mid)
        next_offset = add_member_offset(d.moff, d.nmembers)
        cp = self.checkpoint
        self.checkpoint = dataclasses.replace(
            cp, next_multi=later_u32(cp.next_multi, next_multi),
            next_multi_offset=later_u32(cp.next_multi_offset, next_offset))
        for xid, _status in d.members:
            self._advance_xid(xid)

    def _multixact_truncate(self, d: rec_types.MultiXactTruncate, lsn: Lsn) -> None:
        for kind, start, end in (
                (SlruKind.MULTIXACT_OFFSETS, d.start_trunc_off, d.end_trunc_off),
                (SlruKind.MULTIXACT_MEMBERS, d.start_trunc_memb, d.end_trunc_memb)):
            segnos = slru_segments(self.timeline, kind, lsn)
            self._remove_segments(kind, multixact_segments_to_remove(kind, start, end, segnos),
                                  lsn)
        if u32_follows(d.end_trunc_off, self.checkpoint.oldest_multi):
            self.checkpoint = dataclasses.replace(
                self.checkpoint, oldest_multi=d.end_trunc_off,
                oldest_multi_db=d.oldest_multi_db)

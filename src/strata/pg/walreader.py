"""Read PostgreSQL 15 WAL: validate pages, assemble records, decode them into block refs + data.

Two entry points share one sans-IO core:

- `WalStreamDecoder(start_lsn, seg_size)`: `.feed(bytes)` the WAL as it arrives (the first byte is
  the byte at `start_lsn`, which may be mid-page and mid-record, as streaming replication
  delivers it), then `.poll()` for the next `DecodedRecord`, or None when more bytes are needed.
- `read_wal_files(paths_or_dir, start, end)`: iterate the records in WAL segment files.

Formats come from PostgreSQL 15's `xlog_internal.h` (page headers), `xlogrecord.h` (record and
block headers) and the rules of `xlogreader.c` (`XLogReaderValidatePageHeader`,
`ValidXLogRecordHeader`, `ValidXLogRecord`, `DecodeXLogRecord`, `XLogFindNextRecord`); see also
docs postgres15.md section 3. The decode loop works on plain ints and `bytes` for speed; `Lsn`
appears only at the API edges.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c

from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, Lsn, check_segment_size, page_header_size
from strata.pg.bkpimage import restore_block_image
from strata.pg.constants import (
    BKPBLOCK_FORK_MASK,
    BKPBLOCK_HAS_DATA,
    BKPBLOCK_HAS_IMAGE,
    BKPBLOCK_SAME_REL,
    BKPBLOCK_WILL_INIT,
    BKPIMAGE_APPLY,
    BKPIMAGE_COMPRESSED_MASK,
    BKPIMAGE_HAS_HOLE,
    BLCKSZ,
    RMGR_NAMES,
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_RECORD,
    XLOG_BLCKSZ,
    XLOG_PAGE_MAGIC,
    XLOG_SWITCH,
    XLP_ALL_FLAGS,
    XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
    XLP_LONG_HEADER,
    XLR_BLOCK_ID_DATA_LONG,
    XLR_BLOCK_ID_DATA_SHORT,
    XLR_BLOCK_ID_ORIGIN,
    XLR_BLOCK_ID_TOPLEVEL_XID,
    XLR_MAX_BLOCK_ID,
    XLR_RMGR_INFO_MASK,
)

# xlogrecord.h: XLogRecord (24 bytes): tot_len, xid, prev, info, rmid, 2 pad, crc.
_RECORD_HEADER = struct.Struct("<IIQBBxxI")
# xlog_internal.h: XLogPageHeaderData: magic, info, tli, pageaddr, rem_len (+4 pad).
_PAGE_HEADER = struct.Struct("<HHIQI")
# XLogLongPageHeaderData adds sysid, seg_size, xlog_blcksz after the short header.
_LONG_PAGE_TAIL = struct.Struct("<QII")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
# XLogRecordBlockHeader after the id byte: fork_flags u8, data_length u16.
_BLOCK_HEADER = struct.Struct("<BH")
# XLogRecordBlockImageHeader: length u16, hole_offset u16, bimg_info u8.
_IMAGE_HEADER = struct.Struct("<HHB")
# RelFileNode (spcNode, dbNode, relNode) followed by the BlockNumber.
_REL_AND_BLOCK = struct.Struct("<IIII")
# The usual record (`decode_record`), read in one go: the record header (as _RECORD_HEADER),
# block 0's header, its image header with a hole length (a compressed image with a hole), its
# RelFileNode and block number, then the short main data header: block_id, fork_flags,
# data_length, bimg length, hole_offset, bimg_info, hole_length, spcnode, dbnode, relnode,
# blkno, XLR_BLOCK_ID_DATA_SHORT, main length.
_USUAL = struct.Struct("<IIQBBxxI" "BBHHHBHIIIIBB")
_USUAL_END = _USUAL.size  # where its image begins
# Or, where _USUAL read block 1's id instead of the main data's, block 1 naming the same
# relation (`_decode_two`), read from its fork_flags on: fork_flags, data_length, bimg
# length, hole_offset, bimg_info, hole_length, blkno, XLR_BLOCK_ID_DATA_SHORT, main length.
_TWO = struct.Struct("<BHHHBHIBB")
_TWO_END = _USUAL_END - 1 + _TWO.size  # where block 0's image begins
_IMAGE_NEW_REL = BKPBLOCK_HAS_IMAGE | BKPBLOCK_SAME_REL  # masked: has an image, names its rel

_PAGE_MASK = XLOG_BLCKSZ - 1
_MAX_RMID = max(RMGR_NAMES)  # custom rmgrs (128..255) need extensions; Strata has none (D1)
# palloc's limit (MaxAllocSize), which bounds every record PostgreSQL 15 can read back.
_MAX_RECORD_LEN = 0x3FFFFFFF
_RM_XLOG_ID = 0
_TIMELINE = 1


@dataclass(slots=True)
class BlockRef:
    """One block reference of a record (`DecodedBkpBlock` in xlogreader.h)."""

    block_id: int
    spcnode: int
    dbnode: int
    relnode: int
    forknum: int
    blkno: int
    fork_flags: int
    has_image: bool
    apply_image: bool
    will_init: bool
    has_data: bool
    bimg_info: int
    hole_offset: int
    hole_length: int
    image: bytes  # the image as stored in WAL (still compressed); b"" when there is none
    data: bytes  # the block's rmgr-specific data; b"" when there is none

    def page(self) -> bytes:
        """The full 8 KB page image (decompressed, hole zero-filled); needs `has_image`."""
        assert self.has_image, (self.block_id, self.fork_flags)
        return restore_block_image(self.bimg_info, self.hole_offset, self.hole_length,
                                   self.image)

    @property
    def compressed(self) -> bool:
        return bool(self.bimg_info & BKPIMAGE_COMPRESSED_MASK)


@dataclass(slots=True)
class DecodedRecord:
    """One WAL record: header fields, block refs and main data. LSNs are plain ints."""

    lsn: int  # start of the record
    end_lsn: int  # MAXALIGNed end: where the next record would begin (PostgreSQL's EndRecPtr)
    tot_len: int
    xid: int
    prev: int
    info: int
    rmid: int
    blocks: list[BlockRef]
    main_data: bytes
    origin: int = 0  # replication origin (XLR_BLOCK_ID_ORIGIN), 0 when absent
    toplevel_xid: int = 0  # XLR_BLOCK_ID_TOPLEVEL_XID, 0 (InvalidTransactionId) when absent
    fpi_len: int = field(default=0)  # bytes of block images, as pg_waldump counts them

    @property
    def start(self) -> Lsn:
        return Lsn(self.lsn)

    @property
    def end(self) -> Lsn:
        return Lsn(self.end_lsn)

    @property
    def rmgr_info(self) -> int:
        """The rmgr-specific bits of xl_info (the record type)."""
        return self.info & XLR_RMGR_INFO_MASK

    @property
    def rmgr_name(self) -> str:
        return RMGR_NAMES.get(self.rmid, f"rmgr {self.rmid}")  # type: ignore[call-overload, no-any-return]


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class WalCorruption(CorruptionError):
    """Invalid WAL; `lsn` is where (a record's start, or a page header's)."""

    def __init__(self, message: str, lsn: int, *, path: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message, path=path, offset=offset)
        self.message = message
        self.lsn = lsn


class _Overwritten(Exception):
    """The record being assembled was abandoned (XLP_FIRST_IS_OVERWRITE_CONTRECORD)."""

    def __init__(self, page_lsn: int) -> None:
        super().__init__(page_lsn)
        self.page_lsn = page_lsn


def _corrupt(lsn: int, what: str) -> WalCorruption:
    return WalCorruption(f"invalid WAL at {_lsn(lsn)}: {what}", lsn)


def decode_record(lsn: int, rec: bytes) -> DecodedRecord:
    """Check the CRC of one assembled record (`rec` is exactly xl_tot_len bytes) and decode it.

    Follows `ValidXLogRecord` and `DecodeXLogRecord` (xlogreader.c): the block headers come
    first, then the images and block data in block order, then the main data; every length
    is checked against the record's length. `end_lsn` is left as 0 for the caller to set.

    The usual record of a Strata compute (wal_consistency_checking = all, compressed images:
    three in four) is decoded here with one unpack: block 0 with its own RelFileNode and a
    compressed image with a hole (data or none), then short main data. Any other record, or
    one that fails any check below, goes to `_decode_general`, which raises what it finds
    wrong: this path returns only what that one would return.
    """
    tot_len = len(rec)
    if tot_len < _USUAL_END:
        tot_len, xid, prev, info, rmid, crc = _RECORD_HEADER.unpack_from(rec, 0)
        assert tot_len == len(rec), (tot_len, len(rec))
        _check_crc(lsn, rec, crc)
        return _decode_general(lsn, rec, tot_len, xid, prev, info, rmid)
    (xl_tot_len, xid, prev, info, rmid, crc, block_id, fork_flags, data_len, bimg_len,
     hole_offset, bimg_info, hole_length, spc, db, rel, blkno, main_id,
     main_len) = _USUAL.unpack_from(rec, 0)
    assert xl_tot_len == tot_len, (xl_tot_len, tot_len)
    _check_crc(lsn, rec, crc)
    if (block_id != 0 or fork_flags & _IMAGE_NEW_REL != BKPBLOCK_HAS_IMAGE
            or not bimg_info & BKPIMAGE_HAS_HOLE or not bimg_info & BKPIMAGE_COMPRESSED_MASK
            # _check_image's checks for a compressed image with a hole:
            or hole_offset == 0 or hole_length == 0 or bimg_len == BLCKSZ
            or hole_offset + hole_length > BLCKSZ
            # BKPBLOCK_HAS_DATA if and only if there is data:
            or (data_len == 0) == bool(fork_flags & BKPBLOCK_HAS_DATA)):
        return _decode_general(lsn, rec, tot_len, xid, prev, info, rmid)
    if main_id != XLR_BLOCK_ID_DATA_SHORT:
        if main_id == 1 and tot_len >= _TWO_END:
            return _decode_two(lsn, rec, tot_len, xid, prev, info, rmid, fork_flags, data_len,
                               bimg_len, hole_offset, bimg_info, hole_length, spc, db, rel,
                               blkno)
        return _decode_general(lsn, rec, tot_len, xid, prev, info, rmid)
    if _USUAL_END + bimg_len + data_len + main_len != tot_len:
        return _decode_general(lsn, rec, tot_len, xid, prev, info, rmid)
    data_at = _USUAL_END + bimg_len
    main_at = data_at + data_len
    block = BlockRef(
        0, spc, db, rel, fork_flags & BKPBLOCK_FORK_MASK, blkno, fork_flags, True,
        bool(bimg_info & BKPIMAGE_APPLY), bool(fork_flags & BKPBLOCK_WILL_INIT), data_len != 0,
        bimg_info, hole_offset, hole_length, rec[_USUAL_END:data_at],
        rec[data_at:main_at] if data_len else b"")
    return DecodedRecord(lsn, 0, tot_len, xid, prev, info, rmid, [block], rec[main_at:],
                         0, 0, bimg_len)


def _decode_two(lsn: int, rec: bytes, tot_len: int, xid: int, prev: int, info: int, rmid: int,
                fork_flags: int, data_len: int, bimg_len: int, hole_offset: int,
                bimg_info: int, hole_length: int, spc: int, db: int, rel: int,
                blkno: int) -> DecodedRecord:
    """`decode_record`'s usual block 0 (checked there) followed by block 1 of the same
    relation with a compressed image with a hole, then short main data: a heap update to
    another page. Anything else, or a failed check, goes to `_decode_general`."""
    (fork_flags1, data_len1, bimg_len1, hole_offset1, bimg_info1, hole_length1, blkno1,
     main_id, main_len) = _TWO.unpack_from(rec, _USUAL_END - 1)
    if (fork_flags1 & _IMAGE_NEW_REL != _IMAGE_NEW_REL or main_id != XLR_BLOCK_ID_DATA_SHORT
            or not bimg_info1 & BKPIMAGE_HAS_HOLE or not bimg_info1 & BKPIMAGE_COMPRESSED_MASK
            # _check_image's checks for a compressed image with a hole:
            or hole_offset1 == 0 or hole_length1 == 0 or bimg_len1 == BLCKSZ
            or hole_offset1 + hole_length1 > BLCKSZ
            # BKPBLOCK_HAS_DATA if and only if there is data:
            or (data_len1 == 0) == bool(fork_flags1 & BKPBLOCK_HAS_DATA)
            or _TWO_END + bimg_len + data_len + bimg_len1 + data_len1 + main_len != tot_len):
        return _decode_general(lsn, rec, tot_len, xid, prev, info, rmid)
    data_at = _TWO_END + bimg_len
    image1_at = data_at + data_len
    data1_at = image1_at + bimg_len1
    main_at = data1_at + data_len1
    blocks = [
        BlockRef(
            0, spc, db, rel, fork_flags & BKPBLOCK_FORK_MASK, blkno, fork_flags, True,
            bool(bimg_info & BKPIMAGE_APPLY), bool(fork_flags & BKPBLOCK_WILL_INIT),
            data_len != 0, bimg_info, hole_offset, hole_length, rec[_TWO_END:data_at],
            rec[data_at:image1_at] if data_len else b""),
        BlockRef(
            1, spc, db, rel, fork_flags1 & BKPBLOCK_FORK_MASK, blkno1, fork_flags1, True,
            bool(bimg_info1 & BKPIMAGE_APPLY), bool(fork_flags1 & BKPBLOCK_WILL_INIT),
            data_len1 != 0, bimg_info1, hole_offset1, hole_length1, rec[image1_at:data1_at],
            rec[data1_at:main_at] if data_len1 else b"")]
    return DecodedRecord(lsn, 0, tot_len, xid, prev, info, rmid, blocks, rec[main_at:],
                         0, 0, bimg_len + bimg_len1)


def _check_crc(lsn: int, rec: bytes, crc: int) -> None:
    """`ValidXLogRecord`: CRC-32C over the payload, then over the header up to xl_crc
    (postgres15.md sec 3)."""
    if google_crc32c.extend(google_crc32c.value(rec[SIZE_OF_XLOG_RECORD:]), rec[:20]) != crc:
        raise _corrupt(lsn, f"incorrect resource manager data checksum in record "
                            f"(xl_crc {crc:#010x}); the WAL is damaged")


def _decode_general(lsn: int, rec: bytes, tot_len: int, xid: int, prev: int, info: int,
                    rmid: int) -> DecodedRecord:
    """`DecodeXLogRecord` for any record (its CRC checked): every header and length checked."""
    # Each block's fields but its image and data, in block order (those follow all headers).
    heads: list[tuple[int, int, int, int, int, int, int, bool, bool, bool, bool, int, int,
                      int]] = []
    pos = SIZE_OF_XLOG_RECORD
    remaining = tot_len - SIZE_OF_XLOG_RECORD
    datatotal = 0
    main_len = 0
    origin = 0
    toplevel_xid = 0
    max_block_id = -1
    spc = db = rel = -1
    # Image and data length of each block, in block order (the payload follows all headers).
    lengths: list[int] = []
    try:
        while remaining > datatotal:
            block_id = rec[pos]
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_len = rec[pos + 1]
                pos += 2
                remaining -= 2
                datatotal += main_len
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                main_len = _U32.unpack_from(rec, pos + 1)[0]
                pos += 5
                remaining -= 5
                datatotal += main_len
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                origin = _U16.unpack_from(rec, pos + 1)[0]
                pos += 3
                remaining -= 3
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                toplevel_xid = _U32.unpack_from(rec, pos + 1)[0]
                pos += 5
                remaining -= 5
                continue
            if block_id > XLR_MAX_BLOCK_ID:
                raise _corrupt(lsn, f"invalid block_id {block_id}")
            if block_id <= max_block_id:
                raise _corrupt(lsn, f"out-of-order block_id {block_id}")
            max_block_id = block_id
            fork_flags, data_len = _BLOCK_HEADER.unpack_from(rec, pos + 1)
            pos += 4
            remaining -= 4
            has_data = bool(fork_flags & BKPBLOCK_HAS_DATA)
            if has_data and data_len == 0:
                raise _corrupt(lsn, f"BKPBLOCK_HAS_DATA set, but no data included "
                                    f"(block {block_id})")
            if not has_data and data_len != 0:
                raise _corrupt(lsn, f"BKPBLOCK_HAS_DATA not set, but data length is "
                                    f"{data_len} (block {block_id})")
            datatotal += data_len
            bimg_len = hole_offset = hole_length = bimg_info = 0
            has_image = bool(fork_flags & BKPBLOCK_HAS_IMAGE)
            if has_image:
                bimg_len, hole_offset, bimg_info = _IMAGE_HEADER.unpack_from(rec, pos)
                pos += 5
                remaining -= 5
                compressed = bimg_info & BKPIMAGE_COMPRESSED_MASK
                has_hole = bimg_info & BKPIMAGE_HAS_HOLE
                if compressed:
                    if has_hole:
                        hole_length = _U16.unpack_from(rec, pos)[0]
                        pos += 2
                        remaining -= 2
                else:
                    hole_length = BLCKSZ - bimg_len
                datatotal += bimg_len
                _check_image(lsn, block_id, bimg_len, hole_offset, hole_length, bimg_info)
            if not fork_flags & BKPBLOCK_SAME_REL:
                spc, db, rel, blkno = _REL_AND_BLOCK.unpack_from(rec, pos)
                pos += 16
                remaining -= 16
            else:
                if rel == -1:
                    raise _corrupt(lsn, f"BKPBLOCK_SAME_REL set but no previous rel "
                                        f"(block {block_id})")
                blkno = _U32.unpack_from(rec, pos)[0]
                pos += 4
                remaining -= 4
            heads.append((
                block_id, spc, db, rel, fork_flags & BKPBLOCK_FORK_MASK, blkno, fork_flags,
                has_image, bool(bimg_info & BKPIMAGE_APPLY),
                bool(fork_flags & BKPBLOCK_WILL_INIT), has_data, bimg_info, hole_offset,
                hole_length))
            lengths.append(bimg_len)
            lengths.append(data_len)
    except (IndexError, struct.error):
        raise _corrupt(lsn, f"record with invalid length {tot_len}: block headers run past "
                            "its end") from None
    if remaining != datatotal or pos + datatotal != tot_len:
        raise _corrupt(lsn, f"record with invalid length {tot_len}: headers say "
                            f"{datatotal} payload bytes, {remaining} remain")
    fpi_len = 0
    blocks: list[BlockRef] = []
    for i, head in enumerate(heads):
        image = data = b""
        n = lengths[2 * i]
        if n:
            image = rec[pos:pos + n]
            fpi_len += n
            pos += n
        n = lengths[2 * i + 1]
        if n:
            data = rec[pos:pos + n]
            pos += n
        blocks.append(BlockRef(*head, image, data))
    main_data = rec[pos:pos + main_len]
    assert pos + main_len == tot_len, (pos, main_len, tot_len)
    return DecodedRecord(lsn, 0, tot_len, xid, prev, info, rmid, blocks, main_data,
                         origin, toplevel_xid, fpi_len)


def _check_image(lsn: int, block_id: int, bimg_len: int, hole_offset: int, hole_length: int,
                 bimg_info: int) -> None:
    """The consistency checks `DecodeXLogRecord` makes on a block image header."""
    has_hole = bimg_info & BKPIMAGE_HAS_HOLE
    compressed = bimg_info & BKPIMAGE_COMPRESSED_MASK
    if has_hole and (hole_offset == 0 or hole_length == 0 or bimg_len == BLCKSZ):
        raise _corrupt(lsn, f"BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length "
                            f"{hole_length} block image length {bimg_len} (block {block_id})")
    if not has_hole and (hole_offset != 0 or hole_length != 0):
        raise _corrupt(lsn, f"BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset} length "
                            f"{hole_length} (block {block_id})")
    if compressed and bimg_len == BLCKSZ:
        raise _corrupt(lsn, f"BKPIMAGE_COMPRESSED set, but block image length {bimg_len} "
                            f"(block {block_id})")
    if not has_hole and not compressed and bimg_len != BLCKSZ:
        raise _corrupt(lsn, f"neither BKPIMAGE_HAS_HOLE nor BKPIMAGE_COMPRESSED set, but block "
                            f"image length is {bimg_len} (block {block_id})")
    if hole_offset + hole_length > BLCKSZ:
        raise _corrupt(lsn, f"block image hole {hole_offset}+{hole_length} exceeds a page "
                            f"(block {block_id})")


class WalStreamDecoder:
    """Incremental, sans-IO WAL decoder: feed bytes from `start_lsn` on, poll records.

    `start_lsn` may be anywhere. At a page start the page header says how much of a record
    continued from the previous page is to be skipped (`XLP_FIRST_IS_CONTRECORD` +
    `xlp_rem_len`, as `XLogFindNextRecord` does). Mid-page, the decoder waits for the next page
    header, finds the first record that begins after it, and follows `xl_prev` links back to
    the first record that begins at or after `start_lsn`; so a stream that starts exactly at a
    record start loses nothing. (Until that anchor record arrives, `poll()` returns None; a
    caller that knows its start is a record start says so with `at_record_start`.) Records
    are verified as they are decoded (CRC, prev-link, page headers), so a wrong guess cannot
    go unnoticed.

    `at_record_start`: the caller knows that `start_lsn` is where a record begins (the end of
    the previous record, as when streaming resumes at a record end; D7). The decoder then
    decodes from there at once instead of waiting for the next page header to arrive, which
    matters at the live tail of a stream.

    `zero_is_end`: a zeroed page header, a zero `xl_tot_len`, or a recycled page (an older
    `xlp_pageaddr`) where a record should begin is the end of the written WAL: `poll()` returns
    None from then on and `end_of_wal` is set. In a replication stream (the default) they are
    corruption.
    """

    def __init__(self, start_lsn: Lsn, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE, *,
                 at_record_start: bool = False, zero_is_end: bool = False,
                 sysid: int | None = None) -> None:
        check_segment_size(seg_size)
        if at_record_start and start_lsn.value % 8:
            raise UserError(f"a record cannot begin at {start_lsn}: records are 8-byte aligned")
        self.seg_size = seg_size
        self.start_lsn = start_lsn.value
        self.zero_is_end = zero_is_end
        self.sysid = sysid  # from the first long page header, unless given
        self.end_of_wal: Lsn | None = None
        self._buf = b""
        self._buf_lsn = start_lsn.value  # LSN of _buf[0]
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._next: int | None = None  # start (or page boundary before) of the next record
        self._last_lsn: int | None = None  # start of the previous record, for xl_prev checks
        if at_record_start:
            self._next = start_lsn.value

    # --- input ---------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of the stream."""
        if data:
            self._pending.append(bytes(data))
            self._pending_len += len(data)

    @property
    def received_lsn(self) -> Lsn:
        """End of the bytes fed so far."""
        return Lsn(self._buf_lsn + len(self._buf) + self._pending_len)

    @property
    def next_record_lsn(self) -> Lsn | None:
        """Where the next record (or the page header before it) begins, once known."""
        return None if self._next is None else Lsn(self._next)

    def has_partial_record(self) -> bool:
        """True if bytes of an incomplete record (or page) are buffered after the last record."""
        if self.end_of_wal is not None:
            return False
        end = self._buf_lsn + len(self._buf) + self._pending_len
        position = self._next if self._next is not None else self.start_lsn
        return end > position

    def _absorb(self) -> None:
        """Move pending chunks into the buffer, dropping bytes before the next record."""
        buf_end = self._buf_lsn + len(self._buf)
        keep_from = self._buf_lsn
        if self._next is not None:
            keep_from = min(self._next, buf_end)
        cut = keep_from - self._buf_lsn
        self._buf = b"".join([self._buf[cut:], *self._pending])
        self._buf_lsn = keep_from
        self._pending.clear()
        self._pending_len = 0

    # --- output --------------------------------------------------------------
    def __iter__(self) -> Iterator[DecodedRecord]:
        """The records decodable from the bytes fed so far."""
        while (record := self.poll()) is not None:
            yield record

    def poll(self) -> DecodedRecord | None:
        """The next complete record, or None if more bytes are needed (or at end of WAL)."""
        if self.end_of_wal is not None:
            return None
        if self._pending:
            self._absorb()
        if self._next is None and not self._find_first_record():
            return None
        return self._read_record()

    # --- pages -----------------------------------------------------------------
    def _check_page(self, page_lsn: int, rem_len: int | None) -> int | None:
        """Validate the page header at `page_lsn` (it must be buffered); return xlp_rem_len.

        `rem_len` is the number of bytes still expected of the record being assembled, or None
        between records. Returns None for a page that marks the end of the written WAL.
        """
        off = page_lsn - self._buf_lsn
        buf = self._buf
        magic, info, tli, pageaddr, xlp_rem = _PAGE_HEADER.unpack_from(buf, off)
        if magic != XLOG_PAGE_MAGIC:
            if magic == 0 and tli == 0 and pageaddr == 0 and self.zero_is_end:
                if rem_len is None:
                    return None
                raise _corrupt(page_lsn, f"WAL ends mid-record: the page is zeroed, but "
                                         f"{rem_len} bytes of a record were to follow")
            raise _corrupt(page_lsn, f"page header has magic {magic:#06x}, expected "
                                     f"{XLOG_PAGE_MAGIC:#06x} (PostgreSQL 15); is this "
                                     "PostgreSQL 15 WAL?")
        if info & ~XLP_ALL_FLAGS:
            raise _corrupt(page_lsn, f"page header has unknown xlp_info bits {info:#06x}")
        if pageaddr != page_lsn:
            if (self.zero_is_end and rem_len is None and pageaddr < page_lsn
                    and pageaddr % self.seg_size == page_lsn % self.seg_size):
                return None  # a recycled segment: PostgreSQL's end of WAL too
            raise _corrupt(page_lsn, f"page header has address {_lsn(pageaddr)}, expected "
                                     f"{_lsn(page_lsn)}")
        if tli != _TIMELINE:
            raise _corrupt(page_lsn, f"page header has timeline {tli}: Strata supports "
                                     f"PostgreSQL timeline 1 only")
        if page_lsn % self.seg_size == 0:
            if not info & XLP_LONG_HEADER:
                raise _corrupt(page_lsn, "first page of a segment lacks XLP_LONG_HEADER")
            sysid, seg_size, blcksz = _LONG_PAGE_TAIL.unpack_from(buf, off + 24)
            if self.sysid is None:
                self.sysid = sysid
            elif sysid != self.sysid:
                raise _corrupt(page_lsn, f"WAL belongs to system {sysid}, expected "
                                         f"{self.sysid}; segments from different clusters?")
            if seg_size != self.seg_size:
                raise _corrupt(page_lsn, f"long page header says segment size {seg_size}, "
                                         f"the decoder was set up for {self.seg_size}")
            if blcksz != XLOG_BLCKSZ:
                raise _corrupt(page_lsn, f"long page header says XLOG_BLCKSZ {blcksz}, "
                                         f"expected {XLOG_BLCKSZ}")
        elif info & XLP_LONG_HEADER:
            raise _corrupt(page_lsn, "XLP_LONG_HEADER set on a page that does not start "
                                     "a segment")
        is_cont = bool(info & XLP_FIRST_IS_CONTRECORD)
        if rem_len is not None:
            if not is_cont and info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                raise _Overwritten(page_lsn)
            if not is_cont:
                raise _corrupt(page_lsn, f"there is no contrecord flag, but {rem_len} bytes of "
                                         "the record that began on an earlier page are missing")
            if xlp_rem != rem_len:
                raise _corrupt(page_lsn, f"invalid contrecord length {xlp_rem}, expected "
                                         f"{rem_len}")
        return int(xlp_rem) if is_cont else 0

    # --- finding the first record ----------------------------------------------
    def _find_first_record(self) -> bool:
        """Set `_next` to the first record at or after `start_lsn`; False if more bytes needed."""
        start = self.start_lsn
        buf_end = self._buf_lsn + len(self._buf)
        page = (start + _PAGE_MASK) & ~_PAGE_MASK  # the first page header in the stream
        while True:
            hdr = page_header_size(page, self.seg_size)
            if page + hdr > buf_end:
                return False
            rem = self._check_page(page, None)
            if rem is None:  # end of WAL before any record
                self.end_of_wal = Lsn(page)
                return False
            if rem < XLOG_BLCKSZ - hdr:
                first = page + hdr + ((rem + 7) & ~7)
                if first & _PAGE_MASK:
                    break
                page = first  # the continued record (and its padding) end with the page
                continue
            page += XLOG_BLCKSZ  # the continued record fills this page; try the next
        if start & _PAGE_MASK:
            # Mid-page start: walk xl_prev back from `first` to the earliest record >= start.
            cur = first
            while True:
                prev = self._peek_prev(cur)
                if prev is None:
                    return False
                if prev < start or prev >= cur:
                    break
                cur = prev
            first = cur
        self._next = first
        return True

    def _peek_prev(self, lsn: int) -> int | None:
        """xl_prev of the record at `lsn` (header possibly split by a page header)."""
        page_end = (lsn | _PAGE_MASK) + 1
        off = lsn - self._buf_lsn
        if lsn + 16 <= page_end:
            if off + 16 > len(self._buf):
                return None
            return int(struct.unpack_from("<Q", self._buf, off + 8)[0])
        # The header continues after the next page header (records are 8-aligned, so xl_prev
        # starts exactly on the next page).
        at = page_end + page_header_size(page_end, self.seg_size) - self._buf_lsn
        if at + 8 > len(self._buf):
            return None
        return int(struct.unpack_from("<Q", self._buf, at)[0])

    # --- records ---------------------------------------------------------------------
    def _read_record(self) -> DecodedRecord | None:
        lsn = self._next
        assert lsn is not None
        buf = self._buf
        base = self._buf_lsn
        buf_end = base + len(buf)
        if not lsn & _PAGE_MASK:
            # A record never starts at a page boundary: the page header comes first.
            hdr = page_header_size(lsn, self.seg_size)
            if lsn + hdr > buf_end:
                return None
            rem = self._check_page(lsn, None)
            if rem is None:
                self.end_of_wal = Lsn(lsn)
                return None
            if rem:
                raise _corrupt(lsn, f"page has XLP_FIRST_IS_CONTRECORD (xlp_rem_len {rem}), but "
                                    "the previous record ended at the page boundary")
            lsn += hdr
            self._next = lsn
        off = lsn - base
        if off + 4 > len(buf):
            return None
        tot_len = _U32.unpack_from(buf, off)[0]
        page_end = (lsn | _PAGE_MASK) + 1
        if tot_len == 0 and self.zero_is_end:
            self.end_of_wal = Lsn(lsn)
            return None
        if tot_len < SIZE_OF_XLOG_RECORD or tot_len > _MAX_RECORD_LEN:
            raise _corrupt(lsn, f"invalid record length: wanted at least {SIZE_OF_XLOG_RECORD}, "
                                f"got xl_tot_len {tot_len}")
        if (lsn + SIZE_OF_XLOG_RECORD <= page_end and off + SIZE_OF_XLOG_RECORD <= len(buf)
                and (buf[off + 17] > _MAX_RMID or self._last_lsn is None)):
            # Before waiting for a huge, bogus record. (With a previous record, the only
            # check is xl_rmid's: the prev-link is checked against that record after CRC.)
            self._check_header(lsn, buf, off)
        if lsn + tot_len <= page_end:
            if off + tot_len > len(buf):
                return None
            rec = buf[off:off + tot_len]
            end = lsn + tot_len
        else:
            try:
                assembled = self._assemble(lsn, tot_len, page_end)
            except _Overwritten as overwritten:
                # PostgreSQL abandoned this record, left incomplete by a crash: the WAL goes on
                # at this page with an XLOG OVERWRITE_CONTRECORD record (xlogreader.c), whose
                # xl_prev is the last complete record.
                self._next = overwritten.page_lsn
                return self._read_record()
            if assembled is None:
                return None
            rec, end = assembled
            self._check_header(lsn, rec, 0)
        record = decode_record(lsn, rec)
        if self._last_lsn is not None and record.prev != self._last_lsn:
            raise _corrupt(lsn, f"record with incorrect prev-link {_lsn(record.prev)}, expected "
                                f"{_lsn(self._last_lsn)}")
        end = (end + 7) & ~7
        if record.rmid == _RM_XLOG_ID and record.info & XLR_RMGR_INFO_MASK == XLOG_SWITCH:
            # The rest of the segment is unused (xlogreader.c: "pretend it extends to end of
            # segment"); the next record follows the next segment's long page header.
            end = (end + self.seg_size - 1) // self.seg_size * self.seg_size
        record.end_lsn = end
        self._next = end
        self._last_lsn = lsn
        return record

    def _check_header(self, lsn: int, buf: bytes, off: int) -> None:
        """`ValidXLogRecordHeader`: a valid resource manager, a prev-link before the record."""
        rmid = buf[off + 17]
        if rmid > _MAX_RMID:
            raise _corrupt(lsn, f"invalid resource manager ID {rmid}")
        prev = struct.unpack_from("<Q", buf, off + 8)[0]
        if self._last_lsn is None and prev >= lsn:
            raise _corrupt(lsn, f"record with incorrect prev-link {_lsn(prev)}")

    def _assemble(self, lsn: int, tot_len: int, page_end: int) -> tuple[bytes, int] | None:
        """Join a record that crosses page boundaries; None if not all of it is buffered."""
        buf = self._buf
        base = self._buf_lsn
        buf_end = base + len(buf)
        pieces = [buf[lsn - base:page_end - base]]
        remaining = tot_len - (page_end - lsn)
        page = page_end
        while remaining > 0:
            hdr = page_header_size(page, self.seg_size)
            if page + hdr > buf_end:
                return None
            self._check_page(page, remaining)
            take = min(remaining, XLOG_BLCKSZ - hdr)
            start = page + hdr
            if start + take > buf_end:
                return None
            pieces.append(buf[start - base:start - base + take])
            remaining -= take
            page += XLOG_BLCKSZ
            end = start + take
        return b"".join(pieces), end


# --- files -----------------------------------------------------------------------------------
def _is_segment_name(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789ABCDEF" for c in name)


def list_segments(paths_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                  ) -> list[Path]:
    """The WAL segment files named by a directory (like pg_waldump -p) or a list of paths."""
    if isinstance(paths_or_dir, (str, os.PathLike)):
        items: list[Path] = [Path(paths_or_dir)]
    else:
        items = [Path(p) for p in paths_or_dir]
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            files.extend(p for p in item.iterdir() if _is_segment_name(p.name))
        elif item.exists():
            files.append(item)
        else:
            raise UserError(f"WAL path {item} does not exist")
    for f in files:
        if not _is_segment_name(f.name):
            raise UserError(f"{f} is not a WAL segment file (name must be 24 hex digits)")
        if int(f.name[:8], 16) != _TIMELINE:
            raise UserError(f"{f} is on timeline {int(f.name[:8], 16)}: Strata supports "
                            "PostgreSQL timeline 1 only")
    return sorted(set(files), key=lambda p: p.name)


def segment_size_of(path: Path) -> int:
    """xlp_seg_size from the long page header at the start of a segment file."""
    with open(path, "rb") as f:
        head = f.read(SIZE_OF_XLOG_LONG_PHD)
    if len(head) < SIZE_OF_XLOG_LONG_PHD:
        raise CorruptionError("WAL segment too short for a long page header", path=str(path),
                              offset=len(head))
    magic, info = struct.unpack_from("<HH", head)
    if magic != XLOG_PAGE_MAGIC or not info & XLP_LONG_HEADER:
        raise CorruptionError(f"WAL segment does not begin with a PostgreSQL 15 long page header "
                              f"(magic {magic:#06x}, xlp_info {info:#06x})", path=str(path),
                              offset=0)
    seg_size = _LONG_PAGE_TAIL.unpack_from(head, 24)[1]
    try:
        check_segment_size(seg_size)
    except UserError as err:
        raise CorruptionError(str(err), path=str(path), offset=32) from None
    return int(seg_size)


def read_wal_files(paths_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                   start: Lsn | None = None, end: Lsn | None = None) -> Iterator[DecodedRecord]:
    """The records in WAL segment files, from `start` (default: the first file's first record)
    up to `end` (exclusive, on record starts; default: the end of the written WAL).

    The segment size comes from the first file's long page header. The files must be
    consecutive from the first one needed; reading stops at a gap, a zeroed page or a recycled
    page (the normal end of WAL). WAL that ends inside a record is a `CorruptionError`.
    """
    files = list_segments(paths_or_dir)
    if not files:
        raise UserError(f"no WAL segment files in {paths_or_dir}")
    seg_size = segment_size_of(files[0])
    per_id = 0x1_0000_0000 // seg_size
    numbered = [((int(f.name[8:16], 16) * per_id + int(f.name[16:], 16)), f) for f in files]
    if start is None:
        start = Lsn(numbered[0][0] * seg_size)
    first_segno = start.value // seg_size
    numbered = [(n, f) for n, f in numbered if n >= first_segno]
    if not numbered or numbered[0][0] != first_segno:
        raise UserError(f"WAL segment {start.segment_file_name(1, seg_size)} holding start "
                        f"{start} is not among the files given")
    # Begin at the page start, like XLogFindNextRecord: the page header tells where the first
    # record on the page begins, and records before `start` are skipped below.
    decoder = WalStreamDecoder(start.page_start(), seg_size, zero_is_end=True)
    expect = first_segno
    last_path = numbered[0][1]
    for segno, path in numbered:
        if segno != expect:
            break  # a gap: the WAL we have ends here
        data = path.read_bytes()  # the page cache makes a whole segment the cheapest unit
        if len(data) != seg_size:
            raise CorruptionError(f"WAL segment has {len(data)} bytes, expected {seg_size} "
                                  "(truncated or wrong segment size?)", path=str(path),
                                  offset=len(data))
        if segno == first_segno:
            data = data[start.page_start().value - segno * seg_size:]
        decoder.feed(data)
        last_path = path
        expect += 1
        try:
            while (record := decoder.poll()) is not None:
                if end is not None and record.lsn >= end.value:
                    return
                if record.lsn >= start.value:
                    yield record
        except WalCorruption as err:
            # Name the file and offset too, for whoever has to look at the bytes.
            where = path.with_name(Lsn(err.lsn).segment_file_name(1, seg_size))
            raise WalCorruption(err.message, err.lsn, path=str(where),
                                offset=err.lsn % seg_size) from None
        if decoder.end_of_wal is not None:
            return
    if decoder.has_partial_record():
        at = decoder.next_record_lsn or start
        raise CorruptionError(f"WAL ends mid-record at {at}: the segment after "
                              f"{last_path.name} is missing or was not given",
                              path=str(last_path))

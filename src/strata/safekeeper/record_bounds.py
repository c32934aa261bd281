"""`RecordBoundaryTracker`: where complete WAL records end in a byte stream (headers only).

The WAL quorum only ever agrees on record ends (architecture D7), so an acceptor must know
the end of the last complete record it holds. That needs only the headers: each record's
`xl_tot_len` (and `xl_rmid`/`xl_info`, to recognise `XLOG_SWITCH`), and the page headers that
interrupt records at every 8 KB page. Record bodies are skipped without being copied or
checksummed; full decoding is `strata.pg.walreader`'s job, and the unit tests check that this
tracker finds exactly the record ends that reader finds on real PostgreSQL 15 WAL.

Formats (PostgreSQL 15): `xlog_internal.h` (`XLogPageHeaderData`, 24 bytes; the long header
of a segment's first page, 40 bytes; `XLP_FIRST_IS_CONTRECORD` + `xlp_rem_len` on a page that
starts inside a record), `xlogrecord.h` (`XLogRecord`: `xl_tot_len` u32 at 0, `xl_info` u8 at
16, `xl_rmid` u8 at 17; records are MAXALIGNed, 8 bytes). `xlogreader.c` treats an
`XLOG_SWITCH` record as extending to the end of its segment. The first 8 bytes of a record
are always on one page (records are 8-aligned and page headers are 24/40 bytes), so
`xl_tot_len` is never split; `xl_info`/`xl_rmid` can be, after a page header.

Hot loop: plain ints and bytes; `Lsn` is not used here.
"""

from __future__ import annotations

import struct

from strata.common.errors import CorruptionError
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, check_segment_size, page_header_size
from strata.pg.constants import (
    SIZE_OF_XLOG_RECORD,
    XLOG_BLCKSZ,
    XLOG_PAGE_MAGIC,
    XLOG_SWITCH,
    XLP_FIRST_IS_CONTRECORD,
    XLR_RMGR_INFO_MASK,
)

# xlog_internal.h: xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr u64, xlp_rem_len u32.
_PAGE_HEADER = struct.Struct("<HHIQI")
_U32 = struct.Struct("<I")
_PAGE_MASK = XLOG_BLCKSZ - 1
_RM_XLOG_ID = 0
# Bytes of the record header the tracker looks at: up to and including xl_rmid.
_HEAD_NEEDED = 18
# palloc's limit (MaxAllocSize), which bounds every record PostgreSQL 15 can read back.
_MAX_RECORD_LEN = 0x3FFFFFFF


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class RecordBoundaryTracker:
    """Follow a WAL byte stream from a record end and report the last complete record.

    `start_lsn` must be a record end (PostgreSQL's MAXALIGNed `EndRecPtr`: the next record
    begins there, or just after the page header when it is page-aligned); `prev_record_lsn`
    is the start of the record that ends there (or the timeline's previous record LSN).
    Feed contiguous bytes; `last_record_end` / `last_record_lsn` move as records complete.
    """

    __slots__ = ("seg_size", "end_lsn", "last_record_end", "last_record_lsn",
                 "_pending", "_rec_start", "_rec_remaining", "_rec_head", "_page_done",
                 "_skip_to", "_done_lsn")

    def __init__(self, start_lsn: int, prev_record_lsn: int,
                 seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> None:
        check_segment_size(seg_size)
        assert start_lsn % 8 == 0, f"record end {_lsn(start_lsn)} is not MAXALIGNed"
        assert prev_record_lsn < start_lsn or start_lsn == 0, (prev_record_lsn, start_lsn)
        self.seg_size = seg_size
        self.end_lsn = start_lsn  # every byte below this has been fed
        self.last_record_end = start_lsn
        self.last_record_lsn = prev_record_lsn
        self._pending = b""  # unconsumed bytes at end_lsn (a header split across feeds)
        self._rec_start = -1  # start of the record being read, -1 between records
        self._rec_remaining = 0  # bytes of that record not yet seen (page headers excluded)
        self._rec_head = bytearray()  # its first _HEAD_NEEDED bytes, as they arrive
        self._page_done = -1  # the page whose header has been consumed
        self._skip_to = start_lsn  # padding (or an XLOG_SWITCH tail) to skip up to here
        # Start of the record whose contents are all fed; it counts once its padding is too.
        self._done_lsn = -1

    def in_record(self) -> bool:
        """True if bytes of an incomplete record were fed after `last_record_end`."""
        return self.end_lsn > self.last_record_end

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the stream (the first is the byte at `end_lsn`)."""
        buf = self._pending + bytes(data)
        pos = self.end_lsn - len(self._pending)  # LSN of buf[0]
        off = self._consume(buf, pos)
        self._pending = buf[off:]
        self.end_lsn = pos + len(buf)
        if self._done_lsn >= 0 and self.end_lsn >= self._skip_to:
            self._settle()

    def _consume(self, buf: bytes, base: int) -> int:
        """Advance over `buf` (whose first byte is at `base`); return the offset consumed."""
        off = 0
        n = len(buf)
        while off < n:
            pos = base + off
            if pos < self._skip_to:
                off += min(self._skip_to - pos, n - off)
                continue
            if self._done_lsn >= 0:
                self._settle()
            if pos & _PAGE_MASK == 0 and self._page_done != pos:
                size = page_header_size(pos, self.seg_size)
                if n - off < size:
                    return off
                self._check_page(pos, buf, off)
                self._page_done = pos
                off += size
                continue
            page_end = (pos | _PAGE_MASK) + 1
            if self._rec_start < 0:
                if n - off < 4:
                    return off
                tot_len = _U32.unpack_from(buf, off)[0]
                if SIZE_OF_XLOG_RECORD <= tot_len <= min(page_end - pos, n - off):
                    # The usual record: all of it on this page and in `buf` (so its header
                    # too): what _begin_record, the loop below and _end_record do, at once.
                    end = (pos + tot_len + 7) & ~7
                    if buf[off + 17] == _RM_XLOG_ID and \
                            buf[off + 16] & XLR_RMGR_INFO_MASK == XLOG_SWITCH:
                        end = (end + self.seg_size - 1) // self.seg_size * self.seg_size
                    self._done_lsn = pos
                    self._rec_remaining = 0
                    self._skip_to = end
                    off += tot_len
                    continue
                self._begin_record(pos, tot_len)
            take = min(self._rec_remaining, page_end - pos, n - off)
            if len(self._rec_head) < _HEAD_NEEDED:
                self._rec_head += buf[off:off + min(take, _HEAD_NEEDED - len(self._rec_head))]
            off += take
            self._rec_remaining -= take
            if self._rec_remaining == 0:
                self._end_record(base + off)
        return off

    def _check_page(self, page: int, buf: bytes, off: int) -> None:
        magic, info, _tli, pageaddr, rem_len = _PAGE_HEADER.unpack_from(buf, off)
        if magic != XLOG_PAGE_MAGIC:
            raise CorruptionError(f"WAL page at {_lsn(page)} has magic {magic:#06x}, "
                                  f"expected {XLOG_PAGE_MAGIC:#06x} (PostgreSQL 15)")
        if pageaddr != page:
            raise CorruptionError(f"WAL page at {_lsn(page)} says it is at {_lsn(pageaddr)}; "
                                  "the stream skipped or repeated bytes")
        expected = self._rec_remaining if self._rec_start >= 0 else 0
        got = rem_len if info & XLP_FIRST_IS_CONTRECORD else 0
        if got != expected:
            raise CorruptionError(f"WAL page at {_lsn(page)} continues a record by {got} "
                                  f"bytes, expected {expected}")

    def _begin_record(self, pos: int, tot_len: int) -> None:
        if tot_len < SIZE_OF_XLOG_RECORD or tot_len > _MAX_RECORD_LEN:
            raise CorruptionError(f"WAL record at {_lsn(pos)} has invalid xl_tot_len {tot_len}")
        self._rec_start = pos
        self._rec_remaining = tot_len
        self._rec_head.clear()

    def _end_record(self, pos: int) -> None:
        end = (pos + 7) & ~7
        head = self._rec_head
        assert len(head) == _HEAD_NEEDED, (len(head), self._rec_start)
        if head[17] == _RM_XLOG_ID and head[16] & XLR_RMGR_INFO_MASK == XLOG_SWITCH:
            # xlogreader.c: a switch record extends to the end of its segment.
            end = (end + self.seg_size - 1) // self.seg_size * self.seg_size
        self._done_lsn = self._rec_start
        self._rec_start = -1
        self._skip_to = end

    def _settle(self) -> None:
        """The finished record's padding (or switch tail) has been fed: it is complete."""
        self.last_record_lsn = self._done_lsn
        self.last_record_end = self._skip_to
        self._done_lsn = -1


def scan_record_bounds(start_lsn: int, prev_record_lsn: int, data: bytes,
                       seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> tuple[int, int]:
    """(last_record_end, last_record_lsn) of the WAL `data` that begins at record end
    `start_lsn`. An acceptor restart uses it on its durable WAL (see acceptor.py)."""
    tracker = RecordBoundaryTracker(start_lsn, prev_record_lsn, seg_size)
    tracker.feed(data)
    return tracker.last_record_end, tracker.last_record_lsn

"""Fake but well-formed PostgreSQL 15 WAL for the quorum tests: XLOG_NOOP records.

Every record has a real `XLogRecord` header (length, prev-link, rmgr XLOG, info
`XLOG_NOOP`, CRC-32C) and a main-data payload, and every page a real page header (long on a
segment's first page, `XLP_FIRST_IS_CONTRECORD` + `xlp_rem_len` when a record continues), so
`strata.pg.walreader` decodes the stream and the record-boundary tracker is exercised on
records that span pages and segments. Layouts: `xlog_internal.h`, `xlogrecord.h`.
"""

from __future__ import annotations

import random
import struct

from strata.pg.constants import (
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLOG_BLCKSZ,
    XLOG_NOOP,
    XLOG_PAGE_MAGIC,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    XLR_BLOCK_ID_DATA_LONG,
    XLR_BLOCK_ID_DATA_SHORT,
)
from strata.pg.crc import crc32c

_RECORD_HEADER = struct.Struct("<IIQBBxxI")
_SHORT_PHD = struct.Struct("<HHIQI4x")
_LONG_PHD = struct.Struct("<HHIQI4xQII")
SYSID = 7_300_000_000_000_000_001


def noop_record(prev_lsn: int, payload: bytes) -> bytes:
    """One XLOG_NOOP record carrying `payload` as main data, with its CRC."""
    if len(payload) < 256:
        body = bytes([XLR_BLOCK_ID_DATA_SHORT, len(payload)]) + payload
    else:
        body = bytes([XLR_BLOCK_ID_DATA_LONG]) + struct.pack("<I", len(payload)) + payload
    tot_len = 24 + len(body)
    head = _RECORD_HEADER.pack(tot_len, 0, prev_lsn, XLOG_NOOP, 0, 0)
    crc = crc32c(head[:20], crc32c(body))
    return head[:20] + struct.pack("<I", crc) + body


class WalGenerator:
    """Produce the WAL stream after record end `start_lsn`, one record at a time.

    The bytes of a page header that lies before `start_lsn` are not part of the stream (a
    timeline starts mid-page at a record end; D6/D7).
    """

    def __init__(self, start_lsn: int, prev_lsn: int, seg_size: int = 1 << 20,
                 sysid: int = SYSID) -> None:
        assert start_lsn % 8 == 0, start_lsn
        self.seg_size = seg_size
        self.sysid = sysid
        self.end_lsn = start_lsn
        self.prev_lsn = prev_lsn

    def _page_header(self, page: int, rem_len: int) -> bytes:
        info = XLP_FIRST_IS_CONTRECORD if rem_len else 0
        if page % self.seg_size == 0:
            return _LONG_PHD.pack(XLOG_PAGE_MAGIC, info | XLP_LONG_HEADER, 1, page, rem_len,
                                  self.sysid, self.seg_size, XLOG_BLCKSZ)
        return _SHORT_PHD.pack(XLOG_PAGE_MAGIC, info, 1, page, rem_len)

    def record(self, payload: bytes) -> tuple[int, bytes]:
        """Append one record; return (its start LSN, the stream bytes it adds)."""
        out = bytearray()
        pos = self.end_lsn
        if pos % XLOG_BLCKSZ == 0:
            out += self._page_header(pos, 0)
            pos += len(out)
        start = pos
        rec = noop_record(self.prev_lsn, payload)
        written = 0
        while True:
            take = min(len(rec) - written, (pos | (XLOG_BLCKSZ - 1)) + 1 - pos)
            out += rec[written:written + take]
            written += take
            pos += take
            if written == len(rec):
                break
            header = self._page_header(pos, len(rec) - written)
            assert len(header) in (SIZE_OF_XLOG_SHORT_PHD, SIZE_OF_XLOG_LONG_PHD)
            out += header
            pos += len(header)
        pad = (-pos) % 8
        out += bytes(pad)
        self.end_lsn = pos + pad
        self.prev_lsn = start
        return start, bytes(out)

    def random_record(self, rng: random.Random) -> tuple[int, bytes]:
        """A record of a random size: mostly small, sometimes spanning pages."""
        size = rng.choice((rng.randrange(0, 200), rng.randrange(200, 3000),
                           rng.randrange(3000, 20000)))
        return self.record(rng.randbytes(size))

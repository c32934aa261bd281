"""`CheckPoint`: PostgreSQL 15's 88-byte checkpoint struct, as stored in WAL and pg_control.

Layout (pg_control.h, offsets checked with `offsetof` against the 15.20 headers, x86-64):

    redo u64 @0, ThisTimeLineID u32 @8, PrevTimeLineID u32 @12, fullPageWrites bool @16,
    (7 pad) nextXid FullTransactionId u64 @24, nextOid u32 @32, nextMulti u32 @36,
    nextMultiOffset u32 @40, oldestXid u32 @44, oldestXidDB u32 @48, oldestMulti u32 @52,
    oldestMultiDB u32 @56, (4 pad) time pg_time_t i64 @64, oldestCommitTsXid u32 @72,
    newestCommitTsXid u32 @76, oldestActiveXid u32 @80, (4 pad) -> 88 bytes.

PostgreSQL zeroes the struct before filling it (`CreateCheckPoint` MemSets it), so the
padding bytes are written as zeros; `from_bytes` does not look at them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn

SIZE_OF_CHECKPOINT = 88

# '<' = no implicit alignment; padding is spelled out with 'x' so the offsets above are explicit.
_CHECKPOINT = struct.Struct("<QIIB7xQIIIIIII4xqIII4x")
assert _CHECKPOINT.size == SIZE_OF_CHECKPOINT, _CHECKPOINT.size
NEXT_XID_OFFSET = 24  # of nextXid (u64) in the struct
_U64 = struct.Struct("<Q")


def with_next_xid_bytes(encoded: bytes, next_xid: int) -> bytes:
    """`encoded` (a `CheckPoint.to_bytes()`) with another nextXid: what
    `CheckPoint.with_next_xid(next_xid).to_bytes()` gives, without the 16-field object
    (ingest stores the checkpoint once per transaction, for its new nextXid)."""
    return (encoded[:NEXT_XID_OFFSET] + _U64.pack(next_xid)
            + encoded[NEXT_XID_OFFSET + _U64.size:])


@dataclass(frozen=True, slots=True)
class CheckPoint:
    """Every field of PostgreSQL's `CheckPoint`; `next_xid` is the full 64-bit xid (epoch << 32)."""

    redo: Lsn
    this_timeline_id: int
    prev_timeline_id: int
    full_page_writes: bool
    next_xid: int
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int

    @property
    def next_xid_epoch(self) -> int:
        return self.next_xid >> 32

    @property
    def next_xid_32(self) -> int:
        """The 32-bit xid part of nextXid (what pg_controldata prints after the colon)."""
        return self.next_xid & 0xFFFFFFFF

    def with_next_xid(self, next_xid: int) -> CheckPoint:
        """This checkpoint with another `next_xid` (`dataclasses.replace` costs several
        times more, and ingest does this once per transaction)."""
        return CheckPoint(self.redo, self.this_timeline_id, self.prev_timeline_id,
                          self.full_page_writes, next_xid, self.next_oid, self.next_multi,
                          self.next_multi_offset, self.oldest_xid, self.oldest_xid_db,
                          self.oldest_multi, self.oldest_multi_db, self.time,
                          self.oldest_commit_ts_xid, self.newest_commit_ts_xid,
                          self.oldest_active_xid)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, path: str | None = None,
                   offset: int = 0) -> CheckPoint:
        """Parse 88 bytes at `offset` of `data`; `path` only names the source in errors."""
        if len(data) - offset < SIZE_OF_CHECKPOINT:
            raise CorruptionError(f"CheckPoint needs {SIZE_OF_CHECKPOINT} bytes, "
                                  f"got {len(data) - offset}", path=path, offset=offset)
        (redo, tli, prev_tli, fpw, next_xid, next_oid, next_multi, next_multi_offset,
         oldest_xid, oldest_xid_db, oldest_multi, oldest_multi_db, time, oldest_commit_ts_xid,
         newest_commit_ts_xid, oldest_active_xid) = _CHECKPOINT.unpack_from(data, offset)
        return cls(Lsn(redo), tli, prev_tli, fpw != 0, next_xid, next_oid, next_multi,
                   next_multi_offset, oldest_xid, oldest_xid_db, oldest_multi, oldest_multi_db,
                   time, oldest_commit_ts_xid, newest_commit_ts_xid, oldest_active_xid)

    def to_bytes(self) -> bytes:
        return _CHECKPOINT.pack(
            self.redo.value, self.this_timeline_id, self.prev_timeline_id,
            1 if self.full_page_writes else 0, self.next_xid, self.next_oid, self.next_multi,
            self.next_multi_offset, self.oldest_xid, self.oldest_xid_db, self.oldest_multi,
            self.oldest_multi_db, self.time, self.oldest_commit_ts_xid,
            self.newest_commit_ts_xid, self.oldest_active_xid)

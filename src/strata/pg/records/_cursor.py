"""Bounds-checked reading of a WAL record's main data for the record decoders.

Every decoder reads through a `Cursor`, so a short or damaged record becomes a
`CorruptionError` naming the record (resource manager, type, LSN), the offset
and what was being read, instead of an `IndexError` or `struct.error`.
All multi-byte fields are little-endian with the x86-64 C struct layouts of
PostgreSQL 15 (the only platform Strata supports).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Protocol

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn

# (spcnode, dbnode, relnode): a RelFileNode (relfilenode.h), the same for every fork.
RelFileNode = tuple[int, int, int]  # spcNode, dbNode, relNode (relfilenode.h), no fork

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
I32 = struct.Struct("<i")
U64 = struct.Struct("<Q")
I64 = struct.Struct("<q")
REL_FILE_NODE = struct.Struct("<III")  # spcNode, dbNode, relNode (relfilenode.h)

# A count in a record can never describe more items than a WAL record can hold
# (XLogRecordMaxSize is 1 GB); the real bound is the bytes left, checked below.
_MAX_COUNT = 1 << 30


class BlockLike(Protocol):
    """The parts of a decoded block reference the record decoders look at."""

    @property
    def block_id(self) -> int: ...
    @property
    def spcnode(self) -> int: ...
    @property
    def dbnode(self) -> int: ...
    @property
    def relnode(self) -> int: ...
    @property
    def forknum(self) -> int: ...
    @property
    def blkno(self) -> int: ...


class Cursor:
    """A read position in one record's main data; every read is bounds-checked."""

    __slots__ = ("data", "pos", "rmid", "info", "lsn")

    def __init__(self, data: bytes, rmid: int, info: int, lsn: int | None) -> None:
        self.data = data
        self.pos = 0
        self.rmid = rmid
        self.info = info
        self.lsn = lsn

    def error(self, problem: str) -> CorruptionError:
        # The record's name is only worked out when something is wrong (hot path).
        from strata.pg.records.names import record_type_name

        what = record_type_name(self.rmid, self.info)
        where = f" at {Lsn(self.lsn)}" if self.lsn is not None else ""
        return CorruptionError(
            f"{what} record{where}: {problem} (main data is {len(self.data)} bytes); "
            "the WAL is damaged or was not written by PostgreSQL 15 - "
            "stop ingesting this timeline and check its WAL with pg_waldump")

    def _need(self, size: int, field: str) -> int:
        end = self.pos + size
        if end > len(self.data):
            raise self.error(f"{field} needs {size} bytes at offset {self.pos}, "
                             f"only {len(self.data) - self.pos} left")
        return end

    def unpack(self, st: struct.Struct, field: str) -> tuple[Any, ...]:
        end = self._need(st.size, field)
        values = st.unpack_from(self.data, self.pos)
        self.pos = end
        return values

    def u32(self, field: str) -> int:
        return int(self.unpack(U32, field)[0])

    def i32(self, field: str) -> int:
        return int(self.unpack(I32, field)[0])

    def u64(self, field: str) -> int:
        return int(self.unpack(U64, field)[0])

    def i64(self, field: str) -> int:
        return int(self.unpack(I64, field)[0])

    def count(self, field: str, item_size: int) -> int:
        """A C `int` count of items of `item_size` bytes that must fit in the rest."""
        n = self.i32(field)
        if n < 0 or n > _MAX_COUNT:
            raise self.error(f"{field} is {n}")
        self._need(n * item_size, f"{n} entries of {field}")
        return n

    def array(self, fmt_char: str, n: int, field: str) -> tuple[int, ...]:
        if n < 0:
            raise self.error(f"{field} has negative count {n}")
        if n == 0:
            return ()
        st = struct.Struct(f"<{n}{fmt_char}")
        return self.unpack(st, field)

    def rels(self, n: int, field: str) -> tuple[RelFileNode, ...]:
        flat = self.array("I", 3 * n, field)
        return tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * n, 3))

    def raw(self, size: int, field: str) -> bytes:
        if size < 0:
            raise self.error(f"{field} has negative length {size}")
        end = self._need(size, field)
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def cstring(self, field: str) -> bytes:
        """A NUL-terminated string; returns it without the NUL."""
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.error(f"{field} at offset {self.pos} has no terminating NUL")
        out = self.data[self.pos:end]
        self.pos = end + 1
        return out

    def align(self, alignment: int) -> None:
        """Skip padding up to the next multiple of `alignment` (MAXALIGN is 8)."""
        aligned = (self.pos + alignment - 1) // alignment * alignment
        self._need(aligned - self.pos, "alignment padding")
        self.pos = aligned

    def remaining(self) -> int:
        return len(self.data) - self.pos


def find_block(blocks: Sequence[BlockLike], block_id: int) -> BlockLike | None:
    for block in blocks:
        if block.block_id == block_id:
            return block
    return None


def need_block(cur: Cursor, blocks: Sequence[BlockLike], block_id: int) -> BlockLike:
    block = find_block(blocks, block_id)
    if block is None:
        ids = [b.block_id for b in blocks]
        raise cur.error(f"block reference {block_id} is missing (record has blocks {ids})")
    return block


def rel_of(block: BlockLike) -> RelFileNode:
    return (block.spcnode, block.dbnode, block.relnode)

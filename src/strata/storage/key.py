"""The pageserver's key space: fixed 18-byte keys, key ranges, and their constructors.

A key names one 8 KB page or one small piece of metadata (architecture.md D3).
Encoded big-endian as `field1 u8, field2 u32, field3 u32, field4 u32, field5 u8,
field6 u32` (18 bytes), so that byte order equals key order and layer files can
compare encoded keys directly.

Key spaces (field1), each laid out so that the scans the timeline needs are
narrow contiguous ranges:

    0x00 relation block   (spcnode, dbnode, relnode, forknum, blkno)
    0x01 relation size    (spcnode, dbnode, relnode, forknum, 0)
         kept apart from the blocks so that listing a database's relations scans
         only its size keys, never its pages
    0x02 database dir     (spcnode, dbnode, 0, 0, 0)        value: PG_VERSION content
    0x03 relation map     (spcnode, dbnode, 0, 0, 0)        pg_filenode.map
    0x04 SLRU block       (kind, segno, 0, 1, blkno)
         SLRU seg size    (kind, segno, 0, 0, 0)           (sorts before its blocks)
    0x05 two-phase file   (0, 0, 0, 0, xid)
    0x06 checkpoint       (0, 0, 0, 0, 0)
    0x07 control file     (0, 0, 0, 0, 0)
    0xFF reserved: KEY_MAX = all 0xFF bytes, the exclusive end of everything
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind

KEY_SIZE = 18
_KEY = struct.Struct(">BIIIBI")
assert _KEY.size == KEY_SIZE, _KEY.size
_U32 = 0xFFFFFFFF
_U8 = 0xFF

SPACE_REL_BLOCK = 0x00
SPACE_REL_SIZE = 0x01
SPACE_DB_DIR = 0x02
SPACE_RELMAP = 0x03
SPACE_SLRU = 0x04
SPACE_TWOPHASE = 0x05
SPACE_CHECKPOINT = 0x06
SPACE_CONTROL_FILE = 0x07

_SLRU_SEGMENT_SIZE = 0  # field5 of an SLRU segment-size key
_SLRU_BLOCK = 1  # field5 of an SLRU block key


class _KeyFields(NamedTuple):
    field1: int
    field2: int
    field3: int
    field4: int
    field5: int
    field6: int


class Key(_KeyFields):
    """An 18-byte key; field order is comparison order (the same as byte order).

    A tuple of its six fields (a `NamedTuple`), not a dataclass: ingest hashes a key on
    every put and layer files sort them, and a tuple's hash, equality and order run in C
    where a dataclass's are Python calls. The order, the equality of equal fields and the
    encoding are the dataclass's; a `Key` also equals a plain tuple of the same six ints,
    which nothing compares it with.
    """

    __slots__ = ()

    def __new__(cls, field1: int, field2: int, field3: int, field4: int, field5: int,
                field6: int) -> Key:
        assert 0 <= field1 <= _U8, field1
        assert 0 <= field2 <= _U32, field2
        assert 0 <= field3 <= _U32, field3
        assert 0 <= field4 <= _U32, field4
        assert 0 <= field5 <= _U8, field5
        assert 0 <= field6 <= _U32, field6
        return tuple.__new__(cls, (field1, field2, field3, field4, field5, field6))

    # --- encoding ---------------------------------------------------------
    def to_bytes(self) -> bytes:
        return _KEY.pack(*self)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Key:
        assert len(data) == KEY_SIZE, len(data)
        return cls(*_KEY.unpack(data))

    def to_int(self) -> int:
        """The key as a 144-bit integer (same order)."""
        return int.from_bytes(self.to_bytes(), "big")

    @classmethod
    def from_int(cls, value: int) -> Key:
        assert 0 <= value < 1 << (8 * KEY_SIZE), value
        return cls.from_bytes(value.to_bytes(KEY_SIZE, "big"))

    def next(self) -> Key:
        """The immediately following key (carrying across fields)."""
        assert self != KEY_MAX, "KEY_MAX has no successor"
        return Key.from_int(self.to_int() + 1)

    def hex(self) -> str:
        return self.to_bytes().hex().upper()

    def __str__(self) -> str:
        return self.hex()

    # --- decoders ---------------------------------------------------------
    def is_rel_block(self) -> bool:
        return self.field1 == SPACE_REL_BLOCK

    def is_rel_size(self) -> bool:
        return self.field1 == SPACE_REL_SIZE

    def is_db_dir(self) -> bool:
        return self.field1 == SPACE_DB_DIR

    def is_relmap(self) -> bool:
        return self.field1 == SPACE_RELMAP

    def is_slru_block(self) -> bool:
        return self.field1 == SPACE_SLRU and self.field5 == _SLRU_BLOCK

    def is_slru_segment_size(self) -> bool:
        return self.field1 == SPACE_SLRU and self.field5 == _SLRU_SEGMENT_SIZE

    def is_twophase(self) -> bool:
        return self.field1 == SPACE_TWOPHASE

    def is_page(self) -> bool:
        """Keys whose value is an 8 KB page (a delta chain with no image starts at zeros)."""
        return self.is_rel_block() or self.is_slru_block()

    def rel_tag(self) -> RelTag:
        assert self.is_rel_block() or self.is_rel_size(), self
        return RelTag(self.field2, self.field3, self.field4, self.field5)

    def blkno(self) -> int:
        assert self.is_rel_block() or self.is_slru_block(), self
        return self.field6

    def db(self) -> tuple[int, int]:
        """(spcnode, dbnode) of a relation, database-directory or relation-map key."""
        assert self.field1 in (SPACE_REL_BLOCK, SPACE_REL_SIZE, SPACE_DB_DIR, SPACE_RELMAP), self
        return self.field2, self.field3

    def slru_kind(self) -> SlruKind:
        assert self.field1 == SPACE_SLRU, self
        return SlruKind(self.field2)

    def segno(self) -> int:
        assert self.field1 == SPACE_SLRU, self
        return self.field3

    def xid(self) -> int:
        assert self.is_twophase(), self
        return self.field6


KEY_MIN = Key(0, 0, 0, 0, 0, 0)
KEY_MAX = Key(_U8, _U32, _U32, _U32, _U8, _U32)


@dataclass(frozen=True, slots=True, order=True)
class KeyRange:
    """Half-open key range [start, end)."""

    start: Key
    end: Key

    def __post_init__(self) -> None:
        assert self.start <= self.end, (self.start, self.end)

    def contains(self, key: Key) -> bool:
        return self.start <= key < self.end

    def overlaps(self, other: KeyRange) -> bool:
        return self.start < other.end and other.start < self.end

    def is_empty(self) -> bool:
        return self.start == self.end

    def covers(self, other: KeyRange) -> bool:
        """True if every key of `other` is in this range."""
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


FULL_KEY_RANGE = KeyRange(KEY_MIN, KEY_MAX)


def _space_range(space: int) -> KeyRange:
    return KeyRange(Key(space, 0, 0, 0, 0, 0), Key(space + 1, 0, 0, 0, 0, 0))


# --- relations ------------------------------------------------------------
def rel_block_key(rel: RelTag, blkno: int) -> Key:
    return Key(SPACE_REL_BLOCK, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, blkno)


def rel_size_key(rel: RelTag) -> Key:
    return Key(SPACE_REL_SIZE, rel.spcnode, rel.dbnode, rel.relnode, rel.forknum, 0)


def rel_block_range(rel: RelTag) -> KeyRange:
    """All blocks of one fork, in block order."""
    first = rel_block_key(rel, 0)
    return KeyRange(first, rel_block_key(rel, _U32).next())


def rel_size_range(spcnode: int, dbnode: int) -> KeyRange:
    """The size keys of every fork of every relation of one database."""
    return KeyRange(Key(SPACE_REL_SIZE, spcnode, dbnode, 0, 0, 0),
                    Key(SPACE_REL_SIZE, spcnode, dbnode, _U32, _U8, _U32).next())


def rel_db_block_range(spcnode: int, dbnode: int) -> KeyRange:
    """Every block of every relation of one database (for dropping a database)."""
    return KeyRange(Key(SPACE_REL_BLOCK, spcnode, dbnode, 0, 0, 0),
                    Key(SPACE_REL_BLOCK, spcnode, dbnode, _U32, _U8, _U32).next())


# --- databases and relation maps --------------------------------------------
def db_dir_key(spcnode: int, dbnode: int) -> Key:
    return Key(SPACE_DB_DIR, spcnode, dbnode, 0, 0, 0)


def db_dir_range() -> KeyRange:
    return _space_range(SPACE_DB_DIR)


def relmap_key(spcnode: int, dbnode: int) -> Key:
    """pg_filenode.map of a database; the global one is (1664, 0)."""
    return Key(SPACE_RELMAP, spcnode, dbnode, 0, 0, 0)


def relmap_range() -> KeyRange:
    return _space_range(SPACE_RELMAP)


# --- SLRUs ---------------------------------------------------------------------
def slru_block_key(kind: SlruKind, segno: int, blkno: int) -> Key:
    return Key(SPACE_SLRU, int(kind), segno, 0, _SLRU_BLOCK, blkno)


def slru_segment_size_key(kind: SlruKind, segno: int) -> Key:
    return Key(SPACE_SLRU, int(kind), segno, 0, _SLRU_SEGMENT_SIZE, 0)


def slru_range(kind: SlruKind) -> KeyRange:
    """Segment sizes and blocks of one SLRU, segment by segment."""
    return KeyRange(Key(SPACE_SLRU, int(kind), 0, 0, 0, 0),
                    Key(SPACE_SLRU, int(kind) + 1, 0, 0, 0, 0))


def slru_segment_range(kind: SlruKind, segno: int) -> KeyRange:
    """The size key and the blocks of one SLRU segment."""
    return KeyRange(slru_segment_size_key(kind, segno),
                    Key(SPACE_SLRU, int(kind), segno, 0, _U8, _U32).next())


# --- singletons ------------------------------------------------------------------
def twophase_key(xid: int) -> Key:
    return Key(SPACE_TWOPHASE, 0, 0, 0, 0, xid)


def twophase_range() -> KeyRange:
    return _space_range(SPACE_TWOPHASE)


def checkpoint_key() -> Key:
    return Key(SPACE_CHECKPOINT, 0, 0, 0, 0, 0)


def control_file_key() -> Key:
    return Key(SPACE_CONTROL_FILE, 0, 0, 0, 0, 0)

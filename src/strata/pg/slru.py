"""SLRU address math for pg_xact and pg_multixact: which page, byte and bits hold an entry.

The functions return page numbers and small patches, (byte offset, clear mask, set mask) or
(byte offset, bytes), that the storage engine's deltas carry (D3); they never touch a file.
Sources: clog.c (CLOG_*), multixact.c (MULTIXACT_*, MXOffsetTo*), slru.c/slru.h
(SLRU_PAGES_PER_SEGMENT, `SlruFileName` is "%04X" in PostgreSQL 15).

Page numbers are plain ints: PostgreSQL 15 computes them from 32-bit xids and offsets,
so they never exceed 2^32 / entries-per-page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from strata.pg.constants import BLCKSZ

SLRU_PAGES_PER_SEGMENT = 32

# --- pg_xact (clog.c) --------------------------------------------------------
CLOG_BITS_PER_XACT = 2
CLOG_XACTS_PER_BYTE = 4
CLOG_XACTS_PER_PAGE = BLCKSZ * CLOG_XACTS_PER_BYTE  # 32768
CLOG_XACT_BITMASK = (1 << CLOG_BITS_PER_XACT) - 1

# --- pg_multixact (multixact.c) ------------------------------------------------
MULTIXACT_OFFSET_SIZE = 4  # sizeof(MultiXactOffset)
MULTIXACT_OFFSETS_PER_PAGE = BLCKSZ // MULTIXACT_OFFSET_SIZE  # 2048
MXACT_MEMBER_BITS_PER_XACT = 8
MXACT_MEMBER_FLAGS_PER_BYTE = 1
MXACT_MEMBER_XACT_BITMASK = (1 << MXACT_MEMBER_BITS_PER_XACT) - 1
MULTIXACT_FLAGBYTES_PER_GROUP = 4
MULTIXACT_MEMBERS_PER_MEMBERGROUP = MULTIXACT_FLAGBYTES_PER_GROUP * MXACT_MEMBER_FLAGS_PER_BYTE
# A group is 4 flag bytes followed by 4 member xids: 20 bytes.
MULTIXACT_MEMBERGROUP_SIZE = 4 * MULTIXACT_MEMBERS_PER_MEMBERGROUP + MULTIXACT_FLAGBYTES_PER_GROUP
MULTIXACT_MEMBERGROUPS_PER_PAGE = BLCKSZ // MULTIXACT_MEMBERGROUP_SIZE  # 409
MULTIXACT_MEMBERS_PER_PAGE = (MULTIXACT_MEMBERGROUPS_PER_PAGE
                              * MULTIXACT_MEMBERS_PER_MEMBERGROUP)  # 1636

assert CLOG_XACTS_PER_PAGE == 32768, CLOG_XACTS_PER_PAGE
assert MULTIXACT_MEMBERGROUP_SIZE == 20, MULTIXACT_MEMBERGROUP_SIZE
assert MULTIXACT_MEMBERS_PER_PAGE == 1636, MULTIXACT_MEMBERS_PER_PAGE

_U32_MAX = 0xFFFFFFFF


class SlruKind(IntEnum):
    """The SLRUs the pageserver stores (pg_xact, pg_multixact/offsets, /members)."""

    CLOG = 0
    MULTIXACT_OFFSETS = 1
    MULTIXACT_MEMBERS = 2


class XidStatus(IntEnum):
    """clog.h `XidStatus` values, two bits per transaction."""

    IN_PROGRESS = 0x00
    COMMITTED = 0x01
    ABORTED = 0x02
    SUB_COMMITTED = 0x03


class MultiXactStatus(IntEnum):
    """multixact.h `MultiXactStatus`: the lock mode of one member, one flag byte each."""

    FOR_KEY_SHARE = 0
    FOR_SHARE = 1
    FOR_NO_KEY_UPDATE = 2
    FOR_UPDATE = 3
    NO_KEY_UPDATE = 4
    UPDATE = 5


@dataclass(frozen=True, slots=True)
class BitsPatch:
    """Within one SLRU page: byte = (byte & ~clear_mask) | set_mask."""

    page: int
    offset: int
    clear_mask: int
    set_mask: int

    def apply(self, page: bytearray) -> None:
        assert len(page) == BLCKSZ, len(page)
        page[self.offset] = (page[self.offset] & ~self.clear_mask & 0xFF) | self.set_mask


@dataclass(frozen=True, slots=True)
class BytesPatch:
    """Within one SLRU page: page[offset:offset + len(data)] = data."""

    page: int
    offset: int
    data: bytes

    def apply(self, page: bytearray) -> None:
        assert len(page) == BLCKSZ, len(page)
        assert self.offset + len(self.data) <= BLCKSZ, (self.offset, len(self.data))
        page[self.offset:self.offset + len(self.data)] = self.data


def _check_u32(value: int, what: str) -> None:
    assert 0 <= value <= _U32_MAX, (what, value)


def segment_of_page(page: int) -> int:
    return page // SLRU_PAGES_PER_SEGMENT


def page_in_segment(page: int) -> int:
    return page % SLRU_PAGES_PER_SEGMENT


def segment_file_name(segno: int) -> str:
    """`SlruFileName` in PostgreSQL 15: "%04X" (members segments can exceed 4 digits)."""
    assert segno >= 0, segno
    return f"{segno:04X}"


def parse_segment_file_name(name: str) -> int | None:
    """The segment number of an SLRU file name, or None if `name` is not one."""
    if not 4 <= len(name) <= 6 or any(c not in "0123456789ABCDEF" for c in name):
        return None
    return int(name, 16)


# --- pg_xact -------------------------------------------------------------------
def clog_page(xid: int) -> int:
    """`TransactionIdToPage`."""
    _check_u32(xid, "xid")
    return xid // CLOG_XACTS_PER_PAGE


def clog_byte(xid: int) -> int:
    """`TransactionIdToByte`: byte within the page."""
    _check_u32(xid, "xid")
    return (xid % CLOG_XACTS_PER_PAGE) // CLOG_XACTS_PER_BYTE


def clog_bit_shift(xid: int) -> int:
    """`TransactionIdToBIndex` * CLOG_BITS_PER_XACT: shift of the xid's 2 bits in its byte."""
    _check_u32(xid, "xid")
    return (xid % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT


def clog_set_status(xid: int, status: XidStatus) -> BitsPatch:
    """The patch that records `status` for `xid` in pg_xact."""
    shift = clog_bit_shift(xid)
    return BitsPatch(clog_page(xid), clog_byte(xid), CLOG_XACT_BITMASK << shift,
                     int(status) << shift)


def clog_get_status(page: bytes | bytearray, xid: int) -> XidStatus:
    """The status of `xid` in `page`, which must be page `clog_page(xid)`."""
    return XidStatus((page[clog_byte(xid)] >> clog_bit_shift(xid)) & CLOG_XACT_BITMASK)


# --- pg_multixact/offsets -----------------------------------------------------------
def multixact_offset_page(multi: int) -> int:
    """`MultiXactIdToOffsetPage`."""
    _check_u32(multi, "multixact id")
    return multi // MULTIXACT_OFFSETS_PER_PAGE


def multixact_offset_byte(multi: int) -> int:
    """`MultiXactIdToOffsetEntry` * sizeof(MultiXactOffset): byte within the page."""
    _check_u32(multi, "multixact id")
    return (multi % MULTIXACT_OFFSETS_PER_PAGE) * MULTIXACT_OFFSET_SIZE


def multixact_set_offset(multi: int, offset: int) -> BytesPatch:
    """The patch that stores the first member offset of `multi` (u32, little-endian)."""
    _check_u32(offset, "member offset")
    return BytesPatch(multixact_offset_page(multi), multixact_offset_byte(multi),
                      struct.pack("<I", offset))


# --- pg_multixact/members ---------------------------------------------------------
def member_page(offset: int) -> int:
    """`MXOffsetToMemberPage`."""
    _check_u32(offset, "member offset")
    return offset // MULTIXACT_MEMBERS_PER_PAGE


def member_flags_byte(offset: int) -> int:
    """`MXOffsetToFlagsOffset`: byte of the member's group flags word within the page."""
    _check_u32(offset, "member offset")
    group = (offset // MULTIXACT_MEMBERS_PER_MEMBERGROUP) % MULTIXACT_MEMBERGROUPS_PER_PAGE
    return group * MULTIXACT_MEMBERGROUP_SIZE


def member_flags_bit_shift(offset: int) -> int:
    """`MXOffsetToFlagsBitShift`: shift of the member's flags in the 32-bit flags word."""
    _check_u32(offset, "member offset")
    return (offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP) * MXACT_MEMBER_BITS_PER_XACT


def member_xid_byte(offset: int) -> int:
    """`MXOffsetToMemberOffset`: byte of the member's xid within the page."""
    return (member_flags_byte(offset) + MULTIXACT_FLAGBYTES_PER_GROUP
            + (offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP) * 4)


def member_set(offset: int, xid: int, status: MultiXactStatus) -> tuple[BytesPatch, BitsPatch]:
    """The patches that store member `offset` (its xid, then its flags byte).

    The flags word is little-endian, so bit shift 8*k is byte k of the word.
    """
    _check_u32(xid, "member xid")
    page = member_page(offset)
    shift = member_flags_bit_shift(offset)
    flags_byte = member_flags_byte(offset) + shift // 8
    return (BytesPatch(page, member_xid_byte(offset), struct.pack("<I", xid)),
            BitsPatch(page, flags_byte, MXACT_MEMBER_XACT_BITMASK, int(status)))

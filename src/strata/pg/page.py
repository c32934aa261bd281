"""Standard page header access (bufpage.h): pd_lsn, checksum, flags, lower/upper.

PageHeaderData (24 bytes): pd_lsn {xlogid u32, xrecoff u32} @0, pd_checksum u16 @8,
pd_flags u16 @10, pd_lower u16 @12, pd_upper u16 @14, pd_special u16 @16,
pd_pagesize_version u16 @18, pd_prune_xid u32 @20.
"""

from __future__ import annotations

import struct

from strata.pg.constants import BLCKSZ

SIZE_OF_PAGE_HEADER = 24
PD_HAS_FREE_LINES = 0x0001
PD_PAGE_FULL = 0x0002
PD_ALL_VISIBLE = 0x0004

_LSN = struct.Struct("<II")
_HDR = struct.Struct("<IIHHHHHHI")

ZERO_PAGE = bytes(BLCKSZ)


def page_lsn(page: bytes | bytearray | memoryview) -> int:
    hi, lo = _LSN.unpack_from(page, 0)
    return int((hi << 32) | lo)


def set_page_lsn(page: bytearray | memoryview, lsn: int) -> None:
    _LSN.pack_into(page, 0, lsn >> 32, lsn & 0xFFFFFFFF)


def with_page_lsn(page: bytes, lsn: int) -> bytes:
    """A copy of `page` with pd_lsn set (used on every WAL image, D2)."""
    buf = bytearray(page)
    set_page_lsn(buf, lsn)
    return bytes(buf)


def is_new(page: bytes | bytearray | memoryview) -> bool:
    """PageIsNew: pd_upper == 0 (an all-zero page PostgreSQL initializes itself)."""
    upper: int = struct.unpack_from("<H", page, 14)[0]
    return upper == 0


def header_fields(page: bytes | bytearray | memoryview) -> dict[str, int]:
    hi, lo, checksum, flags, lower, upper, special, size_version, prune_xid = \
        _HDR.unpack_from(page, 0)
    return {"lsn": (hi << 32) | lo, "checksum": checksum, "flags": flags, "lower": lower,
            "upper": upper, "special": special, "pagesize_version": size_version,
            "prune_xid": prune_xid}

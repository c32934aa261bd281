"""Data page checksums (checksum_impl.h): what `pd_checksum` must be for a block.

PostgreSQL verifies a page's checksum on read when the cluster has data checksums on;
WAL images carry the checksum of the moment they were logged (architecture D2), so a
page is given its checksum again wherever it is written out (basebackup, lazy compute).
"""

from __future__ import annotations

import struct

from strata.pg.constants import BLCKSZ
from strata.pg.page import is_new

# The page is read as 64 rows of 32 little-endian u32 words with pd_checksum taken as
# zero; lane j starts at its base offset and mixes in word j of every row, then two
# rounds of zero; the lanes are XORed, XORed with the block number, and reduced to
# 1..65535.
_N_SUMS = 32
_FNV_PRIME = 16777619
_CHECKSUM_BASE_OFFSETS = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2,
    0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C,
    0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979,
    0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756)
_PAGE_WORDS = struct.Struct(f"<{BLCKSZ // 4}I")
_PD_CHECKSUM = struct.Struct("<H")
_PD_CHECKSUM_OFFSET = 8


def page_checksum(page: bytes, blkno: int) -> int:
    """`pg_checksum_page` (checksum_impl.h): the pd_checksum of `page` as block `blkno`."""
    words = list(_PAGE_WORDS.unpack(page))
    words[_PD_CHECKSUM_OFFSET // 4] &= 0xFFFF0000  # pd_checksum is the low half of word 2
    mask = 0xFFFFFFFF
    result = 0
    for lane in range(_N_SUMS):
        acc = _CHECKSUM_BASE_OFFSETS[lane]
        for word in words[lane::_N_SUMS]:
            tmp = acc ^ word
            acc = ((tmp * _FNV_PRIME) & mask) ^ (tmp >> 17)
        for _ in range(2):
            acc = ((acc * _FNV_PRIME) & mask) ^ (acc >> 17)
        result ^= acc
    return ((result ^ blkno) % 65535) + 1


def with_checksum(page: bytes, blkno: int) -> bytes:
    """`page` with pd_checksum set for block `blkno`; a new (all-zero) page has none."""
    if is_new(page):
        return page
    buf = bytearray(page)
    _PD_CHECKSUM.pack_into(buf, _PD_CHECKSUM_OFFSET, page_checksum(page, blkno))
    return bytes(buf)

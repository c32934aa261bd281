"""Visibility-map address math: which VM page, byte and bits hold a heap block's flags.

Source: visibilitymap.c / visibilitymap.h (PostgreSQL 15). Each heap block has 2 bits
(all-visible, all-frozen); a VM page's contents start after the MAXALIGNed page header.
Heap records clear these bits without a block reference to the VM page (D2), so the
storage applies `clear_bits` patches itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.pg.constants import BLCKSZ, MAXIMUM_ALIGNOF
from strata.pg.page import SIZE_OF_PAGE_HEADER

BITS_PER_HEAPBLOCK = 2
HEAPBLOCKS_PER_BYTE = 8 // BITS_PER_HEAPBLOCK
# MAXALIGN(SizeOfPageHeaderData): where PageGetContents starts.
MAP_OFFSET = (SIZE_OF_PAGE_HEADER + MAXIMUM_ALIGNOF - 1) // MAXIMUM_ALIGNOF * MAXIMUM_ALIGNOF
MAPSIZE = BLCKSZ - MAP_OFFSET
HEAPBLOCKS_PER_PAGE = MAPSIZE * HEAPBLOCKS_PER_BYTE

VISIBILITYMAP_ALL_VISIBLE = 0x01
VISIBILITYMAP_ALL_FROZEN = 0x02
VISIBILITYMAP_VALID_BITS = 0x03

assert HEAPBLOCKS_PER_PAGE == 32672, HEAPBLOCKS_PER_PAGE
MAX_BLOCK_NUMBER = 0xFFFFFFFE  # MaxBlockNumber (block.h)


@dataclass(frozen=True, slots=True)
class VmClear:
    """On VM block `vm_block`: page[offset] &= ~clear_mask (offset includes the page header)."""

    vm_block: int
    offset: int
    clear_mask: int

    def apply(self, page: bytearray) -> None:
        assert len(page) == BLCKSZ, len(page)
        page[self.offset] &= ~self.clear_mask & 0xFF


def vm_block(heap_block: int) -> int:
    """HEAPBLK_TO_MAPBLOCK."""
    assert 0 <= heap_block <= MAX_BLOCK_NUMBER, heap_block
    return heap_block // HEAPBLOCKS_PER_PAGE


def vm_byte(heap_block: int) -> int:
    """HEAPBLK_TO_MAPBYTE: byte within the map area (after the page header)."""
    assert 0 <= heap_block <= MAX_BLOCK_NUMBER, heap_block
    return (heap_block % HEAPBLOCKS_PER_PAGE) // HEAPBLOCKS_PER_BYTE


def vm_bit_shift(heap_block: int) -> int:
    """HEAPBLK_TO_OFFSET: shift of the block's 2 bits within its byte."""
    assert 0 <= heap_block <= MAX_BLOCK_NUMBER, heap_block
    return (heap_block % HEAPBLOCKS_PER_BYTE) * BITS_PER_HEAPBLOCK


def vm_page_offset(heap_block: int) -> int:
    """Byte offset within the 8 KB VM page (page header included)."""
    return MAP_OFFSET + vm_byte(heap_block)


def clear_bits(heap_block: int, flags: int = VISIBILITYMAP_VALID_BITS) -> VmClear:
    """The patch `visibilitymap_clear(heap_block, flags)` makes.

    Heap insert/update/delete clear both bits; heap lock clears only ALL_FROZEN.
    """
    assert flags and not flags & ~VISIBILITYMAP_VALID_BITS, flags
    return VmClear(vm_block(heap_block), vm_page_offset(heap_block),
                   flags << vm_bit_shift(heap_block))


def get_bits(page: bytes | bytearray, heap_block: int) -> int:
    """The heap block's flags in `page`, which must be VM block `vm_block(heap_block)`."""
    return (page[vm_page_offset(heap_block)] >> vm_bit_shift(heap_block)) \
        & VISIBILITYMAP_VALID_BITS

"""Visibility-map address math, checked against a VM page from a real PostgreSQL 15.

Fixture: a 59-block table after VACUUM (FREEZE) (every block all-visible and all-frozen),
then an UPDATE on block 29 (clears both bits) and a FOR SHARE lock on block 43 (clears
ALL_FROZEN only); pg_visibility reported exactly those two blocks.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from strata.pg import visibilitymap as vm

# Bytes 24..39 of base/5/16384_vm (the map starts after the 24-byte page header).
VM_24 = bytes.fromhex("fffffffffffffff3ffff7fffffff3f00")


def frozen_page(nblocks: int) -> bytearray:
    page = bytearray(8192)
    for blk in range(nblocks):
        page[vm.vm_page_offset(blk)] |= vm.VISIBILITYMAP_VALID_BITS << vm.vm_bit_shift(blk)
    return page


def test_constants() -> None:
    assert vm.MAP_OFFSET == 24
    assert vm.MAPSIZE == 8168
    assert vm.HEAPBLOCKS_PER_PAGE == 32672


def test_clear_reproduces_postgres_page() -> None:
    page = frozen_page(59)
    vm.clear_bits(29).apply(page)
    vm.clear_bits(43, vm.VISIBILITYMAP_ALL_FROZEN).apply(page)
    assert page[24:40] == VM_24
    assert page[40:] == bytes(8192 - 40)
    assert vm.get_bits(page, 29) == 0
    assert vm.get_bits(page, 43) == vm.VISIBILITYMAP_ALL_VISIBLE
    assert vm.get_bits(page, 58) == vm.VISIBILITYMAP_VALID_BITS
    assert vm.get_bits(page, 59) == 0


def test_addresses() -> None:
    assert (vm.vm_block(29), vm.vm_page_offset(29), vm.vm_bit_shift(29)) == (0, 31, 2)
    assert vm.clear_bits(29) == vm.VmClear(0, 31, 0b1100)
    last = vm.HEAPBLOCKS_PER_PAGE - 1
    assert (vm.vm_block(last), vm.vm_page_offset(last), vm.vm_bit_shift(last)) == (0, 8191, 6)
    assert (vm.vm_block(last + 1), vm.vm_page_offset(last + 1)) == (1, 24)
    assert vm.vm_block(0xFFFFFFFE) == 0xFFFFFFFE // 32672


@settings(max_examples=200)
@given(st.integers(0, 0xFFFFFFFE), st.sampled_from([1, 2, 3]))
def test_clear_touches_only_its_bits(heap_block: int, flags: int) -> None:
    page = bytearray(b"\xFF" * 8192)
    vm.clear_bits(heap_block, flags).apply(page)
    assert vm.get_bits(page, heap_block) == 3 & ~flags
    assert page.count(0xFF) == 8191
    assert vm.vm_page_offset(heap_block) >= 24
    assert (vm.vm_block(heap_block) * 32672 + (vm.vm_page_offset(heap_block) - 24) * 4
            + vm.vm_bit_shift(heap_block) // 2) == heap_block

"""Page masks (strata.pg.masking) on constructed pages: what PostgreSQL 15 masks is
masked, and real content changes are not; diff_fields names the field that differs."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.pg import masking as m
from strata.pg.constants import BLCKSZ

SPECIAL_SIZE = {"heap": 0, "toast": 0, "btree": 16, "hash": 16, "gin": 8, "gist": 16,
                "spgist": 8, "brin": 8, "sequence": 8, "generic": 0, "bloom": 0, "vm": 0}


def special_for(am: str) -> bytes:
    """A plausible special space: a hash bucket page, a regular BRIN page, zeros else."""
    special = bytearray(SPECIAL_SIZE[am])
    if am == "hash":
        struct.pack_into("<H", special, 12, 2)  # LH_BUCKET_PAGE
    if am == "brin":
        struct.pack_into("<H", special, 6, 0xF093)  # BRIN_PAGETYPE_REGULAR
    return bytes(special)


def build_page(items: list[bytes], *, special: bytes = b"", lsn: int = 0x1_0000_0028,
               checksum: int = 0, flags: int = 0, prune_xid: int = 0,
               lp_flags: int = m.LP_NORMAL) -> bytearray:
    """A standard page: header, one line pointer per item, items packed from the end
    (MAXALIGNed, garbage in the padding), then `special`."""
    page = bytearray(BLCKSZ)
    special_at = BLCKSZ - len(special)
    page[special_at:] = special
    upper = special_at
    for i, item in enumerate(items):
        size = (len(item) + 7) & ~7
        upper -= size
        page[upper:upper + size] = item + b"\xee" * (size - len(item))
        word = upper | (lp_flags << 15) | (len(item) << 17)
        struct.pack_into("<I", page, 24 + 4 * i, word)
    lower = 24 + 4 * len(items)
    # Garbage in the hole: PostgreSQL leaves old bytes there.
    page[lower:upper] = b"\xab" * (upper - lower)
    struct.pack_into("<IIHHHHHHI", page, 0, lsn >> 32, lsn & 0xFFFFFFFF, checksum, flags,
                     lower, upper, special_at, BLCKSZ | 4, prune_xid)
    return page


def heap_tuple(data: bytes, *, xmin: int = 1000, xmax: int = 0, cid: int = 7,
               ctid: tuple[int, int] = (0, 1), infomask: int = 0, infomask2: int = 1) -> bytes:
    hdr = struct.pack("<IIIHHHHHB", xmin, xmax, cid, ctid[0] >> 16, ctid[0] & 0xFFFF,
                      ctid[1], infomask2, infomask, 24)
    return hdr + b"\x00" + data


def masked(page: bytes | bytearray, am: str, *, keep: bool = False, blkno: int = 0) -> bytes:
    return m.mask_page(bytes(page), am, keep_gist_nsn=keep, blkno=blkno)


def set_u16(page: bytearray, at: int, value: int) -> bytearray:
    struct.pack_into("<H", page, at, value)
    return page


def same_after_mask(a: bytearray, b: bytearray, am: str, keep: bool = False) -> bool:
    return masked(a, am, keep=keep) == masked(b, am, keep=keep)


# --- bufmask.c helpers, through every kind -------------------------------------------

@pytest.mark.parametrize("am", sorted(m.ACCESS_METHODS))
def test_lsn_and_checksum_are_masked_for_every_kind(am: str) -> None:
    special = special_for(am)
    a = build_page([b"x" * 30], special=special, lsn=0x1_0000_0028, checksum=1)
    b = build_page([b"x" * 30], special=special, lsn=0x5_0000_1000, checksum=0xBEEF)
    assert a != b
    assert same_after_mask(a, b, am)


@pytest.mark.parametrize("am", sorted(m.ACCESS_METHODS - {"vm"}))
def test_item_content_change_is_never_masked(am: str) -> None:
    special = special_for(am)
    a = build_page([heap_tuple(b"hello world!")], special=special)
    b = build_page([heap_tuple(b"hello World!")], special=special)
    assert not same_after_mask(a, b, am)


@pytest.mark.parametrize("am", ["heap", "btree", "hash", "gist", "spgist", "gin"])
def test_page_hint_bits_are_masked(am: str) -> None:
    special = special_for(am)
    a = build_page([heap_tuple(b"y")], special=special)
    b = build_page([heap_tuple(b"y")], special=special, prune_xid=555,
                   flags=m.PD_ALL_VISIBLE | m.PD_PAGE_FULL | m.PD_HAS_FREE_LINES)
    assert same_after_mask(a, b, am)


@pytest.mark.parametrize("am", ["sequence", "generic", "bloom"])
def test_page_hint_bits_are_not_masked_where_postgres_compares_them(am: str) -> None:
    special = special_for(am)
    a = build_page([b"y" * 16], special=special)
    b = build_page([b"y" * 16], special=special, flags=m.PD_ALL_VISIBLE)
    assert not same_after_mask(a, b, am)
    assert "pd_flags" in m.diff_fields(masked(a, am), masked(b, am), am)


@pytest.mark.parametrize("am", ["heap", "btree", "hash", "gist", "spgist", "sequence",
                                "generic", "brin"])
def test_unused_space_is_masked(am: str) -> None:
    a = build_page([heap_tuple(b"z" * 16)], special=special_for(am))
    b = bytearray(a)
    lower, upper = m.pd_lower(b), m.pd_upper(b)
    b[lower:upper] = bytes(upper - lower)
    assert a != b
    assert same_after_mask(a, b, am)


def test_vm_bits_are_compared() -> None:
    """A VM page has pd_lower 24 and pd_upper 8192: its bitmap is the 'unused space'
    that heap_mask would blank; our 'vm' kind keeps it."""
    a = build_page([])
    a[24:] = bytes(BLCKSZ - 24)
    struct.pack_into("<HH", a, 12, 24, BLCKSZ)
    b = bytearray(a)
    b[24 + 100] = 0x03
    assert masked(a, "heap") == masked(b, "heap")  # what PostgreSQL's check would see
    assert masked(a, "vm") != masked(b, "vm")
    assert m.diff_fields(masked(a, "vm"), masked(b, "vm"), "vm") == ["bitmap[100:101]"]


def test_new_page_is_returned_unchanged() -> None:
    zero = bytes(BLCKSZ)
    for am in m.ACCESS_METHODS:
        assert masked(zero, am) == zero


def test_item_past_page_end_is_reported_not_grown() -> None:
    page = build_page([heap_tuple(b"abc")])
    struct.pack_into("<I", page, 24, (BLCKSZ - 20) | (m.LP_NORMAL << 15) | (27 << 17))
    with pytest.raises(CorruptionError, match="past the page end"):
        masked(page, "heap")


@pytest.mark.parametrize("am", ["btree", "hash", "gin", "gist", "brin"])
def test_special_space_too_small_is_reported(am: str) -> None:
    page = build_page([heap_tuple(b"abc")], special=bytes(4))  # pd_special = 8188
    with pytest.raises(CorruptionError, match="pd_special 8188"):
        masked(page, am)


def test_broken_header_is_reported() -> None:
    page = build_page([b"a" * 8])
    struct.pack_into("<H", page, 12, 9000)  # pd_lower past pd_upper
    with pytest.raises(CorruptionError, match="pd_lower 9000"):
        masked(page, "heap")


# --- heap_mask -----------------------------------------------------------------------

def test_heap_unfrozen_tuple_hint_bits_and_cid_are_masked() -> None:
    a = build_page([heap_tuple(b"row", cid=0)])
    b = build_page([heap_tuple(b"row", cid=5,
                               infomask=m.HEAP_XMIN_COMMITTED | m.HEAP_XMAX_INVALID)])
    assert same_after_mask(a, b, "heap")


def test_heap_frozen_tuple_keeps_xmin_bits_but_masks_xmax_hints() -> None:
    frozen = m.HEAP_XMIN_FROZEN
    a = build_page([heap_tuple(b"row", infomask=frozen)])
    b = build_page([heap_tuple(b"row", infomask=frozen | m.HEAP_XMAX_INVALID)])
    assert same_after_mask(a, b, "heap")
    c = build_page([heap_tuple(b"row", infomask=frozen | 0x2000)])  # HEAP_UPDATED
    assert not same_after_mask(a, c, "heap")
    assert m.diff_fields(masked(a, "heap"), masked(c, "heap"), "heap") == \
        ["tuple[1].t_infomask"]


@pytest.mark.parametrize("field,kwargs", [("t_xmin", {"xmin": 1001}), ("t_xmax", {"xmax": 9}),
                                          ("t_ctid", {"ctid": (0, 2)}),
                                          ("t_infomask2", {"infomask2": 2})])
def test_heap_tuple_header_changes_are_not_masked(field: str, kwargs: dict[str, Any]) -> None:
    a = build_page([heap_tuple(b"row")])
    b = build_page([heap_tuple(b"row", **kwargs)])
    assert m.diff_fields(masked(a, "heap"), masked(b, "heap"), "heap") == [f"tuple[1].{field}"]


def test_heap_speculative_ctid_is_masked_to_self() -> None:
    a = build_page([heap_tuple(b"row", ctid=(7, 1))])
    b = build_page([heap_tuple(b"row", ctid=(12345, m.SPEC_TOKEN_OFFSET_NUMBER))])
    assert masked(a, "heap", blkno=7) == masked(b, "heap", blkno=7)
    assert masked(a, "heap", blkno=8) != masked(b, "heap", blkno=8)


def test_heap_padding_after_tuple_is_masked_and_lp_flags_are_not() -> None:
    a = build_page([heap_tuple(b"abc")])  # 27 bytes: 5 bytes of padding
    b = bytearray(a)
    lp_off, _, lp_len = m.item_id(b, 1)
    b[lp_off + lp_len:lp_off + lp_len + 5] = bytes(5)
    assert same_after_mask(a, b, "heap")
    dead = build_page([heap_tuple(b"abc")], lp_flags=m.LP_DEAD)
    # Not LP_NORMAL any more, so heap_mask leaves its t_cid alone too.
    assert m.diff_fields(masked(a, "heap"), masked(dead, "heap"), "heap") == \
        ["lp[1]", "tuple[1].t_cid"]


# --- index kinds ---------------------------------------------------------------------

def bt_special(flags: int, cycleid: int = 0, nxt: int = 0) -> bytes:
    return struct.pack("<IIIHH", 0, nxt, 0, flags, cycleid)


def test_btree_leaf_masks_lp_flags_garbage_split_end_and_cycleid() -> None:
    a = build_page([b"k" * 16], special=bt_special(m.BTP_LEAF))
    b = build_page([b"k" * 16], lp_flags=m.LP_DEAD,
                   special=bt_special(m.BTP_LEAF | m.BTP_HAS_GARBAGE | m.BTP_SPLIT_END, 77))
    assert same_after_mask(a, b, "btree")


def test_btree_internal_lp_flags_and_links_are_compared() -> None:
    a = build_page([b"k" * 16], special=bt_special(0))
    b = build_page([b"k" * 16], special=bt_special(0), lp_flags=m.LP_DEAD)
    assert not same_after_mask(a, b, "btree")
    c = build_page([b"k" * 16], special=bt_special(0, nxt=5))
    assert m.diff_fields(masked(a, "btree"), masked(c, "btree"), "btree") == \
        ["special.btpo_next"]


def test_btree_deleted_page_content_is_compared_in_15() -> None:
    """PostgreSQL 15's btree_mask no longer blanks deleted pages."""
    a = build_page([b"k" * 16], special=bt_special(m.BTP_DELETED))
    b = build_page([b"K" * 16], special=bt_special(m.BTP_DELETED))
    assert not same_after_mask(a, b, "btree")


def hash_special(flag: int) -> bytes:
    return struct.pack("<IIIHH", 0, 0, 0, flag, 0xFF80)


def test_hash_masks() -> None:
    unused_a = build_page([b"q" * 8], special=hash_special(m.LH_UNUSED_PAGE))
    unused_b = build_page([b"Q" * 24], special=hash_special(m.LH_UNUSED_PAGE))
    assert same_after_mask(unused_a, unused_b, "hash")
    bucket = hash_special(m.LH_BUCKET_PAGE)
    a = build_page([b"q" * 8], special=bucket)
    b = build_page([b"q" * 8], lp_flags=m.LP_DEAD,
                   special=hash_special(m.LH_BUCKET_PAGE | m.LH_PAGE_HAS_DEAD_TUPLES))
    assert same_after_mask(a, b, "hash")
    meta_a = build_page([b"q" * 8], special=hash_special(m.LH_META_PAGE))
    meta_b = build_page([b"q" * 8], special=hash_special(m.LH_META_PAGE), lp_flags=m.LP_DEAD)
    assert not same_after_mask(meta_a, meta_b, "hash")


def test_gin_deleted_page_is_blanked_and_unused_space_needs_pd_lower() -> None:
    deleted = struct.pack("<IHH", 0, 0, m.GIN_DELETED)
    assert same_after_mask(build_page([b"g" * 8], special=deleted),
                           build_page([b"G" * 40], special=deleted), "gin")
    # pd_lower == 24 (e.g. a posting-list page that does not keep pd_lower): the hole
    # is compared.
    leaf = struct.pack("<IHH", 0, 0, 0)
    a = build_page([], special=leaf)
    b = bytearray(a)
    b[100] = 1
    assert not same_after_mask(a, b, "gin")
    c = build_page([b"g" * 8], special=leaf)
    d = bytearray(c)
    d[m.pd_lower(d) + 1] = 0
    assert same_after_mask(c, d, "gin")


def gist_special(nsn: int, flags: int) -> bytes:
    return struct.pack("<IIIHH", nsn >> 32, nsn & 0xFFFFFFFF, 0xFFFFFFFF, flags, 0xFF81)


def test_gist_nsn_and_follow_right_masked_only_without_keep() -> None:
    a = build_page([b"g" * 16], special=gist_special(0x1_0000_0100, 0))
    b = build_page([b"g" * 16], special=gist_special(0x2_0000_0100, m.F_FOLLOW_RIGHT))
    assert same_after_mask(a, b, "gist", keep=False)
    assert not same_after_mask(a, b, "gist", keep=True)
    assert m.diff_fields(masked(a, "gist", keep=True), masked(b, "gist", keep=True), "gist") \
        == ["special.nsn", "special.flags"]


def test_gist_leaf_lp_flags_and_garbage_are_masked() -> None:
    a = build_page([b"g" * 16], special=gist_special(5, m.F_LEAF))
    b = build_page([b"g" * 16], special=gist_special(5, m.F_LEAF | m.F_HAS_GARBAGE),
                   lp_flags=m.LP_DEAD)
    assert same_after_mask(a, b, "gist", keep=True)


def test_brin_evacuate_flag_masked_and_revmap_compared_whole() -> None:
    def brin_special(page_type: int, flags: int) -> bytes:
        return struct.pack("<HHHH", 0, 0, flags, page_type)

    a = build_page([b"b" * 8], special=brin_special(m.BRIN_PAGETYPE_REGULAR, 0))
    b = build_page([b"b" * 8], special=brin_special(m.BRIN_PAGETYPE_REGULAR,
                                                    m.BRIN_EVACUATE_PAGE))
    assert same_after_mask(a, b, "brin")
    revmap = brin_special(0xF092, 0)
    c = build_page([b"b" * 8], special=revmap)
    d = bytearray(c)
    d[m.pd_lower(d) + 3] = 0x11
    assert not same_after_mask(c, d, "brin")


def test_spgist_masks_unused_space_and_hints() -> None:
    spec = struct.pack("<HHHH", 0, 0, 0, 0xFF82)
    a = build_page([b"s" * 8], special=spec)
    b = build_page([b"s" * 8], special=spec, prune_xid=3, flags=m.PD_PAGE_FULL)
    b[m.pd_lower(b)] = 0
    assert same_after_mask(a, b, "spgist")


# --- diff_fields ---------------------------------------------------------------------

def test_diff_fields_names_header_lp_tuple_special_and_bytes() -> None:
    a = build_page([b"a" * 16, b"b" * 16], special=bt_special(m.BTP_LEAF))
    assert m.diff_fields(a, a, "btree") == []
    b = bytearray(a)
    struct.pack_into("<H", b, 18, 0x2005)  # pd_pagesize_version
    lp_off, _, _ = m.item_id(b, 2)
    b[lp_off + 3] ^= 0xFF
    b[BLCKSZ - 2] ^= 0x01  # btpo_cycleid
    assert m.diff_fields(a, b, "btree") == ["pd_pagesize_version", "tuple[2]",
                                            "special.btpo_cycleid"]
    assert m.diff_fields(a, b) == ["pd_pagesize_version", "tuple[2]", "special"]
    c = bytearray(a)
    c[m.pd_lower(c) + 4] = 0
    assert m.diff_fields(a, c) == ["unused space"]


def test_diff_fields_names_metapage_contents_not_line_pointers() -> None:
    meta_flags = {"btree": (12, m.BTP_META), "hash": (12, m.LH_META_PAGE),
                  "gin": (6, m.GIN_META), "spgist": (0, m.SPGIST_META)}
    for am, (at, flag) in meta_flags.items():
        special = bytearray(SPECIAL_SIZE[am])
        struct.pack_into("<H", special, at, flag)
        a = build_page([b"m" * 40], special=bytes(special))
        b = bytearray(a)
        b[24 + 6] ^= 0xFF
        assert m.content_label(a, am) == "meta", am
        assert m.diff_fields(a, b, am) == ["meta[6:7]"], am
    bitmap = build_page([], special=hash_special(m.LH_BITMAP_PAGE))
    assert m.content_label(bitmap, "hash") == "bitmap"
    assert m.content_label(build_page([], special=bt_special(m.BTP_LEAF)), "btree") is None
    assert m.content_label(build_page([]), None) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=200).map(heap_tuple), min_size=0, max_size=20),
       st.sampled_from(sorted(m.ACCESS_METHODS)), st.integers(0, 2**32 - 1))
def test_masking_is_idempotent_and_keeps_item_bodies(items: list[bytes], am: str,
                                                      xid: int) -> None:
    special = special_for(am)
    page = build_page(items, special=special, prune_xid=xid)
    once = masked(page, am)
    assert masked(once, am) == once
    # Bytes past a heap tuple's header are never masked; nor any item byte elsewhere
    # (no whole-content mask applies to these specials).
    for offnum, item in enumerate(items, start=1):
        lp_off, _, lp_len = m.item_id(page, offnum)
        skip = m.SIZE_OF_HEAP_TUPLE_HEADER if am in ("heap", "toast") else 0
        assert once[lp_off + skip:lp_off + lp_len] == item[skip:], (am, offnum)

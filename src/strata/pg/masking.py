"""Mask a relation page as PostgreSQL 15's consistency checking does, and name differences.

PostgreSQL compares a replayed page with the WAL's image only after both went
through the resource manager's `rm_mask` function, which blanks what may differ
legitimately (LSN, checksum, hint bits, unused space, ...). The golden page check
(`strata.compute.golden`) compares a compute's pages with the pageserver's the
same way. The helpers follow `bufmask.c` (MASK_MARKER is 0); the per-kind masks
follow heap_mask (heapam.c), btree_mask (nbtxlog.c), hash_mask (hash_xlog.c),
gin_mask (ginxlog.c), gist_mask (gistxlog.c), spg_mask (spgxlog.c), brin_mask
(brin_xlog.c), seq_mask (sequence.c) and generic_mask (generic_xlog.c) of
PostgreSQL 15; each was checked against the installed 15 server binary.

Layouts (bufpage.h, itemid.h, htup_details.h and each AM's special space):
PageHeaderData is 24 bytes (see `strata.pg.page`); an ItemIdData is a u32 with
lp_off in bits 0-14, lp_flags in bits 15-16, lp_len in bits 17-31; the line
pointer array starts at byte 24 and holds (pd_lower - 24) / 4 entries.

Two deliberate differences from PostgreSQL:
- `keep_gist_nsn=True` leaves the GiST NSN and F_FOLLOW_RIGHT unmasked (the golden
  check compares them, because Strata's pageserver sets them itself, D2).
- 'vm' pages: PostgreSQL checks a visibility-map block with the heap rmgr's
  mask, whose unused-space mask blanks the whole bitmap. We mask only pd_lsn and
  pd_checksum there, so that VM bits are compared.
An all-zero (new) page is returned unchanged: PostgreSQL never masks one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from strata.common.errors import CorruptionError
from strata.pg.constants import BLCKSZ, MAXIMUM_ALIGNOF

MASK_MARKER = 0  # bufmask.h
SIZE_OF_PAGE_HEADER = 24

# bufpage.h pd_flags
PD_HAS_FREE_LINES = 0x0001
PD_PAGE_FULL = 0x0002
PD_ALL_VISIBLE = 0x0004

# itemid.h lp_flags
LP_UNUSED = 0
LP_NORMAL = 1
LP_REDIRECT = 2
LP_DEAD = 3
_LP_FLAGS_BITS = 0x3 << 15

# htup_details.h t_infomask
HEAP_XMIN_COMMITTED = 0x0100
HEAP_XMIN_INVALID = 0x0200
HEAP_XMIN_FROZEN = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID
HEAP_XMAX_COMMITTED = 0x0400
HEAP_XMAX_INVALID = 0x0800
HEAP_XACT_MASK = 0xFFF0
SPEC_TOKEN_OFFSET_NUMBER = 0xFFFE  # itemptr.h SpecTokenOffsetNumber

# HeapTupleHeaderData field offsets (htup_details.h)
T_XMIN, T_XMAX, T_CID, T_CTID, T_INFOMASK2, T_INFOMASK, T_HOFF = 0, 4, 8, 12, 18, 20, 22
SIZE_OF_HEAP_TUPLE_HEADER = 23

# nbtree.h BTPageOpaqueData: btpo_prev u32 @0, btpo_next @4, btpo_level @8,
# btpo_flags u16 @12, btpo_cycleid u16 @14
BTP_LEAF = 1 << 0
BTP_DELETED = 1 << 2
BTP_META = 1 << 3
BTP_SPLIT_END = 1 << 5
BTP_HAS_GARBAGE = 1 << 6

# hash.h HashPageOpaqueData: hasho_prevblkno @0, hasho_nextblkno @4, hasho_bucket @8,
# hasho_flag u16 @12, hasho_page_id u16 @14
LH_UNUSED_PAGE = 0
LH_OVERFLOW_PAGE = 1 << 0
LH_BUCKET_PAGE = 1 << 1
LH_BITMAP_PAGE = 1 << 2
LH_META_PAGE = 1 << 3
LH_PAGE_HAS_DEAD_TUPLES = 1 << 7
LH_PAGE_TYPE = LH_OVERFLOW_PAGE | LH_BUCKET_PAGE | LH_BITMAP_PAGE | LH_META_PAGE

# gin_private.h GinPageOpaqueData: rightlink u32 @0, maxoff u16 @4, flags u16 @6
GIN_DATA = 1 << 0
GIN_DELETED = 1 << 2
GIN_META = 1 << 3

# gist.h GISTPageOpaqueData: nsn u64 (xlogid, xrecoff) @0, rightlink u32 @8,
# flags u16 @12, gist_page_id u16 @14
F_LEAF = 1 << 0
F_FOLLOW_RIGHT = 1 << 3
F_HAS_GARBAGE = 1 << 4

# spgist_private.h SpGistPageOpaqueData: flags u16 @0, nRedirection @2, nPlaceholder @4,
# spgist_page_id @6
SPGIST_META = 1 << 0

# brin_page.h BrinSpecialSpace: uint16 vector[4]; flags = vector[2] @4, type = vector[3] @6
BRIN_PAGETYPE_META = 0xF091
BRIN_PAGETYPE_REVMAP = 0xF092
BRIN_PAGETYPE_REGULAR = 0xF093
BRIN_EVACUATE_PAGE = 1 << 0

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

Page = bytearray


def _u16(page: Page | bytes, offset: int) -> int:
    return int(_U16.unpack_from(page, offset)[0])


def _set_u16(page: Page, offset: int, value: int) -> None:
    _U16.pack_into(page, offset, value)


def _u32(page: Page | bytes, offset: int) -> int:
    return int(_U32.unpack_from(page, offset)[0])


def _maxalign(n: int) -> int:
    return (n + MAXIMUM_ALIGNOF - 1) & ~(MAXIMUM_ALIGNOF - 1)


def pd_lower(page: Page | bytes) -> int:
    return _u16(page, 12)


def pd_upper(page: Page | bytes) -> int:
    return _u16(page, 14)


def pd_special(page: Page | bytes) -> int:
    return _u16(page, 16)


def _special_at(page: Page, size: int, kind: str) -> int:
    """PageGetSpecialPointer, checked: the special space must hold the AM's opaque data."""
    special = pd_special(page)
    if not SIZE_OF_PAGE_HEADER <= special <= BLCKSZ - size:
        raise CorruptionError(f"{kind} page has pd_special {special}, which leaves no room "
                              f"for its {size}-byte special space")
    return special


def max_offset(page: Page | bytes) -> int:
    """PageGetMaxOffsetNumber: line pointers in use by the array (0 if pd_lower <= 24)."""
    lower = pd_lower(page)
    return 0 if lower <= SIZE_OF_PAGE_HEADER else (lower - SIZE_OF_PAGE_HEADER) // 4


def item_id(page: Page | bytes, offnum: int) -> tuple[int, int, int]:
    """(lp_off, lp_flags, lp_len) of line pointer `offnum` (1-based)."""
    word = _u32(page, SIZE_OF_PAGE_HEADER + 4 * (offnum - 1))
    return word & 0x7FFF, (word >> 15) & 0x3, word >> 17


# --- bufmask.c --------------------------------------------------------------------

def mask_lsn_and_checksum(page: Page) -> None:
    """mask_page_lsn_and_checksum: pd_lsn and pd_checksum are stale in every WAL image."""
    page[0:8] = bytes(8)
    _set_u16(page, 8, MASK_MARKER)


def mask_hint_bits(page: Page) -> None:
    """mask_page_hint_bits: pd_prune_xid and the PD_PAGE_FULL, PD_HAS_FREE_LINES and
    PD_ALL_VISIBLE flags change without WAL."""
    _U32.pack_into(page, 20, MASK_MARKER)
    flags = _u16(page, 10)
    _set_u16(page, 10, flags & ~(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE))


def mask_unused_space(page: Page) -> None:
    """mask_unused_space: blank [pd_lower, pd_upper). PostgreSQL raises an ERROR on a
    header whose pointers are out of order; so do we."""
    lower, upper, special = pd_lower(page), pd_upper(page), pd_special(page)
    if lower > upper or special < upper or lower < SIZE_OF_PAGE_HEADER or special > BLCKSZ:
        raise CorruptionError(f"invalid page header, cannot mask unused space: pd_lower {lower} "
                              f"pd_upper {upper} pd_special {special}")
    page[lower:upper] = bytes(upper - lower)


def mask_lp_flags(page: Page) -> None:
    """mask_lp_flags: index AMs set LP_DEAD on line pointers without WAL; every used
    line pointer's flags become LP_UNUSED."""
    for offnum in range(1, max_offset(page) + 1):
        at = SIZE_OF_PAGE_HEADER + 4 * (offnum - 1)
        word = _u32(page, at)
        if word & _LP_FLAGS_BITS:
            _U32.pack_into(page, at, word & ~_LP_FLAGS_BITS)


def mask_content(page: Page) -> None:
    """mask_page_content: blank everything after the header, and pd_lower/pd_upper."""
    page[SIZE_OF_PAGE_HEADER:BLCKSZ] = bytes(BLCKSZ - SIZE_OF_PAGE_HEADER)
    _set_u16(page, 12, MASK_MARKER)
    _set_u16(page, 14, MASK_MARKER)


# --- the resource managers' masks ---------------------------------------------------

def heap_mask(page: Page, blkno: int) -> None:
    """heap_mask (heapam.c); also used for TOAST relations."""
    mask_lsn_and_checksum(page)
    mask_hint_bits(page)
    mask_unused_space(page)
    offnum = 1
    while offnum <= max_offset(page):
        lp_off, lp_flags, lp_len = item_id(page, offnum)
        if lp_flags == LP_NORMAL:
            if lp_off + SIZE_OF_HEAP_TUPLE_HEADER > BLCKSZ:
                raise CorruptionError(f"heap line pointer {offnum} points past the page end "
                                      f"(lp_off {lp_off}, lp_len {lp_len})")
            _mask_heap_tuple(page, lp_off, blkno, offnum)
        if lp_len != 0:
            # Padding after a tuple whose length is not MAXALIGNed is never WAL-logged.
            end = lp_off + _maxalign(lp_len)
            if end > BLCKSZ:
                raise CorruptionError(f"heap line pointer {offnum} points past the page end "
                                      f"(lp_off {lp_off}, lp_len {lp_len})")
            page[lp_off + lp_len:end] = bytes(end - lp_off - lp_len)
        offnum += 1


def _mask_heap_tuple(page: Page, at: int, blkno: int, offnum: int) -> None:
    infomask = _u16(page, at + T_INFOMASK)
    if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN:
        # Commit hint bits of an unfrozen tuple are set without WAL.
        infomask &= ~HEAP_XACT_MASK
    else:
        infomask &= ~(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED)
    _set_u16(page, at + T_INFOMASK, infomask)
    # Redo sets the command id to FirstCommandId.
    _U32.pack_into(page, at + T_CID, MASK_MARKER)
    if _u16(page, at + T_CTID + 4) == SPEC_TOKEN_OFFSET_NUMBER:
        # A speculative insertion's ctid holds a per-backend token that is never logged.
        struct.pack_into("<HHH", page, at + T_CTID, blkno >> 16, blkno & 0xFFFF, offnum)


def btree_mask(page: Page) -> None:
    """btree_mask (nbtxlog.c, 15: deleted pages are no longer blanked)."""
    mask_lsn_and_checksum(page)
    mask_hint_bits(page)
    mask_unused_space(page)
    opaque = _special_at(page, 16, "btree")
    flags = _u16(page, opaque + 12)
    if flags & BTP_LEAF:
        mask_lp_flags(page)
    # BTP_HAS_GARBAGE is an unlogged hint; redo of a split neither sets
    # BTP_SPLIT_END nor keeps the vacuum cycle id.
    _set_u16(page, opaque + 12, flags & ~(BTP_HAS_GARBAGE | BTP_SPLIT_END))
    _set_u16(page, opaque + 14, 0)


def hash_mask(page: Page) -> None:
    """hash_mask (hash_xlog.c)."""
    mask_lsn_and_checksum(page)
    mask_hint_bits(page)
    mask_unused_space(page)
    opaque = _special_at(page, 16, "hash")
    page_type = _u16(page, opaque + 12) & LH_PAGE_TYPE
    if page_type == LH_UNUSED_PAGE:
        mask_content(page)
    elif page_type in (LH_BUCKET_PAGE, LH_OVERFLOW_PAGE):
        mask_lp_flags(page)
    _set_u16(page, opaque + 12, _u16(page, opaque + 12) & ~LH_PAGE_HAS_DEAD_TUPLES)


def gin_mask(page: Page) -> None:
    """gin_mask (ginxlog.c): the metapage and some others do not keep pd_lower."""
    mask_lsn_and_checksum(page)
    opaque = _special_at(page, 8, "gin")
    mask_hint_bits(page)
    if _u16(page, opaque + 6) & GIN_DELETED:
        mask_content(page)
    elif pd_lower(page) > SIZE_OF_PAGE_HEADER:
        mask_unused_space(page)


def gist_mask(page: Page, *, keep_nsn: bool) -> None:
    """gist_mask (gistxlog.c). With `keep_nsn`, NSN and F_FOLLOW_RIGHT stay as they are."""
    mask_lsn_and_checksum(page)
    mask_hint_bits(page)
    mask_unused_space(page)
    opaque = _special_at(page, 16, "gist")
    if not keep_nsn:
        # The NSN and F_FOLLOW_RIGHT of a split's left child change after the
        # record is inserted (gistplacetopage); PostgreSQL masks both.
        page[opaque:opaque + 8] = bytes(8)
        _set_u16(page, opaque + 12, _u16(page, opaque + 12) | F_FOLLOW_RIGHT)
    if _u16(page, opaque + 12) & F_LEAF:
        mask_lp_flags(page)
    _set_u16(page, opaque + 12, _u16(page, opaque + 12) & ~F_HAS_GARBAGE)


def spg_mask(page: Page) -> None:
    """spg_mask (spgxlog.c)."""
    mask_lsn_and_checksum(page)
    mask_hint_bits(page)
    if pd_lower(page) >= SIZE_OF_PAGE_HEADER:
        mask_unused_space(page)


def brin_mask(page: Page) -> None:
    """brin_mask (brin_xlog.c): BRIN_EVACUATE_PAGE is never WAL-logged."""
    mask_lsn_and_checksum(page)
    mask_hint_bits(page)
    opaque = _special_at(page, 8, "brin")
    page_type = _u16(page, opaque + 6)
    if page_type == BRIN_PAGETYPE_REGULAR or (
            page_type == BRIN_PAGETYPE_META and pd_lower(page) > SIZE_OF_PAGE_HEADER):
        mask_unused_space(page)
    _set_u16(page, opaque + 4, _u16(page, opaque + 4) & ~BRIN_EVACUATE_PAGE)


def seq_mask(page: Page) -> None:
    """seq_mask (sequence.c). The tuple itself is compared (and is logged ahead)."""
    mask_lsn_and_checksum(page)
    mask_unused_space(page)


def generic_mask(page: Page) -> None:
    """generic_mask (generic_xlog.c), used by bloom and other generic-WAL AMs."""
    mask_lsn_and_checksum(page)
    mask_unused_space(page)


def vm_mask(page: Page) -> None:
    """Visibility-map page: only pd_lsn and pd_checksum (see the module docstring)."""
    mask_lsn_and_checksum(page)


_MASKS: dict[str, Callable[[Page, int, bool], None]] = {
    "heap": lambda p, blkno, keep: heap_mask(p, blkno),
    "toast": lambda p, blkno, keep: heap_mask(p, blkno),
    "btree": lambda p, blkno, keep: btree_mask(p),
    "hash": lambda p, blkno, keep: hash_mask(p),
    "gin": lambda p, blkno, keep: gin_mask(p),
    "gist": lambda p, blkno, keep: gist_mask(p, keep_nsn=keep),
    "spgist": lambda p, blkno, keep: spg_mask(p),
    "brin": lambda p, blkno, keep: brin_mask(p),
    "sequence": lambda p, blkno, keep: seq_mask(p),
    "generic": lambda p, blkno, keep: generic_mask(p),
    "bloom": lambda p, blkno, keep: generic_mask(p),
    "vm": lambda p, blkno, keep: vm_mask(p),
}

ACCESS_METHODS = frozenset(_MASKS)


def is_new(page: bytes | bytearray) -> bool:
    """PageIsNew: pd_upper == 0 (a page PostgreSQL extended but never initialized)."""
    return pd_upper(page) == 0


def mask_page(page: bytes, am: str, *, keep_gist_nsn: bool, blkno: int = 0) -> bytes:
    """A masked copy of `page` for relation kind `am` (see ACCESS_METHODS).

    `blkno` is the block's number (heap_mask puts it in a speculative tuple's ctid).
    Raises CorruptionError if the header is too broken to mask (as PostgreSQL's
    mask_unused_space does); an unknown `am` is the caller's bug (assert).
    """
    assert len(page) == BLCKSZ, len(page)
    assert am in _MASKS, (am, sorted(_MASKS))
    if is_new(page):
        return bytes(page)
    buf = bytearray(page)
    _MASKS[am](buf, blkno, keep_gist_nsn)
    assert len(buf) == BLCKSZ, (am, len(buf))
    return bytes(buf)


# --- naming differences -------------------------------------------------------------

_HEADER_FIELDS = (("pd_lsn", 0, 8), ("pd_checksum", 8, 2), ("pd_flags", 10, 2),
                  ("pd_lower", 12, 2), ("pd_upper", 14, 2), ("pd_special", 16, 2),
                  ("pd_pagesize_version", 18, 2), ("pd_prune_xid", 20, 4))

_HEAP_TUPLE_FIELDS = (("t_xmin", T_XMIN, 4), ("t_xmax", T_XMAX, 4), ("t_cid", T_CID, 4),
                      ("t_ctid", T_CTID, 6), ("t_infomask2", T_INFOMASK2, 2),
                      ("t_infomask", T_INFOMASK, 2), ("t_hoff", T_HOFF, 1))

# Special-space fields of each kind: (name, offset, size).
_SPECIAL_FIELDS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "btree": (("btpo_prev", 0, 4), ("btpo_next", 4, 4), ("btpo_level", 8, 4),
              ("btpo_flags", 12, 2), ("btpo_cycleid", 14, 2)),
    "hash": (("hasho_prevblkno", 0, 4), ("hasho_nextblkno", 4, 4), ("hasho_bucket", 8, 4),
             ("hasho_flag", 12, 2), ("hasho_page_id", 14, 2)),
    "gin": (("rightlink", 0, 4), ("maxoff", 4, 2), ("flags", 6, 2)),
    "gist": (("nsn", 0, 8), ("rightlink", 8, 4), ("flags", 12, 2), ("gist_page_id", 14, 2)),
    "spgist": (("flags", 0, 2), ("nRedirection", 2, 2), ("nPlaceholder", 4, 2),
               ("spgist_page_id", 6, 2)),
    "brin": (("vector[0]", 0, 2), ("vector[1]", 2, 2), ("flags", 4, 2), ("type", 6, 2)),
    "sequence": (("magic", 0, 4),),
}


def diff_fields(a: bytes | bytearray, b: bytes | bytearray,
                am: str | None = None) -> list[str]:
    """Name the parts of two pages that differ, e.g. ['pd_flags', 'lp[3]',
    'tuple[3].t_infomask', 'special.btpo_flags', 'unused space'].

    Header fields come first, then line pointers, then items (laid out as in
    `a`; for heap kinds with tuple header fields), then the special space
    (with field names when `am` is known), then anything else as byte ranges.
    Pages are usually masked first (`mask_page`).
    """
    assert len(a) == BLCKSZ and len(b) == BLCKSZ, (len(a), len(b))
    if a == b:
        return []
    names: list[str] = []
    covered = bytearray(BLCKSZ)  # 1 where a named field already accounts for a byte

    def claim(name: str, start: int, end: int) -> None:
        end = min(end, BLCKSZ)
        if start >= end:
            return
        if any(a[i] != b[i] and not covered[i] for i in range(start, end)):
            names.append(name)
        covered[start:end] = b"\x01" * (end - start)

    for name, at, size in _HEADER_FIELDS:
        claim(name, at, at + size)
    if is_new(a) and is_new(b):
        _name_byte_ranges(a, b, covered, names)
        return names
    label = content_label(a, am)
    if label is not None:
        # Contents that are not line pointers and items (a metapage, a bitmap ...): name
        # byte ranges relative to the start of the contents, then the special space.
        special = pd_special(a) if SIZE_OF_PAGE_HEADER <= pd_special(a) <= BLCKSZ else BLCKSZ
        _name_byte_ranges(a, b, covered, names, label, SIZE_OF_PAGE_HEADER, special)
        for name, at, size in _SPECIAL_FIELDS.get(am or "", ()):
            claim(f"special.{name}", special + at, special + at + size)
        claim("special", special, BLCKSZ)
        return names
    nitems = max(max_offset(a), max_offset(b))
    lp_end = SIZE_OF_PAGE_HEADER + 4 * min(nitems, (BLCKSZ - SIZE_OF_PAGE_HEADER) // 4)
    for offnum in range(1, (lp_end - SIZE_OF_PAGE_HEADER) // 4 + 1):
        at = SIZE_OF_PAGE_HEADER + 4 * (offnum - 1)
        claim(f"lp[{offnum}]", at, at + 4)
    special = pd_special(a)
    if SIZE_OF_PAGE_HEADER <= special <= BLCKSZ:
        for offnum in range(1, (lp_end - SIZE_OF_PAGE_HEADER) // 4 + 1):
            _claim_item(a, b, offnum, am, lp_end, special, claim)
        for name, at, size in _SPECIAL_FIELDS.get(am or "", ()):
            claim(f"special.{name}", special + at, special + at + size)
        claim("special", special, BLCKSZ)
        lower, upper = pd_lower(a), pd_upper(a)
        if lp_end <= lower <= upper <= special:
            claim("unused space", lower, upper)
    _name_byte_ranges(a, b, covered, names)
    return names


def content_label(page: bytes | bytearray, am: str | None) -> str | None:
    """What a page holds after its header when that is not line pointers and items:
    'bitmap' (VM, hash bitmap), 'meta' (metapages), 'posting data' (GIN data pages),
    'revmap' (BRIN); None for ordinary pages."""
    if am == "vm":
        return "bitmap"
    special = pd_special(page)
    # Where each kind keeps its page-type flags in the special space.
    flags_at = {"btree": 12, "hash": 12, "gin": 6, "spgist": 0, "brin": 6}.get(am or "")
    if flags_at is None or not SIZE_OF_PAGE_HEADER <= special <= BLCKSZ - flags_at - 2:
        return None
    flags = _u16(page, special + flags_at)
    if am == "brin":
        return {BRIN_PAGETYPE_META: "meta", BRIN_PAGETYPE_REVMAP: "revmap"}.get(flags)
    labels = {
        "btree": ((BTP_META, "meta"),),
        "hash": ((LH_META_PAGE, "meta"), (LH_BITMAP_PAGE, "bitmap")),
        "gin": ((GIN_META, "meta"), (GIN_DATA, "posting data")),
        "spgist": ((SPGIST_META, "meta"),),
    }
    for bit, label in labels[am or ""]:
        if flags & bit:
            return label
    return None


def _claim_item(a: bytes | bytearray, b: bytes | bytearray, offnum: int, am: str | None,
                lp_end: int, special: int, claim: Callable[[str, int, int], None]) -> None:
    if SIZE_OF_PAGE_HEADER + 4 * offnum > pd_lower(a):
        return
    lp_off, _flags, lp_len = item_id(a, offnum)
    if lp_len == 0 or lp_off < lp_end or lp_off + lp_len > special:
        return
    end = lp_off + _maxalign(lp_len)
    if am in ("heap", "toast") and lp_len >= SIZE_OF_HEAP_TUPLE_HEADER:
        for name, at, size in _HEAP_TUPLE_FIELDS:
            claim(f"tuple[{offnum}].{name}", lp_off + at, lp_off + at + size)
        claim(f"tuple[{offnum}].data", lp_off + SIZE_OF_HEAP_TUPLE_HEADER, end)
    else:
        claim(f"tuple[{offnum}]", lp_off, end)


def _name_byte_ranges(a: bytes | bytearray, b: bytes | bytearray, covered: bytearray,
                      names: list[str], label: str = "bytes", base: int = 0,
                      end: int = BLCKSZ) -> None:
    start = -1
    for i in range(base, end + 1):
        odd = i < end and not covered[i] and a[i] != b[i]
        if odd and start < 0:
            start = i
        elif not odd and start >= 0:
            names.append(f"{label}[{start - base}:{i - base}]")
            covered[start:i] = b"\x01" * (i - start)
            start = -1

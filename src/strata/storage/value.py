"""Stored values: images and deltas, their byte encoding, and reconstruction of a key's value.

A value is an *image* (complete; a reconstruction chain stops there) or a *delta*
applied on top of the newest image below it, oldest first. With no image the base
is BLCKSZ zero bytes (a page PostgreSQL extended without WAL reads as zeros, D5).

    Image(data)        a complete value: a page, a size, a file's content
    WalImage(...)      a page image exactly as the WAL carries it (maybe compressed,
                       with a hole), so ingest never decompresses. Materialized on
                       read: restore_block_image, then pd_lsn = page_lsn, and with
                       gist_fixup also the GiST NSN = page_lsn and F_FOLLOW_RIGHT
                       cleared (postgres15.md sec 1, gist.c gistplacetopage).
    Patch(ops)         byte edits on the base: PatchOp(offset, clear_mask, set_mask)
                       sets b = (b & ~clear_mask) | set_mask; PatchWrite(offset, data)
                       overwrites bytes.
    Tombstone()        the key does not exist from this LSN on.

GiST page opaque layout (gist.h GISTPageOpaqueData, at pd_special): `nsn`
PageXLogRecPtr (two u32 halves, xlogid then xrecoff, each native little-endian,
exactly like pd_lsn; NOT one little-endian u64) @+0, `rightlink` u32 @+8,
`flags` u16 @+12, `gist_page_id` u16 @+14 (the rightlink comes first, so the flags are
at +12, not +8).

Encoding (little-endian; first byte is the tag, 0 is never valid):

    0x01 Image       tag, data
    0x02 WalImage    tag, bimg_info u8, hole_offset u16, hole_length u16,
                     gist_fixup u8, page_lsn u64, data
    0x03 Patch       tag, op count u32, then per op:
                       0x00 PatchOp     offset u32, clear_mask u8, set_mask u8
                       0x01 PatchWrite  offset u32, length u32, data
    0x04 Tombstone   tag
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from strata.common.errors import CorruptionError
from strata.pg.bkpimage import restore_block_image
from strata.pg.constants import BLCKSZ
from strata.pg.page import set_page_lsn

TAG_IMAGE = 0x01
TAG_WAL_IMAGE = 0x02
TAG_PATCH = 0x03
TAG_TOMBSTONE = 0x04
IMAGE_TAGS = frozenset((TAG_IMAGE, TAG_WAL_IMAGE, TAG_TOMBSTONE))

_OP_BITS = 0x00
_OP_WRITE = 0x01

_WAL_IMAGE_HDR = struct.Struct("<BBHHBQ")
_U32 = struct.Struct("<I")
_BITS = struct.Struct("<BIBB")
_WRITE = struct.Struct("<BII")

_PD_SPECIAL = struct.Struct("<H")
_PD_SPECIAL_OFFSET = 16  # bufpage.h PageHeaderData.pd_special
_GIST_NSN = struct.Struct("<II")  # PageXLogRecPtr: xlogid, xrecoff
_GIST_FLAGS = struct.Struct("<H")
GIST_FLAGS_OFFSET = 12  # nsn (8) + rightlink (4), gist.h GISTPageOpaqueData
GIST_OPAQUE_SIZE = 16
F_FOLLOW_RIGHT = 0x08  # gist.h (1 << 3)


@dataclass(frozen=True, slots=True)
class Image:
    """A complete value."""

    data: bytes
    is_image: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class WalImage:
    """A page image in its WAL form (XLogRecordBlockImageHeader fields + stored bytes)."""

    bimg_info: int
    hole_offset: int
    hole_length: int
    data: bytes
    page_lsn: int
    gist_fixup: bool
    is_image: ClassVar[bool] = True

    def materialize(self) -> bytes:
        """The 8 KB page as of `page_lsn`."""
        page = bytearray(restore_block_image(self.bimg_info, self.hole_offset,
                                             self.hole_length, self.data))
        set_page_lsn(page, self.page_lsn)
        if self.gist_fixup:
            _gist_fixup(page, self.page_lsn)
        return bytes(page)


def _gist_fixup(page: bytearray, lsn: int) -> None:
    """Apply what gistplacetopage does after XLogInsert: NSN = lsn, clear F_FOLLOW_RIGHT."""
    (special,) = _PD_SPECIAL.unpack_from(page, _PD_SPECIAL_OFFSET)
    if special + GIST_OPAQUE_SIZE > len(page):
        raise CorruptionError(f"GiST fix-up at {lsn:X}: pd_special {special} leaves no room "
                              f"for the {GIST_OPAQUE_SIZE}-byte GiST opaque area")
    _GIST_NSN.pack_into(page, special, lsn >> 32, lsn & 0xFFFFFFFF)
    (flags,) = _GIST_FLAGS.unpack_from(page, special + GIST_FLAGS_OFFSET)
    _GIST_FLAGS.pack_into(page, special + GIST_FLAGS_OFFSET, flags & ~F_FOLLOW_RIGHT)


@dataclass(frozen=True, slots=True)
class PatchOp:
    """Set one byte to (b & ~clear_mask) | set_mask."""

    offset: int
    clear_mask: int
    set_mask: int

    def __post_init__(self) -> None:
        assert 0 <= self.offset <= 0xFFFFFFFF, self
        assert 0 <= self.clear_mask <= 0xFF, self
        assert 0 <= self.set_mask <= 0xFF, self


@dataclass(frozen=True, slots=True)
class PatchWrite:
    """Overwrite bytes at offset."""

    offset: int
    data: bytes

    def __post_init__(self) -> None:
        assert 0 <= self.offset <= 0xFFFFFFFF, self


@dataclass(frozen=True, slots=True)
class Patch:
    """A delta: byte operations applied in order to the base."""

    ops: tuple[PatchOp | PatchWrite, ...]
    is_image: ClassVar[bool] = False

    def apply(self, base: bytearray) -> None:
        for op in self.ops:
            if isinstance(op, PatchOp):
                if op.offset >= len(base):
                    raise CorruptionError(f"patch op at offset {op.offset} is beyond the "
                                          f"{len(base)}-byte value it applies to")
                base[op.offset] = (base[op.offset] & ~op.clear_mask & 0xFF) | op.set_mask
            else:
                if op.offset + len(op.data) > len(base):
                    raise CorruptionError(f"patch write at {op.offset}+{len(op.data)} is "
                                          f"beyond the {len(base)}-byte value it applies to")
                base[op.offset:op.offset + len(op.data)] = op.data


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The key does not exist from this LSN on."""

    is_image: ClassVar[bool] = True


Value = Image | WalImage | Patch | Tombstone


_IMAGE_TAG = bytes((TAG_IMAGE,))
_PATCH_TAG = bytes((TAG_PATCH,))


def encode_image(data: bytes) -> bytes:
    """`encode_value(Image(data))` without making the Image."""
    return _IMAGE_TAG + data


def encode_bits_patch(ops: Sequence[tuple[int, int, int]]) -> bytes:
    """`encode_value(Patch(tuple(PatchOp(*op) for op in ops)))` without making the
    objects: ingest's VM clears (`ops` are (offset, clear_mask, set_mask))."""
    parts = [_PATCH_TAG, _U32.pack(len(ops))]
    for offset, clear_mask, set_mask in ops:
        assert 0 <= offset <= 0xFFFFFFFF, offset
        parts.append(_BITS.pack(_OP_BITS, offset, clear_mask, set_mask))
    return b"".join(parts)


def encode_value(v: Value) -> bytes:
    if isinstance(v, Image):
        return _IMAGE_TAG + v.data
    if isinstance(v, WalImage):
        return encode_wal_image(v.bimg_info, v.hole_offset, v.hole_length, v.data, v.page_lsn,
                                v.gist_fixup)
    if isinstance(v, Patch):
        parts = [_PATCH_TAG, _U32.pack(len(v.ops))]
        for op in v.ops:
            if isinstance(op, PatchOp):
                parts.append(_BITS.pack(_OP_BITS, op.offset, op.clear_mask, op.set_mask))
            else:
                parts.append(_WRITE.pack(_OP_WRITE, op.offset, len(op.data)))
                parts.append(op.data)
        return b"".join(parts)
    assert isinstance(v, Tombstone), v
    return bytes((TAG_TOMBSTONE,))


def encode_wal_image(bimg_info: int, hole_offset: int, hole_length: int, data: bytes,
                     page_lsn: int, gist_fixup: bool) -> bytes:
    """`encode_value(WalImage(...))` without making the WalImage."""
    return wal_image_header(bimg_info, hole_offset, hole_length, page_lsn, gist_fixup) + data


def wal_image_header(bimg_info: int, hole_offset: int, hole_length: int, page_lsn: int,
                     gist_fixup: bool) -> bytes:
    """The encoding of a `WalImage` up to its data (`encode_wal_image` is this + data):
    ingest's hot path (one per block reference of every record) stores the two parts
    without joining them."""
    return _WAL_IMAGE_HDR.pack(TAG_WAL_IMAGE, bimg_info, hole_offset, hole_length,
                               1 if gist_fixup else 0, page_lsn)


def is_image_bytes(b: bytes | bytearray | memoryview) -> bool:
    """Whether an encoded value is an image (ends a reconstruction chain), from its tag."""
    return len(b) > 0 and b[0] in IMAGE_TAGS


def decode_value(b: bytes | bytearray | memoryview) -> Value:
    """Decode one value; malformed bytes raise CorruptionError."""
    data = bytes(b)
    try:
        return _decode(data)
    except (struct.error, IndexError) as err:
        raise CorruptionError(f"malformed stored value ({len(data)} bytes, tag "
                              f"{data[:1].hex() or 'none'}): {err}") from err


def _decode(data: bytes) -> Value:
    tag = data[0]
    if tag == TAG_IMAGE:
        return Image(data[1:])
    if tag == TAG_WAL_IMAGE:
        _, info, hole_offset, hole_length, fixup, page_lsn = _WAL_IMAGE_HDR.unpack_from(data)
        if fixup > 1:
            raise CorruptionError(f"WalImage gist_fixup byte is {fixup}, expected 0 or 1")
        return WalImage(info, hole_offset, hole_length, data[_WAL_IMAGE_HDR.size:], page_lsn,
                        bool(fixup))
    if tag == TAG_PATCH:
        return Patch(_decode_ops(data))
    if tag == TAG_TOMBSTONE and len(data) == 1:
        return Tombstone()
    raise CorruptionError(f"unknown stored value tag {tag:#x} ({len(data)} bytes)")


def _decode_ops(data: bytes) -> tuple[PatchOp | PatchWrite, ...]:
    (count,) = _U32.unpack_from(data, 1)
    pos = 5
    ops: list[PatchOp | PatchWrite] = []
    for _ in range(count):
        kind = data[pos]
        if kind == _OP_BITS:
            _, offset, clear_mask, set_mask = _BITS.unpack_from(data, pos)
            ops.append(PatchOp(offset, clear_mask, set_mask))
            pos += _BITS.size
        elif kind == _OP_WRITE:
            _, offset, length = _WRITE.unpack_from(data, pos)
            pos += _WRITE.size
            if pos + length > len(data):
                raise CorruptionError(f"patch write of {length} bytes runs past the value end")
            ops.append(PatchWrite(offset, data[pos:pos + length]))
            pos += length
        else:
            raise CorruptionError(f"unknown patch op kind {kind:#x} at byte {pos}")
    if pos != len(data):
        raise CorruptionError(f"patch has {len(data) - pos} trailing bytes after {count} ops")
    return tuple(ops)


def materialize_image(v: Image | WalImage) -> bytes:
    return v.data if isinstance(v, Image) else v.materialize()


def reconstruct(versions: list[Value], base_size: int = BLCKSZ) -> bytes | None:
    """The value after applying `versions` (oldest first).

    Starts from the newest image in the list (earlier versions are irrelevant);
    with no image the base is `base_size` zero bytes. Returns None when the newest
    image is a Tombstone and no delta follows it.
    """
    start = 0
    for i in range(len(versions) - 1, -1, -1):
        if versions[i].is_image:
            start = i
            break
    first = versions[start] if versions else None
    if isinstance(first, Image | WalImage):
        result = bytearray(materialize_image(first))
        start += 1
    elif isinstance(first, Tombstone):
        if start == len(versions) - 1:
            return None
        result = bytearray(base_size)
        start += 1
    else:
        result = bytearray(base_size)
    for delta in versions[start:]:
        assert isinstance(delta, Patch), (delta, start)
        delta.apply(result)
    return bytes(result)

"""Values: encoding round trips, reconstruction semantics, WalImage materialization."""

import random
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.pg.constants import BKPIMAGE_APPLY, BKPIMAGE_COMPRESS_ZSTD, BKPIMAGE_HAS_HOLE, BLCKSZ
from strata.pg.page import page_lsn
from strata.storage.value import (
    F_FOLLOW_RIGHT,
    Image,
    Patch,
    PatchOp,
    PatchWrite,
    Tombstone,
    Value,
    WalImage,
    decode_value,
    encode_value,
    is_image_bytes,
    reconstruct,
)

ops = st.one_of(
    st.builds(PatchOp, st.integers(0, BLCKSZ - 1), st.integers(0, 255), st.integers(0, 255)),
    st.builds(PatchWrite, st.integers(0, BLCKSZ - 64), st.binary(max_size=64)),
)
values: st.SearchStrategy[Value] = st.one_of(
    st.builds(Image, st.binary(max_size=300)),
    st.builds(WalImage, st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.binary(max_size=300), st.integers(0, (1 << 64) - 1), st.booleans()),
    st.builds(Patch, st.lists(ops, max_size=8).map(tuple)),
    st.just(Tombstone()),
)


@given(values)
def test_round_trip(v: Value) -> None:
    b = encode_value(v)
    assert decode_value(b) == v
    assert is_image_bytes(b) == v.is_image


@pytest.mark.parametrize("bad", [b"", b"\x00", b"\x09abc", b"\x04x", b"\x02\x00",
                                 b"\x03\x01\x00\x00\x00", b"\x03\x00\x00\x00\x00zz",
                                 b"\x03\x01\x00\x00\x00\x01\x00\x00\x00\x00\x10\x00\x00\x00"])
def test_decode_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(CorruptionError):
        decode_value(bad)


def _page(seed: int, lower: int = 200, upper: int = 7000, special: int = BLCKSZ) -> bytes:
    """A page with a standard header, random tuples above pd_upper, zeros in the hole."""
    rnd = random.Random(seed)
    page = bytearray(BLCKSZ)
    struct.pack_into("<IIHHHHHHI", page, 0, 0x1, 0x2345, 0, 0, lower, upper, special,
                     BLCKSZ | 4, 0)
    page[24:lower] = rnd.randbytes(lower - 24)
    page[upper:] = bytes(rnd.choice(b"abcdef\x00") for _ in range(BLCKSZ - upper))
    return bytes(page)


def _wal_image(page: bytes, lower: int, upper: int, lsn: int, gist: bool = False) -> WalImage:
    body = page[:lower] + page[upper:]
    data = zstandard.ZstdCompressor().compress(body)
    assert len(data) < len(body)
    info = BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY | BKPIMAGE_COMPRESS_ZSTD
    return WalImage(info, lower, upper - lower, data, lsn, gist)


def test_wal_image_materializes_with_page_lsn() -> None:
    """A zstd-compressed image with a hole restores to the page with pd_lsn = page_lsn."""
    page = _page(1)
    lsn = 0x1_0000_0000 + 0x16B3740
    v = _wal_image(page, 200, 7000, lsn)
    out = v.materialize()
    assert page_lsn(out) == lsn
    assert out[8:] == page[8:]
    assert reconstruct([decode_value(encode_value(v))]) == out


def test_gist_fixup_sets_nsn_and_clears_follow_right() -> None:
    special = BLCKSZ - 16
    page = bytearray(_page(2, upper=6000, special=special))
    # GISTPageOpaqueData: nsn {xlogid, xrecoff} @0, rightlink @8, flags @12, page id @14
    struct.pack_into("<IIIHH", page, special, 0, 0x100, 77, 0x01 | F_FOLLOW_RIGHT | 0x10,
                     0xFF81)
    lsn = 0x2_0000_1234
    out = _wal_image(bytes(page), 200, 6000, lsn, gist=True).materialize()
    nsn_hi, nsn_lo, rightlink, flags, page_id = struct.unpack_from("<IIIHH", out, special)
    assert (nsn_hi << 32) | nsn_lo == lsn
    assert rightlink == 77
    assert flags == 0x01 | 0x10
    assert page_id == 0xFF81
    assert page_lsn(out) == lsn
    assert out[24:special] == page[24:special]
    # without the fix-up flag the opaque area is left as logged
    plain = _wal_image(bytes(page), 200, 6000, lsn, gist=False).materialize()
    assert plain[special:] == page[special:]


def test_reconstruct_image_then_patches() -> None:
    base = bytes(range(256)) * 32
    got = reconstruct([Image(b"old" * 10), Image(base),
                       Patch((PatchOp(0, 0xFF, 0x0F),)),
                       Patch((PatchWrite(10, b"xyz"), PatchOp(1, 0x01, 0x80)))])
    want = bytearray(base)
    want[0] = 0x0F
    want[10:13] = b"xyz"
    want[1] = (1 & ~0x01) | 0x80
    assert got == bytes(want)


def test_reconstruct_base_zeros_and_tombstone() -> None:
    assert reconstruct([Patch((PatchOp(5, 0, 0x3),))]) == bytes(5) + b"\x03" + bytes(BLCKSZ - 6)
    assert reconstruct([Image(b"abc"), Tombstone()]) is None
    assert reconstruct([Tombstone()]) is None
    after = reconstruct([Tombstone(), Patch((PatchOp(0, 0, 1),))])
    assert after == b"\x01" + bytes(BLCKSZ - 1)
    assert reconstruct([Tombstone(), Image(b"back")]) == b"back"


def test_patch_beyond_value_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="beyond"):
        reconstruct([Image(b"ab"), Patch((PatchOp(2, 0, 1),))])
    with pytest.raises(CorruptionError, match="beyond"):
        reconstruct([Image(b"ab"), Patch((PatchWrite(1, b"xy"),))])


@settings(max_examples=50)
@given(st.binary(min_size=16, max_size=64), st.lists(ops.filter(
    lambda o: o.offset + (len(o.data) if isinstance(o, PatchWrite) else 1) <= 16), max_size=6))
def test_reconstruct_matches_model(base: bytes, patch_ops: list[PatchOp | PatchWrite]) -> None:
    model = bytearray(base)
    for op in patch_ops:
        if isinstance(op, PatchOp):
            model[op.offset] = (model[op.offset] & ~op.clear_mask & 0xFF) | op.set_mask
        else:
            model[op.offset:op.offset + len(op.data)] = op.data
    versions: list[Value] = [Image(base)]
    versions += [Patch((op,)) for op in patch_ops]
    assert reconstruct(versions) == bytes(model)

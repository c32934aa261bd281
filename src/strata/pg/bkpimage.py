"""Restore a full-page image from its WAL form: decompress and fill the hole.

Follows `RestoreBlockImage` (xlogreader.c): the stored bytes are the page minus
the hole `[hole_offset, hole_offset + hole_length)`, optionally compressed with
pglz, lz4 or zstd (`bimg_info` flags); the hole is filled with zeros.
"""

from __future__ import annotations

import threading

import lz4.block
import zstandard

from strata.common.errors import CorruptionError
from strata.pg.constants import (
    BKPIMAGE_COMPRESS_LZ4,
    BKPIMAGE_COMPRESS_PGLZ,
    BKPIMAGE_COMPRESS_ZSTD,
    BKPIMAGE_COMPRESSED_MASK,
    BLCKSZ,
)

_tls = threading.local()


def _zstd() -> zstandard.ZstdDecompressor:
    # A ZstdDecompressor must not be used by two threads at once: shared, concurrent
    # calls (basebackup, page service batches, compaction threads) return wrong bytes.
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "zstd", None)
    if d is None:
        d = _tls.zstd = zstandard.ZstdDecompressor()
    return d


def pglz_decompress(src: bytes, raw_size: int) -> bytes:
    """Decompress PostgreSQL's pglz format (pg_lzcompress.c), exactly `raw_size` bytes."""
    dst = bytearray()
    sp = 0
    n = len(src)
    while sp < n and len(dst) < raw_size:
        ctrl = src[sp]
        sp += 1
        for _ in range(8):
            if sp >= n or len(dst) >= raw_size:
                break
            if ctrl & 1:
                if sp + 1 >= n:
                    raise ValueError("pglz: truncated match tag")
                length = (src[sp] & 0x0F) + 3
                offset = ((src[sp] & 0xF0) << 4) | src[sp + 1]
                sp += 2
                if length == 18:
                    if sp >= n:
                        raise ValueError("pglz: truncated match length")
                    length += src[sp]
                    sp += 1
                if offset == 0 or offset > len(dst):
                    raise ValueError(f"pglz: bad match offset {offset}")
                length = min(length, raw_size - len(dst))
                start = len(dst) - offset
                if offset >= length:
                    dst += dst[start:start + length]
                else:  # overlapping copy repeats the last `offset` bytes
                    for i in range(length):
                        dst.append(dst[start + i])
            else:
                dst.append(src[sp])
                sp += 1
            ctrl >>= 1
    if len(dst) != raw_size or sp != n:
        raise ValueError(f"pglz: produced {len(dst)} of {raw_size} bytes, "
                         f"consumed {sp} of {n}")
    return bytes(dst)


def decompress_image(bimg_info: int, data: bytes, raw_size: int) -> bytes:
    """The page bytes without the hole (`raw_size` = BLCKSZ - hole_length)."""
    method = bimg_info & BKPIMAGE_COMPRESSED_MASK
    try:
        if method == 0:
            out = data
        elif method == BKPIMAGE_COMPRESS_ZSTD:
            out = _zstd().decompress(data, max_output_size=raw_size)
        elif method == BKPIMAGE_COMPRESS_LZ4:
            out = lz4.block.decompress(data, uncompressed_size=raw_size)
        elif method == BKPIMAGE_COMPRESS_PGLZ:
            out = pglz_decompress(data, raw_size)
        else:
            raise ValueError(f"more than one compression method in bimg_info {bimg_info:#x}")
    except (ValueError, zstandard.ZstdError, lz4.block.LZ4BlockError) as err:
        raise CorruptionError(f"cannot decompress block image: {err}") from err
    if len(out) != raw_size:
        raise CorruptionError(f"block image has {len(out)} bytes, expected {raw_size}")
    return bytes(out)


def restore_block_image(bimg_info: int, hole_offset: int, hole_length: int,
                        data: bytes) -> bytes:
    """The full 8 KB page from a WAL block image (hole zero-filled)."""
    if hole_offset + hole_length > BLCKSZ:
        raise CorruptionError(f"block image hole {hole_offset}+{hole_length} exceeds a page")
    body = decompress_image(bimg_info, data, BLCKSZ - hole_length)
    if hole_length == 0:
        return body
    return body[:hole_offset] + bytes(hole_length) + body[hole_offset:]

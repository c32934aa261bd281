"""Layer file and layer map speed: puts/s into layer writers, random gets/s and latency.

Gets go through LayerMap.search + get_versions + decode + reconstruct, on one thread,
with the files in the page cache (warm): once over a 1 GB set of image layers
(8 KB pages, compressed by our writer), once over delta layer chains holding
WAL-form page images (already zstd-compressed, as ingest stores them) and patches.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import zstandard

from bench.report import Report
from strata.common.lsn import Lsn
from strata.pg.constants import BKPIMAGE_APPLY, BKPIMAGE_COMPRESS_ZSTD, BKPIMAGE_HAS_HOLE, BLCKSZ
from strata.pg.relfile import RelTag
from strata.storage.delta_layer import DeltaLayerWriter
from strata.storage.image_layer import ImageLayerWriter
from strata.storage.key import FULL_KEY_RANGE, KeyRange, rel_block_key
from strata.storage.layer_file import LayerFileReader, open_layer
from strata.storage.layer_map import LayerMap
from strata.storage.value import (
    Image,
    Patch,
    PatchOp,
    Value,
    WalImage,
    decode_value,
    encode_value,
    reconstruct,
)

REL = RelTag(1663, 5, 16384, 0)


def _page_pool(rnd: random.Random, n: int) -> list[bytes]:
    """Heap-like pages: a header, a hole, tuples of words and numbers (compress ~2-4x)."""
    words = [rnd.randbytes(rnd.randrange(3, 12)).hex() for _ in range(500)]
    pages = []
    for _ in range(n):
        upper = rnd.randrange(600, 4000)
        body = bytearray()
        while len(body) < BLCKSZ - upper:
            body += " ".join(rnd.choices(words, k=8)).encode() + rnd.randbytes(12)
        page = bytearray(BLCKSZ)
        page[12:16] = (200).to_bytes(2, "little") + upper.to_bytes(2, "little")
        page[24:200] = rnd.randbytes(176)
        page[upper:] = body[:BLCKSZ - upper]
        pages.append(bytes(page))
    return pages


def _wal_image(page: bytes, lsn: int) -> bytes:
    lower, upper = 200, int.from_bytes(page[14:16], "little")
    data = zstandard.ZstdCompressor().compress(page[:lower] + page[upper:])
    info = BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY | BKPIMAGE_COMPRESS_ZSTD
    return encode_value(WalImage(info, lower, upper - lower, data, lsn, False))


def _get(m: LayerMap, readers: dict[object, LayerFileReader], blkno: int, lsn: Lsn) -> bytes:
    """What a timeline read does: walk layers down to an image, then reconstruct."""
    key = rel_block_key(REL, blkno)
    versions: list[Value] = []
    end = lsn
    while (desc := m.search(key, end)) is not None:
        found = readers[desc].get_versions(key, end)
        versions.extend(decode_value(v) for _, v in found)
        if found and versions[-1].is_image:
            break
        end = desc.lsn_range[0]
    versions.reverse()
    result = reconstruct(versions)
    assert result is not None and len(result) == BLCKSZ, blkno
    return result


def _measure_gets(report: Report, name: str, m: LayerMap, readers: dict[object, LayerFileReader],
                  npages: int, lsn: Lsn, count: int) -> None:
    rnd = random.Random(7)
    for _ in range(count // 10):  # warm the caches of the code path
        _get(m, readers, rnd.randrange(npages), lsn)
    lat = []
    t_all = time.perf_counter()
    for _ in range(count):
        blk = rnd.randrange(npages)
        t0 = time.perf_counter()
        _get(m, readers, blk, lsn)
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_all
    lat.sort()
    report.add(f"{name} gets/s", count / elapsed, "1/s")
    report.add(f"{name} get p50", statistics.median(lat) * 1e6, "us")
    report.add(f"{name} get p99", lat[int(len(lat) * 0.99)] * 1e6, "us")


def _image_set(report: Report, d: Path, npages: int, quick: bool) -> None:
    rnd = random.Random(1)
    pool = _page_pool(rnd, 512)
    nlayers = 8
    per_layer = npages // nlayers
    m = LayerMap()
    raw = 0
    stored = 0
    t0 = time.perf_counter()
    for i in range(nlayers):
        kr = KeyRange(rel_block_key(REL, i * per_layer), rel_block_key(REL, (i + 1) * per_layer))
        w = ImageLayerWriter(d, kr, Lsn(0x1000))
        for blk in range(i * per_layer, (i + 1) * per_layer):
            w.put(rel_block_key(REL, blk), encode_value(Image(pool[blk % len(pool)])))
        raw += w.raw_bytes
        desc = w.finish()
        stored += (d / desc.file_name()).stat().st_size
        m.insert(desc)
    elapsed = time.perf_counter() - t0
    report.add("image put (zstd) pages/s", npages / elapsed, "1/s")
    report.add("image set raw size", raw / 2**20, "MiB")
    report.add("image set file size", stored / 2**20, "MiB")
    readers: dict[object, LayerFileReader] = {desc: open_layer(d / desc.file_name())
                                              for desc in m.all()}
    _measure_gets(report, "image layers", m, readers, npages, Lsn(0x2000),
                  20_000 if quick else 100_000)
    for r in readers.values():
        r.close()


def _delta_set(report: Report, d: Path, npages: int, quick: bool) -> None:
    rnd = random.Random(2)
    pool = _page_pool(rnd, 256)
    images = [_wal_image(p, 0) for p in pool]
    m = LayerMap()
    base = ImageLayerWriter(d, FULL_KEY_RANGE, Lsn(100))
    for blk in range(npages):
        base.put(rel_block_key(REL, blk), images[blk % len(images)])
    m.insert(base.finish())
    lsn = 1000
    puts = 0
    put_time = 0.0
    ndeltas = 10
    for _ in range(ndeltas):
        # one frozen in-memory layer: a burst of page updates, sorted by (key, lsn)
        entries: list[tuple[int, int, bytes]] = []
        for _ in range(npages // 2):
            lsn += rnd.randrange(50, 300)
            blk = rnd.randrange(npages)
            value = images[rnd.randrange(len(images))] if rnd.random() < 0.8 else encode_value(
                Patch((PatchOp(rnd.randrange(BLCKSZ), 0x01, 0),)))
            entries.append((blk, lsn, value))
        entries.sort()
        t0 = time.perf_counter()
        w = DeltaLayerWriter(d, FULL_KEY_RANGE, (Lsn(min(e[1] for e in entries)), Lsn(lsn + 1)))
        for blk, v_lsn, value in entries:
            w.put(rel_block_key(REL, blk), Lsn(v_lsn), value)
        desc = w.finish()
        put_time += time.perf_counter() - t0
        puts += len(entries)
        m.insert(desc)
    report.add("delta put (WAL images) versions/s", puts / put_time, "1/s")
    readers: dict[object, LayerFileReader] = {desc: open_layer(d / desc.file_name())
                                              for desc in m.all()}
    _measure_gets(report, f"{ndeltas} delta layers", m, readers, npages, Lsn(lsn + 1),
                  20_000 if quick else 100_000)
    for r in readers.values():
        r.close()


def run(report: Report, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="strata-bench-layers-") as tmp:
        d = Path(tmp)
        npages = 16_384 if quick else 131_072  # 128 MiB or 1 GiB of 8 KB pages
        report.note(f"image set: {npages} pages of {BLCKSZ} bytes in 8 image layers")
        _image_set(report, d, npages, quick)
        for p in d.iterdir():
            p.unlink()
        report.note(f"delta set: {npages // 4} pages, image layer + 10 delta layers of "
                    f"{npages // 8} versions (80% WAL images, 20% patches)")
        _delta_set(report, d, npages // 4, quick)

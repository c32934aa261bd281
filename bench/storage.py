"""Storage engine benchmark: put rate, warm random gets, branch creation, space after GC.

A timeline of 1 GB of page images (quick: ~50 MB) is loaded as ingest would: one
record per page, each page a zstd-compressed WAL image with a hole (as PostgreSQL
writes it with wal_compression=zstd). It is flushed into delta layers and compacted
into image layers. Then `image_creation_threshold - 1` update rounds each write a
delta layer: a "hot" set of pages gets a new WAL image in the newest layer, and a
"chain" set gets a byte patch (a visibility-map style delta) in every round, so
its reads walk the longest chain compaction allows (patch, patch, image layer).

Figures: puts_per_s, flush_mb_per_s, gets_per_s and get_p50_ms/get_p99_ms for the
hot and the chain keys (warm, one thread), branch_ms_10mb and branch_ms_1gb (the
second on the big timeline), disk_bytes_per_logical_byte after compaction and GC.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import zstandard

from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.constants import BKPIMAGE_COMPRESS_ZSTD, BKPIMAGE_HAS_HOLE
from strata.pg.relfile import RelTag
from strata.storage.compaction import compact
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Patch, PatchOp, Value, WalImage

BLCKSZ = 8192
RELATION_BLOCKS = 16384  # 128 MB per relation, like a 1 GB segment's share
TEMPLATES = 256


def heap_like_page(rng: random.Random) -> tuple[bytes, int, int]:
    """A page shaped like a heap page: header, line pointers, hole, text-ish tuples.

    Returns (page, hole_offset, hole_length).
    """
    ntuples = rng.randint(20, 60)
    lower = 24 + 4 * ntuples
    words = [b"alpha", b"bravo", b"charlie", b"delta", b"echo", b"1234", b"2024-01-01",
             b"customer", b"order", b"x" * 8]
    tuples = bytearray()
    for _ in range(ntuples):
        body = b" ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        tuples += bytes(24) + rng.randbytes(8) + body
    tuples = tuples[:BLCKSZ - lower - 512]
    upper = BLCKSZ - len(tuples)
    page = bytearray(BLCKSZ)
    page[12:14] = lower.to_bytes(2, "little")
    page[14:16] = upper.to_bytes(2, "little")
    page[16:18] = BLCKSZ.to_bytes(2, "little")
    page[24:lower] = rng.randbytes(lower - 24)
    page[upper:] = tuples
    return bytes(page), lower, upper - lower


def wal_images(rng: random.Random) -> list[tuple[int, int, bytes]]:
    """Compressed WAL forms (hole_offset, hole_length, zstd data) of template pages."""
    cctx = zstandard.ZstdCompressor(level=1)
    out = []
    for _ in range(TEMPLATES):
        page, hole_offset, hole_length = heap_like_page(rng)
        body = page[:hole_offset] + page[hole_offset + hole_length:]
        out.append((hole_offset, hole_length, cctx.compress(body)))
    return out


def wal_image(tpl: tuple[int, int, bytes], lsn: int) -> WalImage:
    hole_offset, hole_length, data = tpl
    return WalImage(BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_ZSTD, hole_offset, hole_length,
                    data, lsn, False)


def rels_for(nblocks: int) -> list[tuple[RelTag, int]]:
    out = []
    relnode = 16384
    while nblocks > 0:
        n = min(nblocks, RELATION_BLOCKS)
        out.append((RelTag(1663, 5, relnode, 0), n))
        relnode += 1
        nblocks -= n
    return out


def load(tl: Timeline, blocks: list[tuple[RelTag, int]], templates: list[tuple[int, int, bytes]],
         lsn: int) -> tuple[int, float]:
    """One record per page (puts only timed: flushes happen outside the loop)."""
    elapsed = 0.0
    i = 0
    for rel, n in blocks:
        t0 = time.perf_counter()
        for blkno in range(n):
            lsn += 64
            tl.put_rel_page(rel, blkno, Lsn(lsn), wal_image(templates[i % TEMPLATES], lsn))
            tl.finish_record(Lsn(lsn), Lsn(lsn - 64))
            i += 1
        elapsed += time.perf_counter() - t0
        tl.flush()  # one delta layer per relation, as checkpoint_distance would do
    return lsn, elapsed


def timed_gets(tl: Timeline, keys: list[tuple[RelTag, int]], lsn: Lsn) -> list[float]:
    lat = []
    for rel, blkno in keys:
        t0 = time.perf_counter()
        tl.get_rel_page(rel, blkno, lsn)
        lat.append(time.perf_counter() - t0)
    return lat


def report_gets(report: Report, name: str, lat: list[float]) -> None:
    lat_sorted = sorted(lat)
    report.add(f"{name}_gets_per_s", len(lat) / sum(lat), "gets/s")
    report.add(f"{name}_get_p50_ms", lat_sorted[len(lat) // 2] * 1000, "ms")
    report.add(f"{name}_get_p99_ms", lat_sorted[int(len(lat) * 0.99)] * 1000, "ms")


def branch_ms(tenant: Tenant, tl: Timeline, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tenant.branch_timeline(TimelineId(TimelineId.generate().raw), tl.timeline_id)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()
               if p.is_file() and (p.name.endswith(".delta") or p.name.endswith(".image")))


def run(report: Report, quick: bool) -> None:
    total_blocks = (50 << 20) // BLCKSZ if quick else (1 << 30) // BLCKSZ
    rng = random.Random(42)
    templates = wal_images(rng)
    workdir = Path(tempfile.mkdtemp(prefix="strata-bench-storage-"))
    try:
        conf = TenantConfig(checkpoint_distance=1 << 40, gc_horizon=0, pitr_interval_s=0.0,
                            image_creation_threshold=3)
        repo = Repository(workdir)
        tenant = repo.create_tenant(TenantId(bytes(16)), conf)
        small = tenant.create_timeline(TimelineId(bytes(15) + b"\x01"), Lsn(0x100))
        load(small, rels_for((10 << 20) // BLCKSZ), templates, 0x100)
        report.add("branch_ms_10mb", branch_ms(tenant, small), "ms")

        tl = tenant.create_timeline(TimelineId(bytes(15) + b"\x02"), Lsn(0x100))
        blocks = rels_for(total_blocks)
        lsn, put_s = load(tl, blocks, templates, 0x100)
        report.add("puts_per_s", total_blocks / put_s, "page versions/s")
        report.note(f"loaded {total_blocks} pages ({total_blocks * BLCKSZ >> 20} MB logical) "
                    f"in {len(tl.layers())} delta layers")

        t0 = time.perf_counter()
        images = compact(tl, force=True).image_layers
        report.add("compaction_mb_per_s", total_blocks * BLCKSZ / (1 << 20) /
                   (time.perf_counter() - t0), "MB/s")
        report.note(f"compaction wrote {len(images)} image layers")

        all_keys = [(rel, b) for rel, n in blocks for b in range(n)]
        rng.shuffle(all_keys)
        sample = min(20000, total_blocks // 3)
        hot = all_keys[:sample]
        chain = all_keys[sample:2 * sample]
        flush_bytes = 0
        flush_s = 0.0
        for round_no in range(conf.image_creation_threshold - 1):
            for i, (rel, blkno) in enumerate(hot if round_no == conf.image_creation_threshold - 2
                                             else []):
                lsn += 64
                tl.put_rel_page(rel, blkno, Lsn(lsn), wal_image(templates[i % TEMPLATES], lsn))
                tl.finish_record(Lsn(lsn), Lsn(lsn - 64))
            for rel, blkno in chain:
                lsn += 64
                value: Value = Patch((PatchOp(100 + round_no, 0xFF, 0x5A),))
                tl.put_rel_page(rel, blkno, Lsn(lsn), value)
                tl.finish_record(Lsn(lsn), Lsn(lsn - 64))
            before = dir_bytes(tl.dir)
            t0 = time.perf_counter()
            tl.flush()
            flush_s += time.perf_counter() - t0
            flush_bytes += dir_bytes(tl.dir) - before
        report.add("flush_mb_per_s", flush_bytes / (1 << 20) / max(flush_s, 1e-9), "MB/s")
        assert tl.layer_map.count_deltas(tl.full_key_range(), (Lsn(0), Lsn(lsn + 1))) \
            < conf.image_creation_threshold
        assert not compact(tl).image_layers  # the chains are as long as compaction allows

        at = Lsn(lsn)
        timed_gets(tl, hot[:2000], at)  # warm up readers and the page cache
        timed_gets(tl, chain[:2000], at)
        report_gets(report, "hot", timed_gets(tl, hot, at))
        chain_lat = timed_gets(tl, chain, at)
        report_gets(report, "chain", chain_lat)
        mixed = timed_gets(tl, [k for pair in zip(hot, chain, strict=True) for k in pair], at)
        report.add("gets_per_s", len(mixed) / sum(mixed), "gets/s")
        report.add("get_p99_ms", sorted(mixed)[int(len(mixed) * 0.99)] * 1000, "ms")

        report.add("branch_ms_1gb" if not quick else "branch_ms_50mb", branch_ms(tenant, tl),
                   "ms")

        tl.flush()
        compact(tl, force=True)
        tenant.gc()
        logical = total_blocks * BLCKSZ
        report.add("disk_bytes_per_logical_byte", dir_bytes(tl.dir) / logical, "ratio")
        report.note(f"after compaction and GC: {len(tl.layers())} layers, "
                    f"{dir_bytes(tl.dir) >> 20} MB on disk for {logical >> 20} MB logical")
        repo.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

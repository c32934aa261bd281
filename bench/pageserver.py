"""Page service benchmark: GetPage@LSN over loopback, beside reading the same pages locally.

A timeline of WAL-image pages (zstd-compressed with a hole, as PostgreSQL writes them;
quick: 32 MB, full: 256 MB) is flushed and compacted into image layers. A page service
then runs in its own process (as the pageserver would, so that server and client do
not share one interpreter lock) and the client reads random blocks at the last LSN:

- unbatched, one connection, one request at a time: pages/s, p50/p99 latency;
- unbatched at a moderate fixed load (1000 requests/s over eight connections): p50/p99;
- unbatched, eight connections as fast as they go: pages/s, p99;
- batched (BATCH random blocks per GetPages request), one and eight connections;
- two baselines from the same run: `os.pread` of the same pages from a local file (page
  cache warm) and `timeline.get_rel_page` in-process (the storage engine alone).

Figures: getpage_pages_per_s, getpage_p50_ms, getpage_p99_ms, getpage_moderate_p50_ms,
getpage_moderate_p99_ms, getpage_8conn_pages_per_s,
getpage_8conn_p99_ms, getpage_batched_pages_per_s, getpage_batched_p99_ms (per batch),
getpage_batched_8conn_pages_per_s, local_file_pages_per_s, inprocess_pages_per_s,
and two alternatives to the default split (single pages on the event loop, batches in a
worker thread): getpage_thread_p99_ms (every read in a thread) and
getpage_inline_batched_pages_per_s (every read on the loop).
Targets: >= 10,000 pages/s batched on one connection; p99 < 2 ms unbatched.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from bench.report import Report
from bench.storage import rels_for, wal_image, wal_images
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.page_client import PageClient
from strata.pageserver.page_service import PageService, PageServiceConfig
from strata.pageserver.pagestream import MAX_BATCH_PAGES
from strata.pg.pgserve import PgProtocolServer
from strata.pg.relfile import RelTag
from strata.storage.compaction import compact
from strata.storage.repository import Repository
from strata.storage.tenant import TenantConfig

BLCKSZ = 8192
BATCH = 64
PACED_RATE_PER_S = 1000.0
TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(15) + b"\x01")


def build(workdir: Path, nblocks: int) -> tuple[Lsn, list[tuple[RelTag, int]], Path]:
    """Load, flush, compact; write the same pages to a local file. Returns the last LSN,
    every (rel, blkno) and the local file (pages in the order of that list)."""
    rng = random.Random(7)
    templates = wal_images(rng)
    repo = Repository(workdir)
    conf = TenantConfig(checkpoint_distance=1 << 40, gc_horizon=0, pitr_interval_s=0.0)
    tl = repo.create_tenant(TENANT, conf).create_timeline(TIMELINE, Lsn(0x100))
    lsn = 0x100
    blocks: list[tuple[RelTag, int]] = []
    for rel, n in rels_for(nblocks):
        for blkno in range(n):
            lsn += 64
            tl.put_rel_page(rel, blkno, Lsn(lsn), wal_image(templates[len(blocks) % 256], lsn))
            tl.finish_record(Lsn(lsn), Lsn(lsn - 64))
            blocks.append((rel, blkno))
        tl.flush()
    compact(tl, force=True)
    local = workdir / "local-pages"
    with open(local, "wb") as f:
        for rel, blkno in blocks:
            f.write(tl.get_rel_page(rel, blkno, Lsn(lsn)))
    repo.close()
    return Lsn(lsn), blocks, local


def serve_process(workdir: Path, inline_max_pages: int, ports: Any, stop: Event) -> None:
    """The page service in a process of its own, until `stop` is set."""
    async def main() -> None:
        repo = Repository(workdir)
        service = PageService(lambda t, tl: repo.get_tenant(t).get_timeline(tl),
                              PageServiceConfig(inline_max_pages=inline_max_pages))
        server = PgProtocolServer(service.handle_query, name="bench-pagestream")
        await server.start()
        ports.put(server.port)
        await asyncio.to_thread(stop.wait)
        await server.stop(grace_s=1)
        repo.close()

    asyncio.run(main())


class ServerProcess:
    def __init__(self, workdir: Path, inline_max_pages: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        ports = ctx.Queue()
        self.process = ctx.Process(target=serve_process,
                                   args=(workdir, inline_max_pages, ports, self._stop))
        self.process.start()
        self.port: int = ports.get(timeout=60)

    def close(self) -> None:
        self._stop.set()
        self.process.join(20)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def unbatched(port: int, sample: list[tuple[RelTag, int]], lsn: Lsn,
                    connections: int) -> tuple[float, list[float]]:
    """(pages/s, latencies in s): `connections` clients, each one request at a time."""
    clients = [await PageClient.connect("127.0.0.1", port, TENANT, TIMELINE)
               for _ in range(connections)]
    latencies: list[float] = []

    async def worker(client: PageClient, keys: list[tuple[RelTag, int]]) -> None:
        for rel, blkno in keys:
            t0 = time.perf_counter()
            page = await client.get_page(rel, blkno, lsn)
            latencies.append(time.perf_counter() - t0)
            assert len(page) == BLCKSZ, len(page)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, sample[i::connections]) for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.close()
    return len(sample) / elapsed, latencies


async def paced(port: int, sample: list[tuple[RelTag, int]], lsn: Lsn, connections: int,
                rate_per_s: float) -> list[float]:
    """Latencies at a moderate, fixed offered load: `rate_per_s` requests per second in
    all, spread over `connections` connections (open loop: a slow answer does not slow
    the next request's start)."""
    clients = [await PageClient.connect("127.0.0.1", port, TENANT, TIMELINE)
               for _ in range(connections)]
    latencies: list[float] = []
    interval = connections / rate_per_s

    async def worker(client: PageClient, keys: list[tuple[RelTag, int]], offset: float) -> None:
        start = time.perf_counter() + offset

        async def one(rel: RelTag, blkno: int) -> None:
            t0 = time.perf_counter()
            await client.get_page(rel, blkno, lsn)
            latencies.append(time.perf_counter() - t0)

        pending = []
        for i, (rel, blkno) in enumerate(keys):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.ensure_future(one(rel, blkno)))
        await asyncio.gather(*pending)

    try:
        await asyncio.gather(*(worker(c, sample[i::connections], i / rate_per_s)
                               for i, c in enumerate(clients)))
    finally:
        for c in clients:
            await c.close()
    return latencies


async def batched(port: int, sample: list[tuple[RelTag, int]], lsn: Lsn,
                  connections: int) -> tuple[float, list[float]]:
    """(pages/s, latency per batch in s): BATCH random blocks per request."""
    clients = [await PageClient.connect("127.0.0.1", port, TENANT, TIMELINE)
               for _ in range(connections)]
    batches = [sample[i:i + BATCH] for i in range(0, len(sample), BATCH)]
    latencies: list[float] = []

    async def worker(client: PageClient, mine: list[list[tuple[RelTag, int]]]) -> None:
        for batch in mine:
            t0 = time.perf_counter()
            pages = await client.get_pages(batch, lsn)
            latencies.append(time.perf_counter() - t0)
            assert len(pages) == len(batch), (len(pages), len(batch))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, batches[i::connections])
                               for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.close()
    return sum(len(b) for b in batches) / elapsed, latencies


def local_file(path: Path, index: dict[tuple[RelTag, int], int],
               sample: list[tuple[RelTag, int]]) -> tuple[float, list[float]]:
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for key in sample:
            s = time.perf_counter()
            page = os.pread(fd, BLCKSZ, index[key] * BLCKSZ)
            latencies.append(time.perf_counter() - s)
            assert len(page) == BLCKSZ
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return len(sample) / elapsed, latencies


def in_process(workdir: Path, sample: list[tuple[RelTag, int]], lsn: Lsn) -> float:
    repo = Repository(workdir)
    try:
        tl = repo.get_tenant(TENANT).get_timeline(TIMELINE)
        for rel, blkno in sample[:500]:
            tl.get_rel_page(rel, blkno, lsn)
        t0 = time.perf_counter()
        for rel, blkno in sample:
            tl.get_rel_page(rel, blkno, lsn)
        return len(sample) / (time.perf_counter() - t0)
    finally:
        repo.close()


def run(report: Report, quick: bool) -> None:
    nblocks = (32 << 20) // BLCKSZ if quick else (256 << 20) // BLCKSZ
    requests = 3000 if quick else 20000
    workdir = Path(tempfile.mkdtemp(prefix="strata-bench-pageserver-"))
    try:
        lsn, blocks, local = build(workdir, nblocks)
        report.note(f"{nblocks} pages ({nblocks * BLCKSZ >> 20} MB) in image layers; "
                    f"{requests} random reads per measurement; batches of {BATCH}; "
                    f"{os.cpu_count()} CPUs")
        rng = random.Random(11)
        sample = [rng.choice(blocks) for _ in range(requests)]
        index = {key: i for i, key in enumerate(blocks)}
        local_rate, local_lat = local_file(local, index, sample)
        inproc_rate = in_process(workdir, sample, lsn)

        server = ServerProcess(workdir, PageServiceConfig().inline_max_pages)
        try:
            asyncio.run(unbatched(server.port, sample[:500], lsn, 1))  # warm up
            rate, lat = asyncio.run(unbatched(server.port, sample, lsn, 1))
            report.add("getpage_pages_per_s", rate, "pages/s", baseline=local_rate)
            report.add("getpage_p50_ms", percentile(lat, 0.5) * 1000, "ms",
                       baseline=percentile(local_lat, 0.5) * 1000)
            report.add("getpage_p99_ms", percentile(lat, 0.99) * 1000, "ms",
                       baseline=percentile(local_lat, 0.99) * 1000)
            moderate = asyncio.run(paced(server.port, sample[:min(requests, 4000)], lsn, 8,
                                         PACED_RATE_PER_S))
            report.add("getpage_moderate_p50_ms", percentile(moderate, 0.5) * 1000, "ms")
            report.add("getpage_moderate_p99_ms", percentile(moderate, 0.99) * 1000, "ms")
            rate8, lat8 = asyncio.run(unbatched(server.port, sample, lsn, 8))
            report.add("getpage_8conn_pages_per_s", rate8, "pages/s", baseline=local_rate)
            report.add("getpage_8conn_p99_ms", percentile(lat8, 0.99) * 1000, "ms")
            brate, blat = asyncio.run(batched(server.port, sample * 4, lsn, 1))
            report.add("getpage_batched_pages_per_s", brate, "pages/s", baseline=local_rate)
            report.add("getpage_batched_p99_ms", percentile(blat, 0.99) * 1000, "ms")
            brate8, _ = asyncio.run(batched(server.port, sample * 4, lsn, 8))
            report.add("getpage_batched_8conn_pages_per_s", brate8, "pages/s",
                       baseline=local_rate)
        finally:
            server.close()
        report.add("inprocess_pages_per_s", inproc_rate, "pages/s", baseline=local_rate)
        report.add("local_file_pages_per_s", local_rate, "pages/s")

        # The two alternatives to the default: every read in a worker thread, every
        # read on the event loop.
        threaded = ServerProcess(workdir, -1)
        try:
            asyncio.run(unbatched(threaded.port, sample[:500], lsn, 1))
            trate, tlat = asyncio.run(unbatched(threaded.port, sample, lsn, 1))
            report.add("getpage_thread_pages_per_s", trate, "pages/s", baseline=rate)
            report.add("getpage_thread_p99_ms", percentile(tlat, 0.99) * 1000, "ms",
                       baseline=percentile(lat, 0.99) * 1000)
        finally:
            threaded.close()
        inline = ServerProcess(workdir, MAX_BATCH_PAGES)
        try:
            asyncio.run(unbatched(inline.port, sample[:500], lsn, 1))
            ibrate, _ = asyncio.run(batched(inline.port, sample * 4, lsn, 1))
            report.add("getpage_inline_batched_pages_per_s", ibrate, "pages/s",
                       baseline=brate)
        finally:
            inline.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

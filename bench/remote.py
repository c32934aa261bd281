"""Remote storage benchmark: layer upload throughput, and cold (layer not local) vs warm reads.

A timeline of page images (quick: 50 MB; full: 100 MB and 1 GB) is loaded as
bench/storage.py does, one delta layer per 128 MB relation. Then, against a loopback
SeaweedFS (`weed server -s3`) and, as the same-run baseline, a local directory:

- upload_mb_per_s: a RemoteTimelineClient uploads every layer and the index (start to
  wait_idle);
- warm reads: random GetPage@LSN with every layer on local disk (get_p50/p99);
- cold reads: every layer evicted before each read, so each read downloads its layer
  (whole-layer download: the latency grows with the layer size), baseline = warm;
- first_read_after_attach_ms: a fresh Repository holding only the metadata and the
  remote layer list (an attach onto an empty disk), its first read.

Not measured here yet: upload lag under pgbench, and a real compute's first query after
a pageserver restart with an empty disk (needs the process-level harness).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

from bench.report import Report
from bench.storage import load, rels_for, wal_images
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.relfile import RelTag
from strata.remote.download import write_timelines
from strata.remote.seaweed import SeaweedServer
from strata.remote.storage import RemoteStorage, open_remote_storage
from strata.remote.timeline_client import RemoteTimelineClient, latest_index
from strata.storage.repository import Repository
from strata.storage.tenant import TenantConfig
from strata.storage.timeline import Timeline

BLCKSZ = 8192
TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(15) + b"\x01")


def _upload(storage: RemoteStorage, tl: Timeline) -> tuple[RemoteTimelineClient, float]:
    client = RemoteTimelineClient(storage, TENANT, TIMELINE, 1, tl.dir)
    t0 = time.perf_counter()
    client.start(tl.metadata, tl.layers(), None)
    assert client.wait_idle(3600), "uploads did not finish"
    elapsed = time.perf_counter() - t0
    tl.remote = client
    return client, elapsed


def _gets(tl: Timeline, keys: list[tuple[RelTag, int]], lsn: Lsn, cold: bool) -> list[float]:
    lat = []
    for rel, blkno in keys:
        if cold:
            for desc in tl.layers():
                tl.evict_layer(desc)
        t0 = time.perf_counter()
        tl.get_rel_page(rel, blkno, lsn)
        lat.append(time.perf_counter() - t0)
    return lat


def _pct(lat: list[float], q: float) -> float:
    ordered = sorted(lat)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def _one_size(report: Report, size_mb: int, seaweed: SeaweedServer, work: Path) -> None:
    rng = random.Random(42)
    total_blocks = (size_mb << 20) // BLCKSZ
    conf = TenantConfig(checkpoint_distance=1 << 40, gc_horizon=0, pitr_interval_s=0.0)
    repo = Repository(work / f"ps-{size_mb}")
    tenant = repo.create_tenant(TENANT, conf)
    tl = tenant.create_timeline(TIMELINE, Lsn(0x100))
    blocks = rels_for(total_blocks)
    lsn, _ = load(tl, blocks, wal_images(rng), 0x100)
    layer_bytes = sum(size for _, size, _ in tl.local_layer_files())
    report.note(f"{size_mb} MB: {len(tl.layers())} layers, {layer_bytes >> 20} MB of files")

    local = open_remote_storage(f"file://{work / f'remote-{size_mb}'}")
    _, local_s = _upload(local, tl)
    seaweed.create_bucket(f"bench-{size_mb}")
    s3 = open_remote_storage(seaweed.url(f"bench-{size_mb}"))
    client, s3_s = _upload(s3, tl)
    mb = layer_bytes / (1 << 20)
    report.add(f"upload_mb_per_s_{size_mb}mb", mb / s3_s, "MB/s", baseline=mb / local_s)

    keys = [(rel, rng.randrange(n)) for rel, n in blocks for _ in range(50)]
    rng.shuffle(keys)
    warm = _gets(tl, keys[:200], Lsn(lsn), cold=False)
    cold = _gets(tl, keys[:10], Lsn(lsn), cold=True)
    report.add(f"warm_get_p50_ms_{size_mb}mb", _pct(warm, 0.5), "ms")
    report.add(f"warm_get_p99_ms_{size_mb}mb", _pct(warm, 0.99), "ms")
    report.add(f"cold_get_p50_ms_{size_mb}mb", _pct(cold, 0.5), "ms",
               baseline=_pct(warm, 0.5))
    report.add(f"cold_get_p99_ms_{size_mb}mb", _pct(cold, 0.99), "ms",
               baseline=_pct(warm, 0.99))
    client.stop()

    # An attach onto an empty disk: metadata only, then the first read.
    index = latest_index(s3, TENANT, TIMELINE)
    assert index is not None
    t0 = time.perf_counter()
    fresh = Repository(work / f"attached-{size_mb}")
    attached = fresh.create_tenant(TENANT, conf, 2,
                                   lambda temp: write_timelines({TIMELINE: index}, temp))
    atl = attached.get_timeline(TIMELINE)
    aclient = RemoteTimelineClient(s3, TENANT, TIMELINE, 2, atl.dir)
    atl.add_remote_layers(index.layer_descs())
    aclient.start(atl.metadata, atl.layers(), index)
    atl.remote = aclient
    rel, blkno = keys[0]
    atl.get_rel_page(rel, blkno, Lsn(lsn))
    report.add(f"first_read_after_attach_ms_{size_mb}mb", (time.perf_counter() - t0) * 1000,
               "ms", baseline=_pct(warm, 0.5))
    aclient.stop()
    fresh.close()
    repo.close()


def run(report: Report, quick: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="strata-bench-remote-"))
    seaweed = SeaweedServer(work / "seaweed", work / "seaweed.log")
    seaweed.start()
    try:
        for size_mb in ([50] if quick else [100, 1024]):
            _one_size(report, size_mb, seaweed, work)
    finally:
        seaweed.kill9()
        shutil.rmtree(work, ignore_errors=True)

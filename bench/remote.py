"""Remote storage benchmark: layer upload throughput, and cold (layer not local) vs warm reads.

A timeline of page images (quick: 50 MB; full: 100 MB and 1 GB) is loaded as
bench/storage.py does, one delta layer per 128 MB relation. Then, against a loopback
SeaweedFS (`weed server -s3`) and, as the same-run baseline, a local directory:

- upload_mb_per_s: a RemoteTimelineClient uploads every layer and the index (start to
  wait_idle);
- warm reads: random GetPage@LSN with every layer on local disk (get_p50/p99);
- cold reads: every layer evicted before each read, three ways alternating per read:
  the whole layer downloaded first (`whole`, ranged_reads_before_download = 0: the
  latency grows with the layer size, baseline = warm), ranged GETs of the layer's index
  and the read's blobs then the whole layer in the background (`cold_get`, the default;
  baseline = whole), ranged GETs only (`cold_ranged_only_get`); and how long after the
  read's start its layer was local (`cold_layer_local_after`);
- first_read_after_attach_ms: a fresh Repository holding only the metadata and the
  remote layer list (an attach onto an empty disk), its first read.

Then, with real processes (a `strata` environment with its own SeaweedFS, the pageserver,
three safekeepers and a PostgreSQL 15 compute; `checkpoint_distance` 16 MiB so layers
are written and uploaded during the run), a pgbench database of about the same size:

- pgbench -N on the compute while uploads run: upload_lag_s (p50/max: from the moment the
  pageserver had ingested an LSN until an index with it was in object storage),
  uploaded_mb_per_s during the run (baseline: the WAL rate the compute produced);
- the pageserver restarted (`pageserver stop --immediate`, `start`) with its disk, the
  baseline, and with its data directory deleted (attached from object storage; alternating
  whole layers (ranged_reads_before_download 0), ranged reads that never wait for a
  running download (download_wait_s 0) and the default (ranged reads; a read of a layer
  whose download should finish within download_wait_s waits for it), and whole layers
  one download at a time (concurrent_downloads 1; the others 4): the `ranged_vs_whole`,
  `wait_vs_nowait` and `whole_concurrent_vs_serial` figures; one round quick, two full,
  BENCH_REMOTE_ROUNDS=N): the `pageserver start` and `endpoint start` commands, the new
  compute's first query (one row of pgbench_accounts), their sum, and a full scan of
  pgbench_accounts afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import obstore
import psycopg

from bench.report import Report
from bench.storage import load, rels_for, wal_images
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.control.auth_setup import token_for
from strata.control.env import Environment
from strata.control.services import pageserver_client
from strata.pageserver.api import TimelineInfo
from strata.pg.relfile import RelTag
from strata.remote.download import write_timelines
from strata.remote.index import IndexPart, timeline_prefix, with_generation
from strata.remote.s3 import S3Storage
from strata.remote.seaweed import SeaweedServer
from strata.remote.storage import RemoteStorage, RetryingStorage, open_remote_storage
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


def _gets(tl: Timeline, keys: list[tuple[RelTag, int]], lsn: Lsn) -> list[float]:
    lat = []
    for rel, blkno in keys:
        t0 = time.perf_counter()
        tl.get_rel_page(rel, blkno, lsn)
        lat.append(time.perf_counter() - t0)
    return lat


# How a read of a layer not on local disk is served, per pageserver setting
# ranged_reads_before_download: the whole layer downloaded first (0, the old way), ranged
# GETs then the whole layer in the background (1, the default), ranged GETs only.
COLD_VARIANTS = {"whole": 0, "ranged": 1, "ranged_only": 1 << 40}


def _cold_gets(tl: Timeline, client: RemoteTimelineClient, keys: list[tuple[RelTag, int]],
               lsn: Lsn) -> tuple[dict[str, list[float]], list[float]]:
    """Cold GetPage latencies per variant (every layer evicted, and no background download
    running, before each read), the variants alternating in a rotating order per key; and
    for "ranged", the time from the read's start until its layer was local."""
    lat: dict[str, list[float]] = {name: [] for name in COLD_VARIANTS}
    local_after = []
    names = list(COLD_VARIANTS)
    for i, (rel, blkno) in enumerate(keys):
        for name in names[i % len(names):] + names[:i % len(names)]:
            assert tl.wait_background_downloads(600), "background download stuck"
            for desc in tl.layers():
                tl.evict_layer(desc)
            client.ranged_reads_before_download = COLD_VARIANTS[name]
            t0 = time.perf_counter()
            tl.get_rel_page(rel, blkno, lsn)
            lat[name].append(time.perf_counter() - t0)
            if name == "ranged":
                assert tl.wait_background_downloads(600), "background download stuck"
                local_after.append(time.perf_counter() - t0)
    client.ranged_reads_before_download = COLD_VARIANTS["ranged"]
    return lat, local_after


def _ranged_gets(s3: S3Storage, index: IndexPart, rng: random.Random, n: int) -> list[float]:
    """Latencies of GETs of one 8 KiB range of the largest layer object (obstore.get_range,
    no checksum): the floor of a cold read that fetches only its blocks (a ranged cold
    read does two more GETs to open the layer: its header and its index)."""
    name, layer = max(index.layers.items(), key=lambda item: item[1].size)
    key = f"{s3.prefix}/" if s3.prefix else ""
    key += timeline_prefix(TENANT, TIMELINE) + with_generation(name, layer.generation)
    lat = []
    for _ in range(n):
        start = rng.randrange(max(1, layer.size - BLCKSZ))
        t0 = time.perf_counter()
        data = obstore.get_range(s3._store, key, start=start, length=BLCKSZ)
        lat.append(time.perf_counter() - t0)
        assert len(data) == min(BLCKSZ, layer.size - start), len(data)
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
    warm = _gets(tl, keys[:200], Lsn(lsn))
    cold, local_after = _cold_gets(tl, client, keys[:20], Lsn(lsn))
    whole = cold["whole"]
    report.add(f"warm_get_p50_ms_{size_mb}mb", _pct(warm, 0.5), "ms")
    report.add(f"warm_get_p99_ms_{size_mb}mb", _pct(warm, 0.99), "ms")
    report.add(f"cold_whole_get_p50_ms_{size_mb}mb", _pct(whole, 0.5), "ms",
               baseline=_pct(warm, 0.5))
    report.add(f"cold_whole_get_p99_ms_{size_mb}mb", _pct(whole, 0.99), "ms",
               baseline=_pct(warm, 0.99))
    for name, label in (("ranged", "cold_get"), ("ranged_only", "cold_ranged_only_get")):
        report.add(f"{label}_p50_ms_{size_mb}mb", _pct(cold[name], 0.5), "ms",
                   baseline=_pct(whole, 0.5))
        report.add(f"{label}_p99_ms_{size_mb}mb", _pct(cold[name], 0.99), "ms",
                   baseline=_pct(whole, 0.99))
    report.add(f"cold_get_vs_warm_p50_{size_mb}mb", _pct(cold["ranged"], 0.5), "ms",
               baseline=_pct(warm, 0.5))
    report.add(f"cold_layer_local_after_p50_ms_{size_mb}mb", _pct(local_after, 0.5), "ms",
               baseline=_pct(whole, 0.5))
    client.stop()
    index = latest_index(s3, TENANT, TIMELINE)
    assert index is not None
    inner = s3.inner if isinstance(s3, RetryingStorage) else s3
    assert isinstance(inner, S3Storage)
    ranged = _ranged_gets(inner, index, rng, 20)
    report.add(f"ranged_8k_get_p50_ms_{size_mb}mb", _pct(ranged, 0.5), "ms",
               baseline=_pct(cold["ranged"], 0.5))

    # An attach onto an empty disk: metadata only, then the first read.
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


STRATA = str(Path(sys.executable).parent / "strata")
LIVE_CONFIG = "[tenant_defaults]\ncheckpoint_distance = 16777216\n"


class _Env:
    """A `strata` environment driven through its CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *args: str, timeout_s: float = 900) -> str:
        proc = subprocess.run([STRATA, "--repo-dir", str(self.root), *args],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        assert proc.returncode == 0, f"strata {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json"))

    def connstr(self, endpoint: str) -> str:
        return str(next(e for e in self.json("endpoint", "list")
                        if e["name"] == endpoint)["local_connstr"])


def _sql(connstr: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(connstr, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def _upload_lags(samples: list[tuple[float, int, int, int]], field: int) -> list[float]:
    """Per sample (t, last_record_lsn, disk_consistent_lsn, remote_consistent_lsn): seconds
    until a later sample's remote_consistent_lsn reached its `field` (1: ingested, 2: on
    local disk); samples no upload covered yet and repeated positions are left out."""
    lags = []
    for i, sample in enumerate(samples):
        if i and samples[i - 1][field] == sample[field]:
            continue
        later = next((s[0] for s in samples[i:] if s[3] >= sample[field]), None)
        if later is not None:
            lags.append(later - sample[0])
    return lags


def _restart_first_query(env: _Env, empty_disk: bool) -> list[float]:
    """Stop the endpoint and the pageserver, optionally delete its data directory, start it
    and a compute. Seconds: `pageserver start` (with the attach), `endpoint start`, the
    first query, then a full scan of pgbench_accounts."""
    env.run("endpoint", "stop", "main")
    env.run("pageserver", "stop", "--immediate")
    if empty_disk:
        shutil.rmtree(env.root / "pageserver")
    marks = [time.perf_counter()]
    env.run("pageserver", "start")
    marks.append(time.perf_counter())
    env.run("endpoint", "start", "main")
    marks.append(time.perf_counter())
    connstr = env.connstr("main")
    _sql(connstr, "select abalance from pgbench_accounts where aid = 1")
    marks.append(time.perf_counter())
    _sql(connstr, "select sum(abalance) from pgbench_accounts")
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _set_pageserver_config(env: _Env, key: str, value: float) -> None:
    """Set `key = value` in the environment's [pageserver.config] (read at every start)."""
    path = env.root / "config.toml"
    lines = [line for line in path.read_text().splitlines()
             if not line.startswith(f"{key} ")]
    at = lines.index("[pageserver.config]") + 1
    path.write_text("\n".join([*lines[:at], f"{key} = {value}", *lines[at:]]) + "\n")


def _live(report: Report, size_mb: int, work: Path, quick: bool) -> None:
    env = _Env(work / f"env-{size_mb}")
    config = work / f"strata-{size_mb}.toml"
    config.write_text(LIVE_CONFIG)
    env.run("init", "--config", str(config), "--object-storage", "seaweedfs")
    env.run("endpoint", "start", "main")
    main = env.connstr("main")
    scale = max(1, size_mb // 15)  # ~15 MB per pgbench scale unit
    subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), main], check=True,
                   capture_output=True, timeout=3600)
    db_mb = _sql(main, "select pg_database_size(current_database())")[0][0] / (1 << 20)
    report.note(f"live {size_mb} MB point: pgbench scale {scale}, database {db_mb:.0f} MB")

    senv = Environment(env.root)
    sconfig = senv.config()
    client = pageserver_client(sconfig)
    client.token = token_for(senv, sconfig)
    [tl] = [t for t in env.json("timeline", "list") if t["branch"] == "main"]
    [tenant_row] = env.json("tenant", "list")
    tenant = TenantId.parse(tenant_row["tenant_id"])
    timeline = TimelineId.parse(tl["timeline_id"])

    samples: list[tuple[float, int, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.is_set():
            info = TimelineInfo.from_json(client.request(  # LSNs only, no logical size sum
                "GET", f"/v1/tenant/{tenant}/timeline/{timeline}?logical_size=false"))
            remote = info.remote_consistent_lsn.value if info.remote_consistent_lsn else 0
            samples.append((time.monotonic() - t0, info.last_record_lsn.value,
                            info.disk_consistent_lsn.value, remote))
            done.wait(0.2)

    duration = 20 if quick else 60
    remote0 = env.json("tenant", "size")["remote_bytes"]
    lsn0 = Lsn.parse(_sql(main, "select pg_current_wal_flush_lsn()::text")[0][0])
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    out = subprocess.run(["pgbench", "-n", "-N", "-c", "4", "-T", str(duration), main],
                         check=True, capture_output=True, text=True, timeout=3600).stdout
    elapsed = time.monotonic() - t0
    lsn1 = Lsn.parse(_sql(main, "select pg_current_wal_flush_lsn()::text")[0][0])
    remote1 = env.json("tenant", "size")["remote_bytes"]
    time.sleep(30)  # let the last layers of the run upload, so their lag is counted
    done.set()
    sampler.join()
    tps = float(out.split("tps = ", 1)[1].split()[0])
    lags = _upload_lags(samples, 1)
    flushed_lags = _upload_lags(samples, 2)
    report.note(f"pgbench -N -c 4 -T {duration}: {tps:.0f} tps, {len(samples)} samples, "
                f"{len(lags)} covered by an upload")
    wal_mb_s = (lsn1 - lsn0) / (1 << 20) / elapsed
    report.add(f"live_uploaded_mb_per_s_{size_mb}mb", (remote1 - remote0) / (1 << 20) / elapsed,
               "MB/s", baseline=wal_mb_s)
    if lags:
        report.add(f"live_upload_lag_p50_s_{size_mb}mb", _pct(lags, 0.5) / 1000, "s")
        report.add(f"live_upload_lag_max_s_{size_mb}mb", max(lags), "s")
    if flushed_lags:  # from the layer on local disk to its index in object storage
        report.add(f"live_flush_to_upload_p50_s_{size_mb}mb", _pct(flushed_lags, 0.5) / 1000,
                   "s")
        report.add(f"live_flush_to_upload_max_s_{size_mb}mb", max(flushed_lags), "s")

    warm = _restart_first_query(env, False)
    # Empty-disk restarts, alternating: reads download whole layers (before ranged reads),
    # reads by ranged GETs that never wait for a running download (download_wait_s = 0,
    # before it existed), and the default (ranged GETs, but a read of a layer whose
    # download should be done within download_wait_s waits for it); the figures are the
    # mean of the rounds (BENCH_REMOTE_ROUNDS, default 1 quick, 2 full).
    # And whole layers one download at a time per timeline (concurrent_downloads = 1, as
    # before it existed) against the default 4: the `whole_concurrent_vs_serial` figures.
    settings = {"whole": (0, 0.0, 4), "nowait": (1, 0.0, 4), "default": (1, 0.5, 4),
                "whole_serial": (0, 0.0, 1)}
    runs: dict[str, list[list[float]]] = {name: [] for name in settings}
    rounds = int(os.environ.get("BENCH_REMOTE_ROUNDS", "1" if quick else "2"))
    for _ in range(rounds):
        for name, (ranged, wait_s, concurrent) in settings.items():
            _set_pageserver_config(env, "ranged_reads_before_download", ranged)
            _set_pageserver_config(env, "download_wait_s", wait_s)
            _set_pageserver_config(env, "concurrent_downloads", concurrent)
            runs[name].append(_restart_first_query(env, True))
    whole, nowait, cold, serial = (
        [sum(col) / len(col) for col in zip(*runs[name], strict=True)] for name in settings)
    for name, value, base, before, unwaited, whole_value, one_at_a_time in (
            ("pageserver_start", cold[0], warm[0], whole[0], nowait[0], whole[0], serial[0]),
            ("endpoint_start", cold[1], warm[1], whole[1], nowait[1], whole[1], serial[1]),
            ("first_query", cold[2], warm[2], whole[2], nowait[2], whole[2], serial[2]),
            ("start_to_first_row", sum(cold[:3]), sum(warm[:3]), sum(whole[:3]),
             sum(nowait[:3]), sum(whole[:3]), sum(serial[:3])),
            ("full_scan", cold[3], warm[3], whole[3], nowait[3], whole[3], serial[3])):
        report.add(f"live_{name}_after_empty_restart_s_{size_mb}mb", value, "s", baseline=base)
        report.add(f"live_{name}_ranged_vs_whole_s_{size_mb}mb", value, "s", baseline=before)
        report.add(f"live_{name}_wait_vs_nowait_s_{size_mb}mb", value, "s", baseline=unwaited)
        report.add(f"live_{name}_whole_concurrent_vs_serial_s_{size_mb}mb", whole_value, "s",
                   baseline=one_at_a_time)
    env.run("stop", "--immediate")


def run(report: Report, quick: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="strata-bench-remote-"))
    seaweed = SeaweedServer(work / "seaweed", work / "seaweed.log")
    seaweed.start()
    try:
        # BENCH_REMOTE_SIZES=100 runs only the 100 MB point of the full run.
        sizes = [50] if quick else [int(mb) for mb in
                                    os.environ.get("BENCH_REMOTE_SIZES", "100,1024").split(",")]
        for size_mb in sizes:
            _one_size(report, size_mb, seaweed, work)
        for size_mb in sizes:
            _live(report, size_mb, work, quick)
    finally:
        for env_dir in work.glob("env-*"):
            subprocess.run([STRATA, "--repo-dir", str(env_dir), "stop", "--immediate"],
                           capture_output=True, timeout=300, check=False)
        seaweed.kill9()
        shutil.rmtree(work, ignore_errors=True)

"""Ingest speed, offline and live.

Offline (engineer G's figures, unchanged): a PostgreSQL 15 with the Strata WAL settings
runs pgbench (init + a timed run); its WAL since initdb is decoded, then ingested into a
fresh timeline. Figures: import time of the initdb'ed directory; WAL decode and ingest
rates (MB of record bytes per second, records per second), separately and together; and
layer flush time.

Live (issue 5): pgbench at full speed (-c 4 -j 2; scale 10 for 60 s, quick: scale 2 for
15 s) on
  - `stock`: a stock PostgreSQL 15 alone, with the D2 WAL settings and the compute's
    fsync=off / shared_buffers: the baseline TPS and WAL MB/s;
  - `sync`: a compute on a live pageserver process (dev mode: the pageserver is its
    synchronous standby, so commits wait for the pageserver);
  - `async`: the same with synchronous_commit=off on the compute, so the pageserver does
    not throttle pgbench and any lag that grows without bound shows.
For the live runs: TPS and WAL MB/s generated (ratios against `stock`); ingest MB/s,
page versions/s and records/s on the pageserver side from the pgbench start until the
pageserver has caught up; and the lag, compute insert LSN minus the pageserver's
last_record_lsn (and minus disk_consistent_lsn), sampled every second: max, mean over the
first and last quarter of the pgbench run, the least-squares slope over its second half
(MB/s; about 0 when bounded), the catch-up time after pgbench ends, and the longest
stall (seconds in which last_record_lsn did not move although WAL was waiting). The per-second
series go into the JSON notes. Page versions are counted from the compute's own WAL (one
per block reference, all of which carry images under wal_consistency_checking=all) up to
the LSN the pageserver had reached at each sample.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench._live import (
    MB,
    BlockCounts,
    Env,
    LagSampler,
    PageserverProcess,
    Sample,
    load_note,
    pgbench,
    scrape,
    slope,
    tps_of,
    wait_caught_up,
    wal_lsn,
)
from bench.report import Report
from strata.common.ids import TimelineId
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.import_datadir import import_new_timeline, read_initdb_point
from strata.pageserver.ingest import WalIngest
from strata.pg.walreader import read_wal_files
from strata.storage.repository import Repository


def _pgbench(pg: PgServer, *args: str) -> str:
    out = pg.run_tool("pgbench", "-h", pg.host, "-p", str(pg.port), "-U", pg.superuser,
                      *args, "postgres")
    return out.stdout.decode()


def _offline(report: Report, quick: bool) -> None:
    scale, seconds = (2, 5) if quick else (5, 20)
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        pg = PgServer(root / "compute")
        pg.initdb()
        bootstrap = root / "bootstrap"
        shutil.copytree(pg.datadir, bootstrap)
        try:
            pg.start({**STRATA_WAL_SETTINGS, "wal_keep_size": "4GB", "max_wal_size": "4GB"})
            _pgbench(pg, "-i", "-q", "-s", str(scale))
            out = _pgbench(pg, "-c", "4", "-j", "2", "-T", str(seconds))
            tps = re.search(r"tps = ([0-9.]+)", out)
            report.note(f"pgbench -s {scale}, {seconds}s: tps {tps.group(1) if tps else '?'}")
            pg.sql("checkpoint")
        finally:
            pg.stop("fast")

        repo = Repository(root / "pageserver")
        tenant = repo.create_tenant()
        t0 = time.monotonic()
        timeline = import_new_timeline(tenant, TimelineId(TimelineId.generate().raw), bootstrap)
        report.add("import_s", time.monotonic() - t0, "s")
        start = read_initdb_point(bootstrap).end_lsn

        t0 = time.monotonic()
        records = list(read_wal_files(pg.datadir / "pg_wal", start=start))
        decode_s = time.monotonic() - t0
        wal_mb = sum(r.tot_len for r in records) / 1e6
        ingest = WalIngest(timeline)
        t0 = time.monotonic()
        for record in records:
            ingest.ingest(record)
        ingest_s = time.monotonic() - t0
        t0 = time.monotonic()
        timeline.flush()
        flush_s = time.monotonic() - t0

        report.add("records", len(records), "records")
        report.add("wal_record_bytes", wal_mb, "MB")
        report.add("decode_rate", wal_mb / decode_s, "MB/s")
        report.add("ingest_rate", wal_mb / ingest_s, "MB/s")
        report.add("ingest_records_rate", len(records) / ingest_s, "records/s")
        report.add("decode_plus_ingest_rate", wal_mb / (decode_s + ingest_s), "MB/s")
        report.add("flush_s", flush_s, "s")
        report.note("rates count record bytes (xl_tot_len), not the segment space skipped by "
                    "WAL switches; ingest keeps images compressed as the WAL has them")
        repo.close()


# Both the stock server and the computes: WAL kept so the compute's WAL can be counted after
# the run, and checkpoints spaced out the same way (autovacuum is off on computes).
_LIVE_SETTINGS: dict[str, object] = {"autovacuum": False, "wal_keep_size": "16GB",
                                     "max_wal_size": "4GB"}
_BENCH_ARGS = ("-c", "4", "-j", "2", "-n")


@dataclass(frozen=True, slots=True)
class _Stock:
    tps: float
    wal_mb_s: float


def _stock(report: Report, root: Path, scale: int, seconds: int) -> _Stock:
    pg = PgServer(root / "stock", log_path=root / "stock.log")
    pg.initdb()
    pg.start({**STRATA_WAL_SETTINGS, **_LIVE_SETTINGS})
    try:
        pgbench(pg, "-i", "-q", "-s", str(scale))
        pg.sql("checkpoint")
        l0 = wal_lsn(pg)
        tps = tps_of(pgbench(pg, *_BENCH_ARGS, "-T", str(seconds)))
        wal = (wal_lsn(pg) - l0) / MB / seconds
    finally:
        pg.stop("immediate")
    report.add("stock_tps", tps, "tps")
    report.add("stock_wal_mb_s", wal, "MB/s")
    return _Stock(tps, wal)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _longest_stall(samples: list[Sample]) -> float:
    """The longest stretch in which the pageserver applied nothing while WAL was waiting."""
    longest, since = 0.0, None
    for prev, s in zip(samples, samples[1:], strict=False):
        if s.last_record_lsn == prev.last_record_lsn and prev.lag > 0:
            since = prev.t if since is None else since
            longest = max(longest, s.t - since)
        else:
            since = None
    return longest


def _live_run(report: Report, env: Env, mode: str, scale: int, seconds: int,
              stock: _Stock, catch_up_timeout_s: float) -> None:
    """One pgbench run on a fresh tenant's compute; `mode` is sync or async."""
    client = env.client
    tenant, timeline = client.create_tenant()
    settings = {**_LIVE_SETTINGS,
                "synchronous_commit": "on" if mode == "sync" else "off"}
    compute = env.start_compute(tenant, timeline, settings=settings)
    try:
        pgbench(compute, "-i", "-q", "-s", str(scale))
        compute.sql("checkpoint")
        wait_caught_up(client, tenant, timeline, wal_lsn(compute), catch_up_timeout_s)
        before = scrape(client)
        sampler = LagSampler(compute, client, tenant, timeline)
        with compute.connect() as conn:
            first = sampler.sample_now(conn)
        l0 = first.compute_lsn
        sampler.start()
        tps = tps_of(pgbench(compute, *_BENCH_ARGS, "-T", str(seconds)))
        l1 = wal_lsn(compute)
        t_end = time.monotonic() - sampler.t0
        catch_up = wait_caught_up(client, tenant, timeline, l1, catch_up_timeout_s)
        sampler.stop()
        with compute.connect() as conn:
            last = sampler.sample_now(conn)
        samples = sampler.samples
        after = scrape(client)
    finally:
        compute.stop("immediate")
    counts = BlockCounts(compute.datadir / "pg_wal", first.last_record_lsn,
                         last.last_record_lsn)
    _figures(report, mode, samples, counts, t_end, seconds, tps, (l1 - l0) / MB / seconds,
             catch_up, stock)
    jobs = {name: after.get(f"strata_pageserver_{name}", 0.0)
            - before.get(f"strata_pageserver_{name}", 0.0)
            for name in ("compaction_runs_total", "compaction_seconds_sum",
                         "image_layers_created_total", "timeline_ticks_total",
                         "gc_runs_total", "gc_seconds_sum")}
    report.note(f"{mode} pageserver background work during the run (from /metrics): "
                + ", ".join(f"{k} {v:.2f}" for k, v in jobs.items()))


def _figures(report: Report, mode: str, samples: list[Sample], counts: BlockCounts,
             t_end: float, seconds: int, tps: float, wal_mb_s: float, catch_up: float,
             stock: _Stock) -> None:
    first, last = samples[0], samples[-1]
    report.add(f"{mode}_tps", tps, "tps", stock.tps)
    report.add(f"{mode}_wal_mb_s", wal_mb_s, "MB/s", stock.wal_mb_s)
    span = last.t - first.t
    blocks, records = counts.at(last.last_record_lsn)
    report.add(f"{mode}_ingest_mb_s", (last.last_record_lsn - first.last_record_lsn) / MB / span,
               "MB/s", stock.wal_mb_s)
    report.add(f"{mode}_page_versions_s", blocks / span, "versions/s")
    report.add(f"{mode}_ingest_records_s", records / span, "records/s")
    run = [s for s in samples if 0 < s.t <= t_end]
    assert run, f"no lag samples during the {mode} pgbench run ({len(samples)} in all)"
    quarter = max(1, len(run) // 4)
    half = run[len(run) // 2:]
    lag = [s.lag / MB for s in run]
    disk_lag = [s.disk_lag / MB for s in run]
    report.add(f"{mode}_lag_max_mb", max(lag), "MB")
    report.add(f"{mode}_lag_start_mb", _mean(lag[:quarter]), "MB")
    report.add(f"{mode}_lag_end_mb", _mean(lag[-quarter:]), "MB")
    report.add(f"{mode}_lag_slope_2nd_half", slope([s.t for s in half],
                                                   [s.lag / MB for s in half]), "MB/s")
    report.add(f"{mode}_disk_lag_max_mb", max(disk_lag), "MB")
    report.add(f"{mode}_disk_lag_end_mb", _mean(disk_lag[-quarter:]), "MB")
    report.add(f"{mode}_catch_up_s", catch_up, "s")
    report.add(f"{mode}_longest_stall_s", _longest_stall(samples), "s")
    series: dict[str, list[float]] = {"t": [], "lag_mb": [], "disk_lag_mb": [],
                                      "ingest_mb_s": [], "page_versions_s": []}
    for prev, s in zip(samples, samples[1:], strict=False):
        dt = s.t - prev.t
        if dt <= 0:
            continue
        series["t"].append(round(s.t, 2))
        series["lag_mb"].append(round(s.lag / MB, 3))
        series["disk_lag_mb"].append(round(s.disk_lag / MB, 3))
        series["ingest_mb_s"].append(
            round((s.last_record_lsn - prev.last_record_lsn) / MB / dt, 3))
        series["page_versions_s"].append(
            round((counts.at(s.last_record_lsn)[0] - counts.at(prev.last_record_lsn)[0]) / dt))
    report.note(f"{mode} series (pgbench {seconds}s ends at t={t_end:.1f}s, then catch-up): "
                + json.dumps(series, separators=(",", ":")))


def _live(report: Report, quick: bool) -> None:
    scale, seconds = (2, 15) if quick else (10, 60)
    timeout = 120.0 if quick else 900.0
    with tempfile.TemporaryDirectory(prefix="strata-bench-live-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        report.note(load_note("at the start of the live runs"))
        stock = _stock(report, root, scale, seconds)
        ps = PageserverProcess(root / "pageserver", root / "pageserver.log")
        ps.start()
        env = Env(root, ps)
        # Each run's compute is stopped before the next: its receiver retries until then.
        env.allowed_log_errors.append(r"walreceiver: connection to \S+ ended")
        try:
            for mode in ("sync", "async"):
                _live_run(report, env, mode, scale, seconds, stock, timeout)
            report.note(load_note("at the end of the live runs"))
            problems = env.unexpected_log_errors()
            assert not problems, "pageserver logged errors:\n" + "\n".join(problems[:20])
        finally:
            env.stop_all()
    report.note(f"live: pgbench -s {scale} -c 4 -j 2 -T {seconds} -n; stock and computes "
                f"with the D2 WAL settings, fsync=off, shared_buffers=32MB, autovacuum off; "
                f"WAL and ingest MB are LSN bytes; lag = compute insert LSN - pageserver LSN "
                f"(pageserver read first, so never under-stated); page versions = block "
                f"references in the compute's WAL up to the pageserver's last_record_lsn")


def run(report: Report, quick: bool) -> None:
    _offline(report, quick)
    _live(report, quick)

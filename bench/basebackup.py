"""Basebackup: time to build the tar at an LSN, in process and through a live pageserver.

In process (engineer H's figures, unchanged): a fresh initdb is imported into a
timeline; pgbench -i (scale 2 quick, 20 full) runs on a separate PostgreSQL with the
Strata WAL settings, and its WAL is ingested. Figures, each from the in-memory layer and
again after the timeline is flushed to delta layer files (reads then go through the layer
files): basebackup MB/s and seconds (the tar is counted, not stored), and the seconds to
unpack it and start a compute. Baseline: copying the source's data directory files (the
bytes PostgreSQL itself would ship) in the same run.

Live (issue 5): `basebackup_s_10mb`, `_100mb`, `_1gb`: a compute on a live pageserver
process (dev mode) is filled with pgbench -i at scales 1, 7 and 70 (quick: 1 and 7) in
turn; once the pageserver has ingested the WAL, the pageserver's `basebackup` command is
timed (median of 3; 1 at 1 GB) over its PostgreSQL-protocol port (the tar is counted, not
stored), right away
(recent WAL still in the in-memory layer) and again after a pageserver checkpoint
(`_flushed`: every read through layer files). Baseline in the same run: `pg_basebackup
-Ft -X fetch --no-manifest --no-sync` from a stock PostgreSQL 15 with the same settings
and the same pgbench scale, after a CHECKPOINT.
"""

from __future__ import annotations

import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench._live import (
    MB,
    Counter,
    Env,
    PageserverProcess,
    load_note,
    pgbench,
    scrape,
    wait_caught_up,
    wal_lsn,
)
from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable, make_dir_for, service_user
from strata.compute.compute import Compute, ComputeConfig
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.basebackup import write_basebackup
from strata.pageserver.import_datadir import import_new_timeline
from strata.pageserver.ingest import WalIngest
from strata.pg.walreader import read_wal_files
from strata.storage.repository import Repository
from strata.storage.timeline import Timeline


class _Counter(io.RawIOBase):
    def __init__(self) -> None:
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.bytes += len(data)
        return len(data)


def _time_backup(timeline: Timeline, lsn: Lsn) -> tuple[float, int]:
    sink = _Counter()
    t0 = time.monotonic()
    write_basebackup(timeline, lsn, sink)  # type: ignore[arg-type]
    return time.monotonic() - t0, sink.bytes


def _time_start(timeline: Timeline, lsn: Lsn, root: Path, name: str) -> float:
    out = io.BytesIO()
    write_basebackup(timeline, lsn, out)
    out.seek(0)
    t0 = time.monotonic()
    compute = Compute.from_basebackup(out, root / name, ComputeConfig(receiver_name=None))
    try:
        compute.start()
        elapsed = time.monotonic() - t0
        assert compute.sql("select count(*) > 0 from pgbench_accounts") == [(True,)]
    finally:
        compute.stop("immediate")
    shutil.rmtree(root / name)
    return elapsed


def _copy_baseline(datadir: Path, root: Path) -> float:
    t0 = time.monotonic()
    shutil.copytree(datadir / "base", root / "copy" / "base")
    shutil.copytree(datadir / "global", root / "copy" / "global")
    elapsed = time.monotonic() - t0
    shutil.rmtree(root / "copy")
    return elapsed


def _in_process(report: Report, quick: bool) -> None:
    scale = 2 if quick else 20
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        source = PgServer(root / "source")
        source.initdb()
        repo = Repository(root / "pageserver")
        tenant = repo.create_tenant(TenantId(TenantId.generate().raw))
        timeline = import_new_timeline(tenant, TimelineId(TimelineId.generate().raw),
                                       source.datadir)
        x0 = timeline.last_record_lsn
        try:
            source.start({**STRATA_WAL_SETTINGS, "wal_keep_size": "10GB", "autovacuum": False})
            source.run_tool("pgbench", "-i", "-q", "-s", str(scale), "-h", source.host,
                            "-p", str(source.port), "-U", source.superuser, "postgres")
            end = Lsn.parse(source.sql("select pg_current_wal_insert_lsn()::text")[0][0])
        finally:
            source.stop()
        ingest = WalIngest(timeline)
        for record in read_wal_files(source.datadir / "pg_wal", start=x0, end=end):
            ingest.ingest(record)
        assert timeline.last_record_lsn == end, (timeline.last_record_lsn, end)
        report.note(f"pgbench scale {scale}: {(end - x0) / 1e6:.0f} MB of WAL ingested")

        baseline = _copy_baseline(source.datadir, root)
        for where in ("in-memory layer", "delta layer files"):
            if where == "delta layer files":
                timeline.flush()
            seconds, size = _time_backup(timeline, end)
            report.add(f"basebackup s, {where}", seconds, "s", baseline=baseline)
            report.add(f"basebackup MB/s, {where}", size / 1e6 / seconds, "MB/s")
            report.add(f"unpack+start s, {where}",
                       _time_start(timeline, end, root, "compute"), "s")
        report.note(f"tar size {size / 1e6:.0f} MB (includes one 16 MB WAL segment); "
                    f"baseline = copying base/ and global/ of the source")
        repo.close()


_SETTINGS: dict[str, object] = {"autovacuum": False, "max_wal_size": "4GB"}
_JOBS = ("strata_pageserver_compaction_runs_total", "strata_pageserver_compaction_seconds_sum",
         "strata_pageserver_image_layers_created_total", "strata_pageserver_gc_seconds_sum")


def _cluster_mb(server: PgServer) -> float:
    return float(server.sql("select sum(pg_database_size(oid)) from pg_database")[0][0]) / MB


def _pg_basebackup(server: PgServer, target: Path) -> tuple[float, int]:
    """Seconds and tar bytes of a pg_basebackup of `server` into `target` (then removed)."""
    server.sql("checkpoint")
    make_dir_for(target.parent, service_user(), 0o755)
    t0 = time.monotonic()
    server.run_tool("pg_basebackup", "-h", server.host, "-p", str(server.port), "-U",
                    server.superuser, "-D", target, "-Ft", "-X", "fetch", "-c", "fast",
                    "--no-manifest", "--no-sync")
    elapsed = time.monotonic() - t0
    size = sum(f.stat().st_size for f in target.iterdir())
    shutil.rmtree(target)
    return elapsed, size


def _live(report: Report, quick: bool) -> None:
    sizes = [(1, "10mb"), (7, "100mb")] + ([] if quick else [(70, "1gb")])
    with tempfile.TemporaryDirectory(prefix="strata-bench-bb-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        report.note(load_note("at the start of the live runs"))
        stock = PgServer(root / "stock", log_path=root / "stock.log")
        stock.initdb()
        stock.start({**STRATA_WAL_SETTINGS, **_SETTINGS})
        ps = PageserverProcess(root / "pageserver", root / "pageserver.log")
        ps.start()
        env = Env(root, ps)
        try:
            client = env.client
            tenant, timeline = client.create_tenant()
            compute = env.start_compute(tenant, timeline, settings=_SETTINGS)
            for scale, label in sizes:
                repeats = 1 if scale >= 70 else 3
                pgbench(stock, "-i", "-q", "-s", str(scale))
                base_runs = [_pg_basebackup(stock, root / "pg_basebackup" / label)
                             for _ in range(repeats)]
                base_s = statistics.median(t for t, _ in base_runs)
                base_bytes = base_runs[0][1]
                t0 = time.monotonic()
                pgbench(compute, "-i", "-q", "-s", str(scale))
                ingest_wait = wait_caught_up(client, tenant, timeline, wal_lsn(compute), 1800)
                fill_s = time.monotonic() - t0
                db_mb = _cluster_mb(compute)
                lsn = client.timeline(tenant, timeline).last_record_lsn
                for suffix in ("", "_flushed"):
                    if suffix:
                        client.checkpoint(tenant, timeline)
                    before = scrape(client)
                    times = []
                    for _ in range(repeats):
                        sink = Counter()
                        t0 = time.monotonic()
                        size = client.basebackup(tenant, timeline, sink, lsn)
                        times.append(time.monotonic() - t0)
                        assert size == sink.bytes and size > db_mb * MB / 2, \
                            (size, sink.bytes, db_mb)
                    after = scrape(client)
                    seconds = statistics.median(times)
                    report.add(f"basebackup_s_{label}{suffix}", seconds, "s", base_s)
                    report.add(f"basebackup_mb_s_{label}{suffix}", size / MB / seconds, "MB/s",
                               base_bytes / MB / base_s)
                    overlap = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _JOBS}
                    report.note(f"basebackup_s_{label}{suffix}: median of {repeats} "
                                f"({', '.join(f'{t:.3f}' for t in times)} s); pageserver "
                                f"background work meanwhile: "
                                + ", ".join(f"{k[18:]} {v:.2f}" for k, v in overlap.items()))
                report.note(f"{label}: pg_basebackup "
                            f"{', '.join(f'{t:.3f}' for t, _ in base_runs)} s; "
                            f"pgbench -i -s {scale}, databases {db_mb:.0f} MB "
                            f"(stock {_cluster_mb(stock):.0f} MB); pageserver tar "
                            f"{size / MB:.0f} MB at {lsn}, pg_basebackup tar "
                            f"{base_bytes / MB:.0f} MB; filling the compute took {fill_s:.1f}s "
                            f"of which {ingest_wait:.1f}s waiting for the pageserver to catch up")
            report.note(load_note("at the end of the live runs"))
            problems = env.unexpected_log_errors()
            assert not problems, "pageserver logged errors:\n" + "\n".join(problems[:20])
        finally:
            env.stop_all()
            stock.stop("immediate")
    report.note("live: baseline = pg_basebackup -Ft -X fetch -c fast --no-manifest --no-sync "
                "of a stock PostgreSQL 15 with the same settings and scale (after a "
                "CHECKPOINT), written to local disk; the pageserver's tar is counted as it "
                "arrives over its PostgreSQL-protocol port")


def run(report: Report, quick: bool) -> None:
    _in_process(report, quick)
    _live(report, quick)

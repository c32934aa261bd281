"""Basebackup: time to build the tar at an LSN, and to unpack it and start a compute.

A fresh initdb is imported into a timeline; pgbench -i (scale 2 quick, 20 full) runs on
a separate PostgreSQL with the Strata WAL settings, and its WAL is ingested. Figures,
each from the in-memory layer and again after the timeline is flushed to delta layer
files (reads then go through the layer files): basebackup MB/s and seconds (the tar is
counted, not stored), and the seconds to unpack it and start a compute. Baseline: copying
the source's data directory files (the bytes PostgreSQL itself would ship) in the same run.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path

from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
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


def run(report: Report, quick: bool) -> None:
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

"""Import and WAL ingest speed: a PostgreSQL 15 with the Strata WAL settings runs pgbench
(init + a timed run); its WAL since initdb is decoded, then ingested into a fresh timeline.

Figures: import time of the initdb'ed directory; WAL decode and ingest rates (MB of record
bytes per second, records per second), separately and together; and layer flush time.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

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


def run(report: Report, quick: bool) -> None:
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

"""The pageserver process end to end (dev mode): tenant creation, compute start, pgbench TPS
with the pageserver as synchronous standby and ingesting, ingest lag, and basebackup time.

Baseline for TPS: the same pgbench on a plain PostgreSQL 15 with the same WAL settings
and no synchronous standby. The compute runs with fsync=off (test harness); the
pageserver's WAL log fsyncs for real.
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Report
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures_env import Env, PageserverProcess  # noqa: E402


def _pgbench(server: PgServer, *args: str) -> str:
    out = server.run_tool("pgbench", "-h", server.host, "-p", str(server.port), "-U",
                          "postgres", *args, "postgres")
    return out.stdout.decode() + out.stderr.decode()


def _tps(output: str) -> float:
    m = re.search(r"tps = ([0-9.]+)", output)
    assert m, output
    return float(m.group(1))


def run(report: Report, quick: bool) -> None:
    seconds = 3 if quick else 15
    with tempfile.TemporaryDirectory(prefix="strata-bench-ps-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        plain = PgServer(base / "plain", log_path=base / "plain.log")
        plain.initdb()
        plain.start({**STRATA_WAL_SETTINGS, "autovacuum": False})
        try:
            _pgbench(plain, "-i", "-s", "1", "-q")
            baseline = _tps(_pgbench(plain, "-c", "4", "-T", str(seconds), "-n"))
        finally:
            plain.stop("immediate")

        ps = PageserverProcess(base / "pageserver", base / "pageserver.log")
        ps.start()
        env = Env(base, ps)
        try:
            t = time.monotonic()
            tenant, timeline = env.client.create_tenant()
            report.add("tenant_create_s", time.monotonic() - t, "s")
            t = time.monotonic()
            compute = env.start_compute(tenant, timeline)
            report.add("compute_start_empty_s", time.monotonic() - t, "s")
            _pgbench(compute, "-i", "-s", "1", "-q")
            tps = _tps(_pgbench(compute, "-c", "4", "-T", str(seconds), "-n"))
            report.add("pgbench_tps_sync_pageserver", tps, "tps", baseline)
            t = time.monotonic()
            target = Lsn.parse(compute.sql("select pg_current_wal_flush_lsn()::text")[0][0])
            while env.client.timeline(tenant, timeline).last_record_lsn.value < \
                    target.page_start().value:
                time.sleep(0.01)
            report.add("ingest_lag_at_end_s", time.monotonic() - t, "s")
            info = env.client.timeline(tenant, timeline)
            report.add("wal_ingested_mb", (info.last_record_lsn - info.initdb_lsn) / 2**20, "MB")
            compute.stop("fast")
            t = time.monotonic()
            env.client.compute_start(tenant, timeline)
            report.add("compute_start_sync_s", time.monotonic() - t, "s")
            t = time.monotonic()
            tar = io.BytesIO()
            size = env.client.basebackup(tenant, timeline, tar)
            elapsed = time.monotonic() - t
            report.add("basebackup_s", elapsed, "s")
            report.add("basebackup_mb", size / 2**20, "MB")
            report.add("basebackup_mb_per_s", size / 2**20 / elapsed, "MB/s")
            report.note("pgbench -s 1 -c 4; compute fsync=off, pageserver WAL log fsync on")
        finally:
            env.stop_all()

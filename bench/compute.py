"""Compute start time and pgbench TPS: lazy mode (FUSE, D6) against full mode and stock PG.

For each database size (pgbench scale: 1 is ~15 MB, 64 ~1 GB, 320 ~5 GB; --quick runs
scales 1 and 10), a tenant is loaded through a full-mode compute, then:

* `start_{lazy,full}_s{N}`: from compute_start to the first query answered (`select
  count(*) from pgbench_branches`), including the basebackup; lazy must stay flat;
* `tps_{select,tpcb}_{lazy_cold,lazy_warm,full}_s{N}` for the largest scale: pgbench
  select-only (-S) and TPC-B-like on a fresh lazy compute (cold: every first read goes
  to the pageserver), the same compute after it read every page once (warm; the time
  that takes is `read_all_lazy_s{N}`), and a full-mode compute; the
  baseline is stock PostgreSQL 15 on its own data directory at the same scale.

Computes run with the e2e harness's settings (dev mode: the pageserver is the
synchronous standby). Long runs: `bench/run compute` (several minutes for 5 GB loads).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Report
from strata.common.proc import ensure_traversable
from strata.compute.compute import ComputeConfig
from strata.compute.lazy import LazyCompute, start_lazy_compute
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from fixtures_env import APP_NAME, COMPUTE_SETTINGS, SLOT, Env, PageserverProcess  # noqa: E402


def _pgbench(server: PgServer, *args: str) -> str:
    out = server.run_tool("pgbench", "-h", server.host, "-p", str(server.port), "-U",
                          "postgres", *args, "postgres")
    return out.stdout.decode() + out.stderr.decode()


def _tps(output: str) -> float:
    m = re.search(r"tps = ([0-9.]+)", output)
    assert m, output
    return float(m.group(1))


def _first_query(server: PgServer) -> None:
    assert server.sql("select count(*) from pgbench_branches")[0][0] > 0


def _read_everything(server: PgServer) -> None:
    """Read every page of the pgbench tables and indexes once (warms a lazy compute)."""
    with server.connect() as conn:
        for table in ("accounts", "branches", "tellers", "history"):
            conn.execute(f"select sum(length(t::text)) from pgbench_{table} t").fetchall()
        conn.execute("set enable_seqscan = off; set enable_bitmapscan = off")
        for table, key in (("accounts", "aid"), ("branches", "bid"), ("tellers", "tid")):
            conn.execute(f"select count(*) from pgbench_{table} where {key} > 0").fetchall()


def _start_lazy(env: Env, tenant: object, timeline: object, name: str) -> LazyCompute:
    lsn, _ = env.client.compute_start(tenant, timeline)  # type: ignore[arg-type]
    config = ComputeConfig(receiver_name=APP_NAME, settings=COMPUTE_SETTINGS)
    lazy = start_lazy_compute("127.0.0.1", env.pageserver.pg_port, tenant, timeline,  # type: ignore[arg-type]
                              lsn, env.test_dir / name, config)
    env.client.attach_receiver(tenant, timeline, host=lazy.server.host,  # type: ignore[arg-type]
                               port=lazy.port, slot=SLOT, application_name=APP_NAME)
    return lazy


def _both(server: PgServer, seconds: int, clients: str) -> tuple[float, float]:
    select = _tps(_pgbench(server, "-S", "-c", clients, "-T", str(seconds), "-n"))
    tpcb = _tps(_pgbench(server, "-c", clients, "-T", str(seconds), "-n"))
    return select, tpcb


def run(report: Report, quick: bool) -> None:
    scales = [1, 10] if quick else [1, 64, 320]
    seconds = 5 if quick else 20
    clients = "4"
    with tempfile.TemporaryDirectory(prefix="strata-bench-compute-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        ps = PageserverProcess(base / "pageserver", base / "pageserver.log")
        ps.start()
        env = Env(base, ps)
        lazies: list[LazyCompute] = []
        try:
            for scale in scales:
                tenant, timeline = env.client.create_tenant()
                loader = env.start_compute(tenant, timeline)
                _pgbench(loader, "-i", "-s", str(scale), "-q")
                size_mb = loader.sql("select pg_database_size('postgres')")[0][0] / 2**20
                report.note(f"scale {scale}: database of {size_mb:.0f} MB")
                loader.stop("fast")
                env.computes.clear()

                t = time.monotonic()
                lazy = _start_lazy(env, tenant, timeline, f"lazy_s{scale}")
                lazies.append(lazy)
                _first_query(lazy.server)
                report.add(f"start_lazy_s{scale}", time.monotonic() - t, "s")
                if scale == scales[-1]:
                    cold = _both(lazy.server, seconds, clients)
                    t = time.monotonic()
                    _read_everything(lazy.server)
                    report.add(f"read_all_lazy_s{scale}", time.monotonic() - t, "s")
                    warm = _both(lazy.server, seconds, clients)
                lazy.stop("fast")

                t = time.monotonic()
                full = env.start_compute(tenant, timeline)
                _first_query(full)
                report.add(f"start_full_s{scale}", time.monotonic() - t, "s")
                if scale == scales[-1]:
                    full_tps = _both(full, seconds, clients)
                full.stop("fast")
                env.computes.clear()
        finally:
            for lazy in lazies:
                lazy.stop("immediate", timeout_s=20)
            env.stop_all()

        plain = PgServer(base / "plain", log_path=base / "plain.log")
        plain.initdb()
        plain.start({**STRATA_WAL_SETTINGS, "autovacuum": False, "shared_buffers": "32MB"})
        try:
            _pgbench(plain, "-i", "-s", str(scales[-1]), "-q")
            stock = _both(plain, seconds, clients)
        finally:
            plain.stop("immediate")
        top = scales[-1]
        for i, kind in enumerate(("select", "tpcb")):
            report.add(f"tps_{kind}_lazy_cold_s{top}", cold[i], "tps", baseline=stock[i])
            report.add(f"tps_{kind}_lazy_warm_s{top}", warm[i], "tps", baseline=stock[i])
            report.add(f"tps_{kind}_full_s{top}", full_tps[i], "tps", baseline=stock[i])
            report.add(f"tps_{kind}_stock_s{top}", stock[i], "tps")

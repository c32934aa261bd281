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

* `start_cli_lazy_s{N}` (scales 1, 64, 320; --quick 1 and 10): `strata endpoint start` of
  a `strata init` environment (three safekeepers) to the first query, median of 3, against
  stock PostgreSQL's start to its first query (`start_stock_pg`); each phase of the start
  as `start_cli_lazy_s{N}.PHASE` (from `strata endpoint start --json`);
* `kill9_restart_failures`: kill -9 of the endpoint's postmaster, then at once `strata
  endpoint start`, 20 rounds (--quick 5): must be 0; `kill9_restart_s` their median;

* `soak_*` (not with --quick): a lazy compute with the smallest shared_buffers runs
  pgbench TPC-B for minutes while the pageserver checkpoints, compacts and collects
  garbage with the most aggressive settings every two seconds, with a 10-second lease
  renewed by the FUSE process; the compute must never fail to read a page
  (`soak_fetch_errors` 0, balances hold) and GC's cutoff never passes its start LSN;
  once the stopped compute's lease expired, GC moves on (`soak_*_after_lease`).

Computes run with the e2e harness's settings (dev mode: the pageserver is the
synchronous standby). Long runs: `bench/run compute` (several minutes for 5 GB loads).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable, pg_bindir, run_as, service_user
from strata.compute.compute import ComputeConfig
from strata.compute.lazy import LazyCompute, LazyOptions, start_lazy_compute
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures_env import APP_NAME, COMPUTE_SETTINGS, SLOT, Env, PageserverProcess  # noqa: E402


def _pgbench(server: PgServer, *args: str) -> str:
    # Loading 5 GB takes longer than run_tool's default timeout.
    out = run_as(server.user, [server.bindir / "pgbench", "-h", server.host, "-p",
                               str(server.port), "-U", "postgres", *args, "postgres"],
                 timeout=7200)
    return out.stdout.decode() + out.stderr.decode()


def _tps(output: str) -> float:
    m = re.search(r"tps = ([0-9.]+)", output)
    assert m, output
    return float(m.group(1))


def _first_query(server: PgServer) -> None:
    assert server.sql("select count(*) from pgbench_branches")[0][0] > 0


def _stop_and_wait_ingested(env: Env, loader: PgServer, tenant: TenantId,
                            timeline: TimelineId, timeout_s: float = 3600) -> None:
    """Stop the loading compute and wait until the pageserver ingested its WAL (a large
    load is ingested long after pgbench returns; start times must not include that)."""
    target = Lsn.parse(loader.sql("select pg_current_wal_insert_lsn()::text")[0][0])
    loader.stop("fast")
    env.computes.clear()
    t0 = time.monotonic()
    while env.client.timeline(tenant, timeline).last_record_lsn < target.page_start():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"the pageserver did not ingest up to {target} in "
                                 f"{timeout_s}s")
        time.sleep(0.5)


def _read_everything(server: PgServer) -> None:
    """Read every page of the pgbench tables and indexes once (warms a lazy compute)."""
    with server.connect() as conn:
        for table in ("accounts", "branches", "tellers", "history"):
            conn.execute(f"select sum(length(t::text)) from pgbench_{table} t").fetchall()
        conn.execute("set enable_seqscan = off; set enable_bitmapscan = off")
        for table, key in (("accounts", "aid"), ("branches", "bid"), ("tellers", "tid")):
            conn.execute(f"select count(*) from pgbench_{table} where {key} > 0").fetchall()


def _start_lazy(env: Env, tenant: TenantId, timeline: TimelineId, name: str,
                shared_buffers: str = "32MB", options: LazyOptions | None = None) -> LazyCompute:
    lsn, _ = env.client.compute_start(tenant, timeline)
    config = ComputeConfig(receiver_name=APP_NAME, settings=COMPUTE_SETTINGS,
                           shared_buffers=shared_buffers)
    lazy = start_lazy_compute("127.0.0.1", env.pageserver.pg_port, tenant, timeline,
                              lsn, env.test_dir / name, config, options=options)
    env.client.attach_receiver(tenant, timeline, host=lazy.server.host,
                               port=lazy.port, slot=SLOT, application_name=APP_NAME)
    return lazy


def _both(server: PgServer, seconds: int, clients: str) -> tuple[float, float]:
    select = _tps(_pgbench(server, "-S", "-c", clients, "-T", str(seconds), "-n"))
    tpcb = _tps(_pgbench(server, "-c", clients, "-T", str(seconds), "-n"))
    return select, tpcb


def _layer_files(timeline_dir: Path) -> int:
    return sum(1 for p in timeline_dir.iterdir() if p.suffix in (".delta", ".image"))


AGGRESSIVE_GC = {"gc_horizon": 0, "pitr_interval_s": 0, "image_creation_threshold": 1,
                 "checkpoint_distance": 1 << 20, "gc_period_s": 1, "compaction_period_s": 1}


def gc_soak(report: Report, base: Path, seconds: int, scale: int = 5) -> None:
    """pgbench on a lazy compute (16 shared buffers) under the most aggressive GC."""
    base = base / "soak"
    base.mkdir(mode=0o755)
    ps = PageserverProcess(base / "pageserver", base / "pageserver.log")
    ps.start()
    env = Env(base, ps)
    lazy: LazyCompute | None = None
    try:
        tenant, timeline = env.client.create_tenant(config=AGGRESSIVE_GC)
        loader = env.start_compute(tenant, timeline)
        _pgbench(loader, "-i", "-s", str(scale), "-q")
        _stop_and_wait_ingested(env, loader, tenant, timeline)
        lazy = _start_lazy(env, tenant, timeline, "soak", shared_buffers="128kB",
                           options=LazyOptions(lease_s=10))
        result: dict[str, str] = {}
        bench = threading.Thread(target=lambda: result.update(out=_pgbench(
            lazy.server, "-c", "4", "-T", str(seconds), "-n")))
        bench.start()
        gc_runs, worst_cutoff, removed = 0, Lsn(0), 0
        while bench.is_alive():
            env.client.checkpoint(tenant, timeline)
            env.client.compact(tenant, timeline)
            held = env.client.gc(tenant)[timeline]
            gc_runs += 1
            removed += int(held.get("layers_removed", 0))
            worst_cutoff = max(worst_cutoff, Lsn.parse(held["cutoff"]))
            time.sleep(2)
        bench.join()
        tps = _tps(result["out"])
        n = lazy.server.sql("select count(*) from pgbench_history")[0][0]
        total = lazy.server.sql("select (select sum(abalance) from pgbench_accounts) - "
                                "(select sum(delta) from pgbench_history)")[0][0]
        layer_dir = base / "pageserver" / "tenants" / str(tenant) / "timelines" / str(timeline)
        held_files = _layer_files(layer_dir)
        lazy.stop("fast")
        # Leases expire rather than being released: once this one has, GC (the background
        # one too) goes on to the last record and removes what only the start LSN needed.
        time.sleep(11)
        env.client.checkpoint(tenant, timeline)
        env.client.compact(tenant, timeline)
        after = env.client.gc(tenant)[timeline]
        text = lazy.fuse_log.read_text(errors="replace")
        fetched = [int(m) for m in re.findall(r"fetched (\d+) pages", text)]
        report.add("soak_seconds", seconds, "s")
        report.add("soak_tps", tps, "tps")
        report.add("soak_transactions", n, "txn")
        report.add("soak_gc_runs", gc_runs, "runs")
        report.add("soak_layers_removed", removed, "layers")
        report.add("soak_pages_fetched", fetched[-1] if fetched else 0, "pages")
        report.add("soak_fetch_errors", text.count("could not fetch"), "errors")
        report.add("soak_balance_mismatch", float(total or 0), "sum")
        report.add("soak_cutoff_past_start_bytes", max(0, worst_cutoff - lazy.lsn), "bytes")
        report.add("soak_layer_files_under_lease", held_files, "files")
        report.add("soak_layer_files_after_lease", _layer_files(layer_dir), "files")
        report.add("soak_cutoff_after_lease_past_start_bytes",
                   max(0, Lsn.parse(after["cutoff"]) - lazy.lsn), "bytes")
    finally:
        if lazy is not None:
            lazy.stop("immediate", timeout_s=20)
        env.stop_all()


def _strata(repo: Path, *args: str, timeout: float = 600) -> str:
    """Run the `strata` CLI on the environment in `repo`; its stdout (errors raise)."""
    out = subprocess.run([Path(sys.executable).parent / "strata", *args],
                         env={**os.environ, "STRATA_REPO_DIR": str(repo)},
                         capture_output=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed ({out.returncode}):\n"
                             f"{out.stdout.decode()}{out.stderr.decode()}")
    return out.stdout.decode()


def stock_start_s(base: Path, tries: int = 3) -> float:
    """Stock PostgreSQL 15 (initdb'd, pgbench scale 1, cleanly stopped): postmaster start
    to the first query answered, median of `tries`: the baseline of the CLI's starts."""
    server = PgServer(base / "stock", log_path=base / "stock.log")
    server.initdb()
    server.start({"autovacuum": False})
    try:
        _pgbench(server, "-i", "-s", "1", "-q")
        times = []
        for _ in range(tries):
            server.stop("fast")
            t = time.monotonic()
            server.start({"autovacuum": False})
            _first_query(server)
            times.append(time.monotonic() - t)
    finally:
        server.stop("immediate")
    return statistics.median(times)


def _cli_start(repo: Path, endpoint: str = "main") -> tuple[float, dict[str, float], str]:
    """`strata endpoint start ENDPOINT --json` to the first query answered: (seconds, the
    command's phases, connection string)."""
    t = time.monotonic()
    started = json.loads(_strata(repo, "endpoint", "start", endpoint, "--json"))
    with psycopg.connect(started["local_connstr"], autocommit=True) as conn:
        row = conn.execute("select count(*) from pgbench_branches").fetchone()
    assert row is not None and row[0] > 0, row
    elapsed = time.monotonic() - t
    phases = dict(started["phases_s"])
    phases["first_query"] = elapsed - float(started["total_s"])
    return elapsed, phases, str(started["local_connstr"])


def kill9_restarts(report: Report, repo: Path, rounds: int) -> None:
    """kill -9 of the running endpoint's postmaster, then at once `strata endpoint start`:
    `kill9_restart_failures` of `rounds` must be 0 (issue 13); each failure's error line
    is noted."""
    failures, times = 0, []
    for i in range(rounds):
        pid = int((repo / "run" / "endpoint-main.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        try:
            elapsed, _phases, _url = _cli_start(repo)
            times.append(elapsed)
        except AssertionError as err:
            failures += 1
            report.note(f"kill -9 round {i + 1}: {str(err).splitlines()[-1][:300]}")
            _strata(repo, "endpoint", "stop", "main", "--immediate")
            _cli_start(repo)
    report.add("kill9_restart_failures", failures, f"of {rounds}")
    if times:
        report.add("kill9_restart_s", statistics.median(times), "s")


def cli_starts(report: Report, base: Path, scales: list[int], tries: int = 3,
               kill9_rounds: int = 20) -> None:
    """`strata endpoint start` (lazy, the default) to the first query answered, as a user
    sees it: the CLI's own start, safekeeper sync, lazy basebackup, mount, PostgreSQL and
    the walproposer. `start_cli_lazy_s{N}` is the median of `tries` starts against stock
    PostgreSQL's start (`stock_start_s`) as the baseline; `start_cli_lazy_s{N}.PHASE` the
    median of each phase of `strata endpoint start --json` (`cli`: Python and imports;
    `first_query`: connecting and the query after the command). The kill -9 loop runs
    after the first scale."""
    stock = stock_start_s(base)
    report.add("start_stock_pg", stock, "s")
    repo = base / "cli"
    _strata(repo, "init")
    try:
        # Strata's own way in: the unix socket (TCP asks for a password).
        url = json.loads(_strata(repo, "endpoint", "start", "main", "--json"))["local_connstr"]
        for scale in scales:
            with psycopg.connect(url, autocommit=True) as conn:
                port, socket_dir = conn.info.port, conn.info.host
            # Data generated by the server (-I G: one INSERT ... SELECT per table, no COPY
            # round trips); the WAL still goes through the walproposer and safekeepers.
            t_load = time.monotonic()
            run_as(service_user(), [pg_bindir() / "pgbench", "-i", "-I", "dtGvp", "-s",
                                    str(scale), "-q", "-h", socket_dir, "-p", str(port),
                                    "-U", "strata", "strata"],
                   timeout=7200)
            report.note(f"CLI scale {scale}: pgbench -i took {time.monotonic() - t_load:.0f} s")
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute("select pg_database_size('strata')").fetchone()
                size_mb = (row[0] if row else 0) / 2**20
            report.note(f"CLI scale {scale}: database of {size_mb:.0f} MB")
            _strata(repo, "endpoint", "stop", "main")
            # The first start after a load waits for the pageserver to ingest its WAL.
            first = _cli_start(repo)
            report.note(f"CLI scale {scale}: first start after the load {first[0]:.2f} s "
                        f"(wait_ingest {first[1].get('wait_ingest', 0.0):.2f} s)")
            _strata(repo, "endpoint", "stop", "main")
            times, phases = [], []
            for _ in range(tries):
                elapsed, phase, url = _cli_start(repo)
                times.append(elapsed)
                phases.append(phase)
                _strata(repo, "endpoint", "stop", "main")
            report.add(f"start_cli_lazy_s{scale}", statistics.median(times), "s",
                       baseline=stock)
            for name in phases[-1]:
                report.add(f"start_cli_lazy_s{scale}.{name}",
                           statistics.median(p.get(name, 0.0) for p in phases), "s")
            url = _cli_start(repo)[2]
            if scale == scales[0] and kill9_rounds:  # before the long loads of larger scales
                kill9_restarts(report, repo, kill9_rounds)
    finally:
        _strata(repo, "stop")


def run(report: Report, quick: bool) -> None:
    # The lazy start's phases (basebackup, mount, PostgreSQL) go to stderr.
    lazy_log = logging.getLogger("strata.compute.lazy")
    lazy_log.setLevel(logging.INFO)
    lazy_log.addHandler(logging.StreamHandler())
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
                _stop_and_wait_ingested(env, loader, tenant, timeline)

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
        cli_starts(report, base, [1, 10] if quick else [1, 64, 320],
                   kill9_rounds=5 if quick else 20)
        if not quick:
            gc_soak(report, base, 600)

"""Development-mode WAL receiver (issue 13): pgbench TPS of a compute whose synchronous
standby is the pageserver (dev mode; the receiver is a child process of a live
pageserver, walreceiver_proc.py) against stock PostgreSQL 15 with a synchronous
physical standby made by pg_basebackup, in the same run; and the receiver's catch-up
ingest rate.

Both primaries run with the compute's settings (the D2 WAL settings, fsync=off,
shared_buffers=32MB, autovacuum off, synchronous_commit=on) and the same pgbench
(-s 2 -c 4 -j 2 -T N); the stock standby keeps fsync=on, as the receiver fsyncs its log.
Stock and dev runs alternate (full: 3 rounds of 20 s, quick: 1 round of 8 s) so load
changes on the shared machine hit both; the figure is the median of each.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench._live import Env, PageserverProcess, load_note, pgbench, tps_of
from bench.report import Report
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable, make_dir_for
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig

APP = "strata_bench_ps"
SLOT = "bench_ps"


class _Receiver:
    def __init__(self, log_dir: Path, pg: PgServer, start: Lsn) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.wal = WalLog.open_or_create(log_dir, start)
        config = WalReceiverConfig(host=pg.host, port=pg.port, slot_name=SLOT,
                                   application_name=APP)

        async def make() -> WalReceiver:
            rx = WalReceiver(config, self.wal)
            rx.start()
            return rx

        self.rx = asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)

    def wait_for_flush(self, lsn: Lsn, timeout_s: float) -> None:
        asyncio.run_coroutine_threadsafe(self.rx.wait_for_flush(lsn, timeout_s),
                                         self.loop).result(timeout_s + 5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.rx.stop(), self.loop).result(30)
        self.wal.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


_SETTINGS: dict[str, object] = {**STRATA_WAL_SETTINGS, "synchronous_commit": "on",
                                "autovacuum": False}
STANDBY_APP = "stock_standby"


def _tps(pg: PgServer, seconds: int) -> float:
    return tps_of(pgbench(pg, "-c", "4", "-j", "2", "-T", str(seconds)))


def _flush_lsn(pg: PgServer) -> Lsn:
    return Lsn.parse(pg.sql("select pg_current_wal_flush_lsn()::text")[0][0])


def _stock_with_standby(root: Path, seconds: int) -> tuple[float, float]:
    """(TPS alone, TPS with a synchronous physical standby) of a fresh stock primary."""
    primary = PgServer(root / "primary")
    standby = PgServer(root / "standby")
    primary.initdb()
    try:
        primary.start(_SETTINGS)
        pgbench(primary, "-i", "-q", "-s", "2")
        primary.sql("checkpoint")
        alone = _tps(primary, seconds)
        make_dir_for(standby.datadir, standby.user)
        standby.datadir.chmod(0o700)
        primary.run_tool("pg_basebackup", "-h", primary.host, "-p", str(primary.port),
                         "-U", primary.superuser, "-D", standby.datadir, "-X", "stream",
                         "--no-sync", "-c", "fast")
        (standby.datadir / "standby.signal").touch()
        standby.start({**_SETTINGS, "fsync": "on", "hot_standby": "on",
                       "primary_conninfo": f"host={primary.host} port={primary.port} "
                                           f"user={primary.superuser} "
                                           f"application_name={STANDBY_APP}"})
        primary.sql(f"alter system set synchronous_standby_names = '{STANDBY_APP}'")
        primary.sql("select pg_reload_conf()")
        deadline = time.monotonic() + 60
        while primary.sql("select count(*) from pg_stat_replication where sync_state = "
                          "'sync'")[0][0] != 1:
            assert time.monotonic() < deadline, "the stock standby did not become synchronous"
            time.sleep(0.2)
        return alone, _tps(primary, seconds)
    finally:
        for server in (primary, standby):
            if server.is_running():
                server.stop("immediate")


def _dev_mode(env: Env, seconds: int) -> float:
    """TPS of a fresh tenant's compute on the live pageserver (dev mode)."""
    tenant, timeline = env.client.create_tenant()
    compute = env.start_compute(tenant, timeline, settings=_SETTINGS)
    try:
        pgbench(compute, "-i", "-q", "-s", "2")
        compute.sql("checkpoint")
        return _tps(compute, seconds)
    finally:
        env.computes.pop().stop("immediate", timeout_s=20)  # its receiver retries till the end


def _catch_up(report: Report, root: Path, seconds: int) -> None:
    """Catch-up: WAL written while no receiver runs, then streamed into a fresh log by
    an in-process WalReceiver."""
    pg = PgServer(root / "catchup")
    pg.initdb()
    try:
        pg.start(STRATA_WAL_SETTINGS)
        start = Lsn.parse(pg.sql("select lsn::text from "
                                 "pg_create_physical_replication_slot(%s, true)", SLOT)[0][0])
        pgbench(pg, "-i", "-q", "-s", "2")
        pgbench(pg, "-c", "4", "-j", "2", "-T", str(seconds))
        end = _flush_lsn(pg)
        t0 = time.monotonic()
        rx = _Receiver(root / "wal_log_fresh", pg, start)
        try:
            rx.wait_for_flush(end, 300)
            elapsed = time.monotonic() - t0
        finally:
            rx.stop()
        mb = (end - start) / 1e6
        report.add("catch-up ingest", mb / elapsed, "MB/s")
        report.note(f"catch-up streamed {mb:.1f} MB in {elapsed:.2f}s "
                    f"(includes connect and fsyncs)")
    finally:
        pg.stop("immediate")


def run(report: Report, quick: bool) -> None:
    rounds, seconds = (1, 8) if quick else (3, 20)
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        report.note(load_note("at the start"))
        ps = PageserverProcess(root / "pageserver", root / "pageserver.log")
        ps.start()
        env = Env(root, ps)
        env.allowed_log_errors.append(r"walreceiver: connection to \S+ ended")
        alone: list[float] = []
        stock: list[float] = []
        dev: list[float] = []
        try:
            for n in range(rounds):
                a, s = _stock_with_standby(root / f"stock{n}", seconds)
                alone.append(a)
                stock.append(s)
                dev.append(_dev_mode(env, seconds))
                print(f"round {n + 1}: stock alone {a:.0f}, stock + sync standby {s:.0f}, "
                      f"dev mode {dev[-1]:.0f} tps", flush=True)
            problems = env.unexpected_log_errors()
            assert not problems, "pageserver logged errors:\n" + "\n".join(problems[:20])
        finally:
            env.stop_all()
        report.add("tps dev mode vs sync standby", statistics.median(dev), "tps",
                   baseline=statistics.median(stock))
        report.add("tps dev mode vs no standby", statistics.median(dev), "tps",
                   baseline=statistics.median(alone))
        report.note(f"per round (tps): stock alone {alone}, stock + sync standby {stock}, "
                    f"dev mode {dev}")
        report.note(load_note("after the TPS rounds"))
        _catch_up(report, root, 4 if quick else 15)
    report.note(f"pgbench -s 2 -c 4 -j 2 -T {seconds}, {rounds} round(s), medians; primaries "
                "with the D2 WAL settings, fsync=off, shared_buffers=32MB, autovacuum off")

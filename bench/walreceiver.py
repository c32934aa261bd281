"""Development-mode WAL receiver: pgbench TPS with the receiver as synchronous standby
(baseline: the same server without a synchronous standby), and catch-up ingest rate.

Note: the compute runs with fsync=off (test harness), while the receiver's log
fsyncs for real, so the synchronous figure includes a real fsync per commit batch.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import threading
import time
from pathlib import Path

from bench.report import Report
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
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


def _pgbench_tps(pg: PgServer, seconds: int) -> float:
    out = pg.run_tool("pgbench", "-h", pg.host, "-p", str(pg.port), "-U", pg.superuser,
                      "-c", "4", "-j", "2", "-T", str(seconds), "postgres")
    match = re.search(r"tps = ([0-9.]+)", out.stdout.decode())
    assert match is not None, out.stdout.decode()[-2000:]
    return float(match.group(1))


def _flush_lsn(pg: PgServer) -> Lsn:
    return Lsn.parse(pg.sql("select pg_current_wal_flush_lsn()::text")[0][0])


def run(report: Report, quick: bool) -> None:
    seconds = 4 if quick else 15
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        pg = PgServer(root / "compute")
        pg.initdb()
        try:
            pg.start(STRATA_WAL_SETTINGS)
            pg.run_tool("pgbench", "-i", "-q", "-s", "2", "-h", pg.host, "-p", str(pg.port),
                        "-U", pg.superuser, "postgres")
            pg.sql("checkpoint")
            baseline = _pgbench_tps(pg, seconds)

            start = Lsn.parse(pg.sql("select lsn::text from "
                                     "pg_create_physical_replication_slot(%s, true)", SLOT)[0][0])
            pg.sql(f"alter system set synchronous_standby_names = '{APP}'")
            pg.sql("select pg_reload_conf()")
            rx = _Receiver(root / "wal_log", pg, start)
            try:
                pg.sql("checkpoint")
                synced = _pgbench_tps(pg, seconds)
                report.add("pgbench tps, receiver sync", synced, "tps", baseline=baseline)
                rx.wait_for_flush(_flush_lsn(pg), 60)
            finally:
                rx.stop()

            # Catch-up: WAL written while no receiver runs, then ingested from scratch.
            pg.sql("alter system set synchronous_standby_names = ''")
            pg.sql("select pg_reload_conf()")
            pg.run_tool("pgbench", "-h", pg.host, "-p", str(pg.port), "-U", pg.superuser,
                        "-c", "4", "-j", "2", "-T", str(seconds), "postgres")
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

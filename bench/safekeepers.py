"""The WAL path with 3 safekeepers: pgbench TPS and transaction latency p50/p99 of a Strata
compute (walproposer sidecar, commits on a majority of 3 safekeepers, pageserver following
them), beside stock PostgreSQL with synchronous replication to one standby and stock
PostgreSQL alone, in the same run on the same machine, all with the D2 WAL settings.

Durability points: stock alone fsyncs its own WAL; stock sync-rep fsyncs on the primary and
waits for the standby's fsync (synchronous_commit = on); the Strata compute runs with
fsync = off (its data directory is disposable, D6) and waits for two of three safekeepers'
fsyncs. Latency is pgbench's per-transaction latency (`--log`), which includes the commit
wait. Also: the kill -9 loop of the e2e test, more rounds (compute restarts per minute).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Report
from strata.common.proc import chown_tree, ensure_traversable, make_dir_for, service_user
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sk_fixtures import Cluster, LoopThread  # noqa: E402

CLIENTS = 4
STOCK_SETTINGS: dict[str, object] = {**STRATA_WAL_SETTINGS, "autovacuum": False,
                                     "fsync": True, "synchronous_commit": "on"}


def _pgbench(server: PgServer, *args: str) -> str:
    out = server.run_tool("pgbench", "-h", server.host, "-p", str(server.port), "-U",
                          "postgres", *args, "postgres")
    return out.stdout.decode() + out.stderr.decode()


def _measure(server: PgServer, log_dir: Path, seconds: int) -> tuple[float, float, float]:
    """(tps, p50 ms, p99 ms) of pgbench -c CLIENTS for `seconds`."""
    make_dir_for(log_dir, service_user(), 0o755)
    _pgbench(server, "-i", "-s", "1", "-q")
    out = _pgbench(server, "-c", str(CLIENTS), "-j", "2", "-T", str(seconds), "-n", "--log",
                   f"--log-prefix={log_dir}/tx")
    m = re.search(r"tps = ([0-9.]+)", out)
    assert m, out
    latencies = sorted(int(line.split()[2]) for path in log_dir.glob("tx*")
                       for line in path.read_text().splitlines() if line.strip())
    assert latencies, f"no pgbench transaction log in {log_dir}"

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1000.0

    return float(m.group(1)), pct(0.50), pct(0.99)


def _stock_alone(base: Path, seconds: int) -> tuple[float, float, float]:
    server = PgServer(base / "alone", log_path=base / "alone.log")
    server.initdb()
    server.start(STOCK_SETTINGS)
    try:
        return _measure(server, base / "alone-tx", seconds)
    finally:
        server.stop("immediate")


def _stock_sync_rep(base: Path, seconds: int) -> tuple[float, float, float]:
    primary = PgServer(base / "primary", log_path=base / "primary.log")
    primary.initdb()
    primary.start({**STOCK_SETTINGS, "synchronous_standby_names": "standby1"})
    standby = PgServer(base / "standby", log_path=base / "standby.log")
    try:
        make_dir_for(standby.datadir, standby.user)
        primary.run_tool("pg_basebackup", "-h", primary.host, "-p", str(primary.port), "-U",
                         "postgres", "-D", str(standby.datadir), "-X", "stream")
        # Our own standby.signal and primary_conninfo (with the application name the
        # primary waits for); -R's would win over ours from postgresql.auto.conf.
        signal_file = standby.datadir / "standby.signal"
        signal_file.write_bytes(b"")
        chown_tree(signal_file, standby.user)
        standby.start({**STOCK_SETTINGS, "hot_standby": True,
                       "primary_conninfo": f"host={primary.host} port={primary.port} "
                                           "user=postgres application_name=standby1"})
        deadline = time.monotonic() + 30
        while primary.sql("SELECT count(*) FROM pg_stat_replication "
                          "WHERE sync_state = 'sync'")[0][0] != 1:
            assert time.monotonic() < deadline, "the standby never became synchronous"
            time.sleep(0.1)
        return _measure(primary, base / "sync-tx", seconds)
    except AssertionError:
        print(standby.log_tail(), primary.log_tail(), sep="\n")
        raise
    finally:
        standby.stop("immediate") if standby.is_running() else None
        primary.stop("immediate")


def _strata(base: Path, seconds: int) -> tuple[float, float, float]:
    loop = LoopThread()
    cluster = Cluster.start(base / "strata", loop)
    try:
        tenant, timeline = cluster.create_tenant()
        cluster.sidecar_settings = {
            "pageserver_http": ("127.0.0.1", cluster.env.pageserver.http_port)}
        rc = cluster.start_compute(tenant, timeline, settings={"autovacuum": False})
        result = _measure(rc.compute.server, base / "strata-tx", seconds)
        assert rc.fenced == [], rc.fenced
        return result
    finally:
        cluster.stop_all()
        loop.close()


def _restarts(base: Path, rounds: int) -> float:
    """Seconds per kill -9 + sync + basebackup + start round under a light load."""
    loop = LoopThread()
    cluster = Cluster.start(base / "restarts", loop)
    try:
        tenant, timeline = cluster.create_tenant()
        rc = cluster.start_compute(tenant, timeline)
        rc.compute.sql("CREATE TABLE t (id bigserial, v text)")
        t0 = time.monotonic()
        for i in range(rounds):
            rc.compute.sql("INSERT INTO t (v) SELECT repeat('z', 1000) FROM generate_series(1, 50)")
            rc.compute.kill9()
            rc.run.cancel()
            rc = cluster.start_compute(tenant, timeline)
            count = rc.compute.sql("SELECT count(*) FROM t")[0][0]
            assert count == 50 * (i + 1), (count, i)
        return (time.monotonic() - t0) / rounds
    finally:
        cluster.stop_all()
        loop.close()


def run(report: Report, quick: bool) -> None:
    seconds = 5 if quick else 20
    with tempfile.TemporaryDirectory(prefix="strata-bench-sk-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        alone = _stock_alone(base, seconds)
        sync_rep = _stock_sync_rep(base, seconds)
        strata = _strata(base, seconds)
        report.add("tps_stock_alone", alone[0], "tps")
        report.add("tps_stock_sync_rep", sync_rep[0], "tps", alone[0])
        report.add("tps_safekeepers", strata[0], "tps", sync_rep[0])
        report.add("tps_ratio_vs_sync_rep", strata[0] / sync_rep[0], "x")
        report.add("p50_ms_stock_alone", alone[1], "ms")
        report.add("p99_ms_stock_alone", alone[2], "ms")
        report.add("p50_ms_stock_sync_rep", sync_rep[1], "ms")
        report.add("p99_ms_stock_sync_rep", sync_rep[2], "ms")
        report.add("p50_ms_safekeepers", strata[1], "ms", sync_rep[1])
        report.add("p99_ms_safekeepers", strata[2], "ms", sync_rep[2])
        report.add("p99_ratio_vs_sync_rep", strata[2] / sync_rep[2], "x")
        rounds = 3 if quick else 20
        report.add("kill9_restart_round_s", _restarts(base, rounds), "s")
        report.note(f"pgbench -s 1 -c {CLIENTS} -j 2 -T {seconds}; D2 WAL settings everywhere; "
                    "stock: fsync on; Strata compute: fsync off, 3 safekeepers (2 must fsync), "
                    "backpressure on (16 MB write lag); targets: tps ratio >= 0.6, "
                    "p99 ratio <= 3")
        report.note(f"kill -9 rounds: {rounds}, every acknowledged row present after each")

"""The WAL path with 3 safekeepers: pgbench TPS and transaction latency p50/p99 (TPC-B and
-N, each at 1, 4 and 8 clients) of a Strata compute (walproposer sidecar, commits on a
majority of 3 safekeepers, pageserver following them), beside stock PostgreSQL with
synchronous replication to one standby and stock PostgreSQL alone, in the same run on the
same machine, all with the D2 WAL settings. `strata_pull`: a second Strata cluster in
pull mode (the safekeepers replicate from the compute, `ANY 2 (sk1, sk2, sk3)`; docs/
walproposer.md "Pull mode"), measured in the same rounds. `stock_quorum3` (informative;
issue 13's target stays against one standby): stock PostgreSQL with three stock standbys
and `ANY 2 (standby1, standby2, standby3)`, the inherent cost of a quorum of three on
this machine (`tps_stock_quorum3_*` against one standby, `*_strata_pull_vs_quorum3*`:
pull mode against it).

Durability points: stock alone fsyncs its own WAL; stock sync-rep fsyncs on the primary and
waits for the standby's fsync (synchronous_commit = on); the Strata compute runs with
fsync = off (its data directory is disposable, D6) and waits for two of three safekeepers'
fsyncs. Latency is pgbench's per-transaction latency (`--log`), which includes the commit
wait. The Strata computes' sidecars run as `strata endpoint start` runs them
(`strata_endpoint`: a process and a session of their own), not in this process beside
pgbench. Also: the kill -9 loop of the e2e test, more rounds (compute restarts per minute),
in push mode and in pull mode (`_pull`).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Report
from strata.common import failpoint
from strata.common.proc import chown_tree, ensure_traversable, make_dir_for, service_user
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures_env import Cluster, LoopThread, RunningCompute, SidecarCompute  # noqa: E402

CLIENTS = (1, 4, 8)
WORKLOADS: tuple[tuple[str, tuple[str, ...]], ...] = (("tpcb", ()), ("simple", ("-N",)))
HEADLINE = ("tpcb", 4)  # reported under the unsuffixed names too
STOCK_SETTINGS: dict[str, object] = {**STRATA_WAL_SETTINGS, "autovacuum": False,
                                     "fsync": True, "synchronous_commit": "on"}


def _pgbench(server: PgServer, *args: str) -> str:
    out = server.run_tool("pgbench", "-h", server.host, "-p", str(server.port), "-U",
                          "postgres", *args, "postgres")
    return out.stdout.decode() + out.stderr.decode()


class _Target:
    """One of the three setups, up for the whole run; measured in alternating rounds so that
    a noisy neighbour on the shared machine hits all three alike."""

    def __init__(self, name: str, server: PgServer, log_dir: Path) -> None:
        self.name = name
        self.server = server
        self.log_dir = log_dir
        self.tps: dict[tuple[str, int], list[float]] = {}
        self.latencies_ms: dict[tuple[str, int], list[float]] = {}
        make_dir_for(log_dir, service_user(), 0o755)
        _pgbench(server, "-i", "-s", "1", "-q")

    def measure(self, seconds: int, round_no: int, workload: str, args: tuple[str, ...],
                clients: int) -> None:
        key = (workload, clients)
        prefix = self.log_dir / f"r{round_no}-{workload}-c{clients}"
        out = _pgbench(self.server, "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                       str(seconds), "-n", *args, "--log", f"--log-prefix={prefix}")
        m = re.search(r"tps = ([0-9.]+)", out)
        assert m, out
        self.tps.setdefault(key, []).append(float(m.group(1)))
        # pgbench --log: client, transaction no, latency in microseconds, ...
        lat = self.latencies_ms.setdefault(key, [])
        for path in self.log_dir.glob(f"{prefix.name}.*"):
            lat += [int(line.split()[2]) / 1000.0
                    for line in path.read_text().splitlines() if line.strip()]

    def result(self, key: tuple[str, int]) -> tuple[float, float, float]:
        """(median tps, p50 ms, p99 ms)."""
        lat = sorted(self.latencies_ms[key])
        assert lat, f"no pgbench transaction log in {self.log_dir} for {key}"
        return (statistics.median(self.tps[key]), lat[len(lat) // 2],
                lat[min(len(lat) - 1, int(0.99 * len(lat)))])


def _stock_alone(stack: contextlib.ExitStack, base: Path) -> PgServer:
    server = PgServer(base / "alone", log_path=base / "alone.log")
    server.initdb()
    server.start(STOCK_SETTINGS)
    stack.callback(server.stop, "immediate")
    return server


def _stock_sync_rep(stack: contextlib.ExitStack, base: Path, standbys: int = 1,
                    prefix: str = "") -> PgServer:
    """Stock PostgreSQL with synchronous replication to `standbys` stock standbys (fsync
    on everywhere): to the one (`synchronous_standby_names = 'standby1'`, issue 13's
    baseline), else to any majority of them (`ANY 2 (standby1, standby2, standby3)` for
    three: PostgreSQL's own quorum commit, the shape of Strata's pull mode)."""
    names = [f"standby{i + 1}" for i in range(standbys)]
    sync_names = names[0] if standbys == 1 else f"ANY {standbys // 2 + 1} ({', '.join(names)})"
    primary = PgServer(base / f"{prefix}primary", log_path=base / f"{prefix}primary.log")
    primary.initdb()
    primary.start({**STOCK_SETTINGS, "synchronous_standby_names": sync_names})
    stack.callback(primary.stop, "immediate")
    for i, name in enumerate(names):
        suffix = "" if standbys == 1 else str(i + 1)
        standby = PgServer(base / f"{prefix}standby{suffix}",
                           log_path=base / f"{prefix}standby{suffix}.log")
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
                                           f"user=postgres application_name={name}"})
        stack.callback(standby.stop, "immediate")
    state = "sync" if standbys == 1 else "quorum"
    deadline = time.monotonic() + 30
    while primary.sql("SELECT count(*) FROM pg_stat_replication "
                      "WHERE sync_state = %s", state)[0][0] != standbys:
        assert time.monotonic() < deadline, f"the standbys of {primary.datadir} never " \
            f"became synchronous:\n{primary.log_tail()}"
        time.sleep(0.1)
    return primary


def strata_compute(stack: contextlib.ExitStack, base: Path, name: str = "strata",
                   pageserver_overrides: list[str] | None = None, *, pull: bool = False,
                   safekeeper_args: list[str] | None = None,
                   ) -> tuple[Cluster, RunningCompute]:
    """A pageserver, 3 safekeepers and a compute with its sidecar (backpressure on), under
    base/name. `pull`: pull mode (the safekeepers replicate from the compute, ANY 2; the
    backpressure goes to them as PullLimit). `safekeeper_args`: more command-line options
    of the safekeepers (they are restarted with them before the timeline is created)."""
    loop = LoopThread()
    stack.callback(loop.close)
    cluster = Cluster.start(base / name, loop, pageserver_overrides=pageserver_overrides)
    for sk in cluster.safekeepers:
        if safekeeper_args:
            sk.stop()
            sk.extra_args = [*sk.extra_args, *safekeeper_args]
            sk.start()
    cluster.pull = pull
    stack.callback(cluster.stop_all)
    tenant, timeline = cluster.create_tenant()
    cluster.sidecar_settings = {
        "pageserver_http": ("127.0.0.1", cluster.env.pageserver.http_port)}
    rc = cluster.start_compute(tenant, timeline, settings={"autovacuum": False})
    stack.callback(lambda: None if rc.fenced == [] else print("FENCED", rc.fenced))
    return cluster, rc


def strata_endpoint(stack: contextlib.ExitStack, base: Path, name: str = "strata",
                    pageserver_overrides: list[str] | None = None, *,
                    pull: bool = False) -> SidecarCompute:
    """`strata_compute`'s cluster with the compute's sidecar run as `strata endpoint start`
    runs it: its supervisor and the walproposer in a process and a session of their own
    (with autogroup scheduling, a sidecar in this process's loop thread would share one
    CPU share with the bench and pgbench; docs/walproposer.md "The commit latency tail")."""
    loop = LoopThread()  # the fixture's; no sidecar runs in it
    stack.callback(loop.close)
    cluster = Cluster.start(base / name, loop, pageserver_overrides=pageserver_overrides)
    cluster.pull = pull
    stack.callback(cluster.stop_all)
    tenant, timeline = cluster.create_tenant()
    sc = cluster.start_compute_process(tenant, timeline, settings={"autovacuum": False},
                                       pageserver_http=True)
    stack.callback(lambda: print("SIDECAR EXITED", exited)
                   if (exited := sc.sidecar_exited()) else None)
    return sc


def _kill9_rounds(base: Path, rounds: int, *, pull: bool = False) -> tuple[float, int]:
    """The e2e kill -9 scenario (bank load, a record spanning pages cut on the safekeepers
    (push mode only), kill -9, new compute, every acked transfer checked), `rounds` times:
    seconds per round and transfers acknowledged."""
    from test_safekeepers_e2e import kill9_rounds

    loop = LoopThread()
    cluster = Cluster.start(base / ("restarts-pull" if pull else "restarts"), loop)
    cluster.pull = pull
    try:
        t0 = time.monotonic()
        acked = kill9_rounds(cluster, rounds)
        return (time.monotonic() - t0) / rounds, acked
    finally:
        failpoint.disable_all()
        cluster.stop_all()
        loop.close()


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (5, 1) if quick else (10, 3)
    with tempfile.TemporaryDirectory(prefix="strata-bench-sk-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        rc = strata_endpoint(stack, base)
        rc_pull = strata_endpoint(stack, base, "strata-pull", pull=True)
        targets = [_Target("stock_alone", _stock_alone(stack, base), base / "alone-tx"),
                   _Target("stock_sync_rep", _stock_sync_rep(stack, base), base / "sync-tx"),
                   _Target("stock_quorum3", _stock_sync_rep(stack, base, 3, "quorum3-"),
                           base / "quorum3-tx"),
                   _Target("safekeepers", rc.compute.server, base / "strata-tx"),
                   _Target("strata_pull", rc_pull.compute.server, base / "strata-pull-tx")]
        worst_tps, worst_p99 = float("inf"), 0.0
        worst_pull_tps, worst_pull_p99 = float("inf"), 0.0
        worst_q3_tps, worst_q3_p99 = float("inf"), 0.0  # stock quorum of 3 vs one standby
        worst_pull_q3_tps, worst_pull_q3_p99 = float("inf"), 0.0  # strata_pull vs it
        loads: list[float] = []
        for workload, args in WORKLOADS:
            for clients in CLIENTS:
                for round_no in range(rounds):
                    for target in targets:
                        target.measure(seconds, round_no, workload, args, clients)
                loads.append(os.getloadavg()[0])
                key = (workload, clients)
                alone, sync_rep, quorum3, strata, pulled = (t.result(key) for t in targets)
                tag = f"{workload}_c{clients}"
                report.add(f"tps_stock_sync_rep_{tag}", sync_rep[0], "tps", alone[0])
                report.add(f"tps_safekeepers_{tag}", strata[0], "tps", sync_rep[0])
                report.add(f"p99_ms_safekeepers_{tag}", strata[2], "ms", sync_rep[2])
                report.add(f"tps_strata_pull_{tag}", pulled[0], "tps", sync_rep[0])
                report.add(f"p99_ms_strata_pull_{tag}", pulled[2], "ms", sync_rep[2])
                report.add(f"tps_stock_quorum3_{tag}", quorum3[0], "tps", sync_rep[0])
                report.add(f"p99_ms_stock_quorum3_{tag}", quorum3[2], "ms", sync_rep[2])
                report.add(f"tps_strata_pull_vs_quorum3_{tag}", pulled[0] / quorum3[0], "x")
                report.add(f"p99_strata_pull_vs_quorum3_{tag}", pulled[2] / quorum3[2], "x")
                worst_q3_tps = min(worst_q3_tps, quorum3[0] / sync_rep[0])
                worst_q3_p99 = max(worst_q3_p99, quorum3[2] / sync_rep[2])
                worst_pull_q3_tps = min(worst_pull_q3_tps, pulled[0] / quorum3[0])
                worst_pull_q3_p99 = max(worst_pull_q3_p99, pulled[2] / quorum3[2])
                worst_tps = min(worst_tps, strata[0] / sync_rep[0])
                worst_p99 = max(worst_p99, strata[2] / sync_rep[2])
                worst_pull_tps = min(worst_pull_tps, pulled[0] / sync_rep[0])
                worst_pull_p99 = max(worst_pull_p99, pulled[2] / sync_rep[2])
                if key != HEADLINE:
                    continue
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
        report.add("tps_ratio_worst", worst_tps, "x")
        report.add("p99_ratio_worst", worst_p99, "x")
        report.add("tps_ratio_worst_strata_pull", worst_pull_tps, "x")
        report.add("p99_ratio_worst_strata_pull", worst_pull_p99, "x")
        report.add("tps_ratio_worst_stock_quorum3", worst_q3_tps, "x")
        report.add("p99_ratio_worst_stock_quorum3", worst_q3_p99, "x")
        report.add("tps_ratio_worst_strata_pull_vs_quorum3", worst_pull_q3_tps, "x")
        report.add("p99_ratio_worst_strata_pull_vs_quorum3", worst_pull_q3_p99, "x")
        for sc in (rc, rc_pull):  # not fenced, not failed
            assert (exited := sc.sidecar_exited()) is None, exited
        stack.close()
        kill_rounds = 3 if quick else 20
        round_s, acked = _kill9_rounds(base, kill_rounds)
        report.add("kill9_restart_round_s", round_s, "s")
        report.add("kill9_transfers_acked", acked, "transfers")
        round_s, acked = _kill9_rounds(base, kill_rounds, pull=True)
        report.add("kill9_restart_round_s_pull", round_s, "s")
        report.add("kill9_transfers_acked_pull", acked, "transfers")
        report.note(f"pgbench -s 1, TPC-B and -N, -c {'/'.join(map(str, CLIENTS))}, "
                    f"-T {seconds}, {rounds} alternating round(s) per setup and load (median "
                    "tps, pooled latencies); D2 WAL settings everywhere; stock: fsync on; "
                    "Strata compute: fsync off, 3 safekeepers (2 must fsync), backpressure on "
                    "(16 MB write lag), the sidecars as processes of their own (as `strata "
                    "endpoint start` runs them); strata_pull: the same in pull mode (the "
                    "safekeepers replicate from the compute, ANY 2; backpressure as PullLimit); "
                    "stock_quorum3 "
                    "(informative: what a quorum of 3 costs stock PostgreSQL on this host): "
                    "three stock standbys, ANY 2, fsync on; targets (issue "
                    "13, against one standby): tps ratio >= 0.9, p99 ratio <= 1.5 at every "
                    "load; unsuffixed "
                    "figures: TPC-B at -c 4; load average after each load "
                    f"{', '.join(f'{x:.1f}' for x in loads)}")
        report.note(f"kill -9 rounds: {kill_rounds} per mode, push with a cut multi-page "
                    "record each, pull (_pull) without; every acknowledged transfer present "
                    "after each, WAL one valid chain; load "
                    f"average at the end {os.getloadavg()[0]:.1f}")

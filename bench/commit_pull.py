"""Issue 13's ceiling: how fast could commits be if the safekeepers pulled WAL from the
compute instead of a sidecar pushing it? An experiment, no production path: pgbench
(TPC-B and -N at 1, 4 and 8 clients) in alternating rounds against

- `sync_rep`: stock PostgreSQL with synchronous replication to one stock standby (the
  baseline of issue 13; primary and standby fsync on);
- `strata`: today's Strata compute (sidecar, 3 safekeepers, the pageserver following them,
  bench/safekeepers.py's `strata_compute`);
- `strata_nice`: the same on a second cluster whose pageserver runs with `nice = 10`
  (pageserver.toml, docs/walproposer.md "Cheap changes");
- `strata_pull`: a third cluster in pull mode (`commit_mode = "pull"`: the real
  safekeepers replicate from the compute on slots sk1..sk3, ANY 2; the sidecar elects and
  hands them the commit LSN and the backpressure limit, PullLimit), docs/walproposer.md "Pull mode";
- `pull3`: a primary with the compute's durability (fsync off) and three Python receivers,
  each a direct physical-replication standby of it on its own slot, and PostgreSQL's own
  quorum commit `synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)'`. A receiver is the
  dev-mode walreceiver child process (`python -m strata.pageserver.walreceiver_proc`: one
  Python process that appends, fsyncs and replies, as a safekeeper would);
- `pull1`: the same with one receiver (`synchronous_standby_names = 'sk1'`): what one
  Python standby costs against stock's C one.

No pageserver follows `pull3`/`pull1` (the Strata setup's ingest runs beside it), and no
term/election: this measures the commit path's shape only. Figures per setup and load:
median tps (ratio to `sync_rep` in the same run) and p50/p99 latency from pgbench --log.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.report import Report
from bench.safekeepers import (
    CLIENTS,
    STOCK_SETTINGS,
    WORKLOADS,
    _stock_sync_rep,
    _Target,
    strata_compute,
)
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer
from strata.pageserver.wal_log import WalLog


def _receiver(stack: contextlib.ExitStack, primary: PgServer, base: Path,
              name: str) -> None:
    """A physical slot `name` and a walreceiver_proc child streaming it into base/name."""
    start = Lsn.parse(primary.sql("select lsn::text from "
                                  "pg_create_physical_replication_slot(%s, true)", name)[0][0])
    wal_dir = base / name
    WalLog.open_or_create(wal_dir, start).close()
    config = {"host": primary.host, "port": primary.port, "slot_name": name,
              "application_name": name, "user": primary.superuser}
    log = open(base / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "strata.pageserver.walreceiver_proc", "--wal-dir",
         str(wal_dir), "--config", json.dumps(config), "--log-level", "WARNING"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
        start_new_session=True)  # as the tests' safekeepers run: as ourselves
    log.close()

    def stop() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # end of file: the child fsyncs and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)


def _pull(stack: contextlib.ExitStack, base: Path, receivers: int) -> PgServer:
    """A primary with the compute's durability (fsync off) committing on `receivers`
    Python standbys (any two of three, or the one)."""
    base.mkdir()
    ensure_traversable(base)
    names = [f"sk{i + 1}" for i in range(receivers)]
    standbys = f"ANY 2 ({', '.join(names)})" if receivers > 1 else names[0]
    primary = PgServer(base / "primary", log_path=base / "primary.log")
    primary.initdb()
    primary.start({**STOCK_SETTINGS, "fsync": False, "synchronous_standby_names": standbys})
    stack.callback(primary.stop, "immediate")
    for name in names:
        _receiver(stack, primary, base, name)
    state = "quorum" if receivers > 1 else "sync"
    deadline = time.monotonic() + 30
    while primary.sql("select count(*) from pg_stat_replication where sync_state = %s",
                      state)[0][0] != receivers:
        assert time.monotonic() < deadline, \
            f"the receivers in {base} never became synchronous:\n{primary.log_tail()}"
        time.sleep(0.1)
    return primary


def compare_in_rounds(report: Report, targets: Sequence[_Target], seconds: int, rounds: int,
                      per_load: Callable[[str, tuple[str, int]], None] | None = None
                      ) -> list[float]:
    """Every workload and client count of WORKLOADS x CLIENTS in `rounds` alternating
    rounds over `targets`; adds each target's tps, p50 and p99 against the first one
    (the baseline) per load, then each one's worst tps and p99 ratios. `per_load(tag,
    key)` adds a run's own figures after each load. Returns the load average after each."""
    loads: list[float] = []
    worst: dict[str, tuple[float, float]] = {t.name: (float("inf"), 0.0)
                                             for t in targets[1:]}
    base_name = targets[0].name
    for workload, args in WORKLOADS:
        for clients in CLIENTS:
            for round_no in range(rounds):
                for target in targets:
                    target.measure(seconds, round_no, workload, args, clients)
            loads.append(os.getloadavg()[0])
            key = (workload, clients)
            tag = f"{workload}_c{clients}"
            base_tps, base_p50, base_p99 = targets[0].result(key)
            report.add(f"tps_{base_name}_{tag}", base_tps, "tps")
            report.add(f"p50_ms_{base_name}_{tag}", base_p50, "ms")
            report.add(f"p99_ms_{base_name}_{tag}", base_p99, "ms")
            for target in targets[1:]:
                tps, p50, p99 = target.result(key)
                report.add(f"tps_{target.name}_{tag}", tps, "tps", base_tps)
                report.add(f"p50_ms_{target.name}_{tag}", p50, "ms", base_p50)
                report.add(f"p99_ms_{target.name}_{tag}", p99, "ms", base_p99)
                w_tps, w_p99 = worst[target.name]
                worst[target.name] = (min(w_tps, tps / base_tps), max(w_p99, p99 / base_p99))
            if per_load is not None:
                per_load(tag, key)
    for name, (w_tps, w_p99) in worst.items():
        report.add(f"tps_ratio_worst_{name}", w_tps, "x")
        report.add(f"p99_ratio_worst_{name}", w_p99, "x")
    return loads


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (5, 1) if quick else (8, 3)
    with tempfile.TemporaryDirectory(prefix="strata-bench-pull-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        rc = strata_compute(stack, base)[1]
        rc_nice = strata_compute(stack, base, "strata-nice", ["nice=10"])[1]
        rc_pull = strata_compute(stack, base, "strata-pull", pull=True)[1]
        targets = [_Target("sync_rep", _stock_sync_rep(stack, base), base / "sync-tx"),
                   _Target("strata", rc.compute.server, base / "strata-tx"),
                   _Target("strata_nice", rc_nice.compute.server, base / "strata-nice-tx"),
                   _Target("strata_pull", rc_pull.compute.server, base / "strata-pull-tx"),
                   _Target("pull3", _pull(stack, base / "pull3", 3), base / "pull3-tx"),
                   _Target("pull1", _pull(stack, base / "pull1", 1), base / "pull1-tx")]
        loads = compare_in_rounds(report, targets, seconds, rounds)
        assert rc.fenced == [] == rc_nice.fenced == rc_pull.fenced, \
            (rc.fenced, rc_nice.fenced, rc_pull.fenced)
        report.note(f"pgbench -s 1, TPC-B and -N, -c {'/'.join(map(str, CLIENTS))}, -T "
                    f"{seconds}, {rounds} alternating round(s) per setup and load (median tps, "
                    "pooled latencies); sync_rep: stock, one standby, fsync on; strata: "
                    "sidecar + 3 safekeepers + pageserver (strata_nice: its pageserver at "
                    "nice 10; strata_pull: pull mode, the safekeepers replicate from the "
                    "compute, backpressure as PullLimit); pull3: fsync-off primary, 3 Python "
                    "receivers, ANY 2; pull1: "
                    "the same, 1 receiver; load average "
                    f"after each load {', '.join(f'{x:.1f}' for x in loads)}")

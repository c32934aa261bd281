"""A/B of cheap changes on the commit path, on one running cluster: a Strata compute
(bench/safekeepers.py's `strata_compute`) runs pgbench rounds that alternate between
variants, each set on the live processes before its round, so that the shared machine's
load and disk hit all variants alike.

Variants (choose with `STRATA_COMMIT_AB=a,b[,...]`; the first is the baseline; default
`base,ps_nice`); the compute runs in push mode, or in pull mode (the default commit mode)
with `STRATA_COMMIT_AB_MODE=pull`:

- `base`: the defaults;
- `old`: no deferred safekeeper, commit-only appends at the first tick with nothing in
  flight (before the fifth round, docs/walproposer.md);
- `defer`: the safekeeper heard from least recently deferred to the tick
  (`QuorumConfig.defer_slowest`, off by default);
- `ps_nice`: the pageserver's threads (its WAL ingest, off the commit path) at nice 10,
  so that the sidecar and the safekeepers get a core first (the bench runs as root, so it
  can set them back to 0 for the other variants);
- `nostagger` (pull mode): the tick's commit-only appends to every safekeeper at once,
  not spread over the tick (`QuorumDriver.stagger_commits`);
- `tick100`, `tick200` (pull mode): the sidecar's tick at 100 or 200 ms instead of 50 ms.

Per variant and load (TPC-B and -N, 1, 4 and 8 clients): median tps (the baseline's is
the others' baseline), p50 and p99 transaction latency (pgbench --log, pooled over the
rounds), the safekeepers' WAL fsyncs per transaction (three summed), their messages per
transaction per safekeeper, and the quorum wait inside the sidecar.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.commit_path import _sk_counters
from bench.report import Report
from bench.safekeepers import CLIENTS, WORKLOADS, _pgbench, strata_compute
from strata.common.proc import ensure_traversable, make_dir_for, service_user
from strata.compute import walproposer

_PS_NICE = 10


def _renice(pid: int, value: int) -> None:
    """Every thread of `pid` at nice `value` (Linux nice values are per thread)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task), value)


def _variants(driver: walproposer.QuorumDriver, ps_pid: int
              ) -> dict[str, Callable[[], None]]:
    tick, stagger = driver.tick_s, driver.stagger_commits  # the defaults of this mode

    def setter(defer: bool, idle_s: float, ps_nice: int, *, stagger: bool = stagger,
               tick_s: float = tick) -> Callable[[], None]:
        def apply() -> None:
            driver.defer_slowest, driver.commit_only_idle_s = defer, idle_s
            driver.stagger_commits, driver.tick_s = stagger, tick_s
            _renice(ps_pid, ps_nice)
        return apply

    idle = walproposer._COMMIT_ONLY_IDLE_S
    return {"base": setter(False, idle, 0), "old": setter(False, 0.0, 0),
            "defer": setter(True, idle, 0), "ps_nice": setter(False, idle, _PS_NICE),
            "nostagger": setter(False, idle, 0, stagger=False),
            "tick100": setter(False, idle, 0, tick_s=0.1),
            "tick200": setter(False, idle, 0, tick_s=0.2)}


def _latencies(log_dir: Path, prefix: str) -> list[float]:
    """pgbench --log lines: client, transaction no, latency in microseconds, ..."""
    out: list[float] = []
    for path in log_dir.glob(f"{prefix}.*"):
        out += [int(line.split()[2]) / 1000.0
                for line in path.read_text().splitlines() if line.strip()]
        path.unlink()
    return out


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (4, 2) if quick else (8, 3)
    names = os.environ.get("STRATA_COMMIT_AB", "base,ps_nice").split(",")
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="strata-bench-ab-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        mode = os.environ.get("STRATA_COMMIT_AB_MODE", "push")
        assert mode in ("push", "pull"), f"STRATA_COMMIT_AB_MODE={mode}: push or pull"
        cluster, rc = strata_compute(stack, base, pull=mode == "pull")
        server = rc.compute.server
        _pgbench(server, "-i", "-s", "1", "-q")
        driver = rc.sidecar.driver
        assert driver is not None
        ps_proc = cluster.env.pageserver.proc
        assert ps_proc is not None
        variants = _variants(driver, ps_proc.pid)
        unknown = [n for n in names if n not in variants]
        assert not unknown, f"unknown variants {unknown}; choose from {sorted(variants)}"
        stack.callback(variants["base"])
        log_dir = make_dir_for(base / "tx", service_user(), 0o755)
        for workload, args in WORKLOADS:
            for clients in CLIENTS:
                figures: dict[str, dict[str, list[float]]] = {
                    name: {"tps": [], "fsyncs": [], "messages": [], "wait": [], "lat": []}
                    for name in names}
                for round_no in range(rounds):
                    for name in names:
                        variants[name]()
                        time.sleep(0.2)  # let the previous round's tail settle
                        sk0, st = _sk_counters(cluster), driver.stats
                        waits0, wait_s0 = st.quorum_waits, st.quorum_wait_s
                        prefix = f"{name}-{workload}-c{clients}-r{round_no}"
                        out = _pgbench(server, "-c", str(clients), "-j",
                                       str(min(clients, 2)), "-T", str(seconds), "-n", *args,
                                       "--log", f"--log-prefix={log_dir / prefix}")
                        sk1 = _sk_counters(cluster)
                        tps = re.search(r"tps = ([0-9.]+)", out)
                        done = re.search(r"processed: (\d+)", out)
                        assert tps and done, out
                        n = max(1, int(done.group(1)))
                        f = figures[name]
                        f["tps"].append(float(tps.group(1)))
                        f["fsyncs"].append((sk1["wal_fsyncs"] - sk0["wal_fsyncs"]) / n)
                        f["messages"].append((sk1["messages"] - sk0["messages"]) / 3 / n)
                        f["wait"].append(1000 * (st.quorum_wait_s - wait_s0)
                                         / max(1, st.quorum_waits - waits0))
                        f["lat"] += _latencies(log_dir, prefix)
                loads.append(os.getloadavg()[0])
                tag = f"{workload}_c{clients}"
                first = figures[names[0]]
                first_lat = sorted(first["lat"])
                for name in names:
                    f = figures[name]
                    lat = sorted(f["lat"])
                    assert lat, f"no pgbench transaction log for {name} {tag}"
                    is_base = name == names[0]
                    report.add(f"tps_{name}_{tag}", statistics.median(f["tps"]), "tps",
                               None if is_base else statistics.median(first["tps"]))
                    for q in (50, 99):
                        report.add(f"p{q}_ms_{name}_{tag}", _pct(lat, q), "ms",
                                   None if is_base else _pct(first_lat, q))
                    for key, metric, unit in (("fsyncs", "sk_fsyncs_per_txn", "fsyncs"),
                                              ("messages", "sk_messages_per_txn", "messages"),
                                              ("wait", "quorum_wait_ms", "ms")):
                        report.add(f"{metric}_{name}_{tag}", statistics.mean(f[key]), unit,
                                   None if is_base else statistics.mean(first[key]))
        assert rc.fenced == [], rc.fenced
        report.note(f"pgbench -s 1 on one Strata compute ({mode} mode), {rounds} rounds of "
                    f"{seconds} s per "
                    f"variant and load, variants alternating: {', '.join(names)} (baseline "
                    f"{names[0]}); load average after each load "
                    f"{', '.join(f'{x:.1f}' for x in loads)}")


def _pct(sorted_values: list[float], q: int) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]

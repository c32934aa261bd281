"""The sidecar's ways of sparing the safekeepers, with and without, on one running cluster:
a Strata compute (bench/safekeepers.py's `strata_compute`) runs pgbench rounds that
alternate between the two settings of its `QuorumDriver` (docs/walproposer.md, "Fifth
round"), so that the shared machine's load and disk hit both alike:

- `old`: no deferred safekeeper (WAL to all three at once), commit-only appends at the
  first tick with nothing in flight;
- `new`: the safekeeper heard from least recently deferred to the tick (off by default:
  `QuorumConfig.defer_slowest`), commit-only appends only after 100 ms without WAL (the
  default).

Per setting and load (TPC-B and -N, 1, 4 and 8 clients): median tps (the `new` figure's
baseline is `old`'s), the safekeepers' WAL fsyncs per transaction (three summed), their
messages per transaction per safekeeper, and the quorum wait inside the sidecar.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from bench.commit_path import _sk_counters
from bench.report import Report
from bench.safekeepers import CLIENTS, WORKLOADS, _pgbench, strata_compute
from strata.common.proc import ensure_traversable
from strata.compute import walproposer

SETTINGS = {"old": (False, 0.0), "new": (True, walproposer._COMMIT_ONLY_IDLE_S)}


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (4, 2) if quick else (8, 3)
    with tempfile.TemporaryDirectory(prefix="strata-bench-ab-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        cluster, rc = strata_compute(stack, base)
        server = rc.compute.server
        _pgbench(server, "-i", "-s", "1", "-q")
        driver = rc.sidecar.driver
        assert driver is not None
        for workload, args in WORKLOADS:
            for clients in CLIENTS:
                figures: dict[str, dict[str, list[float]]] = {
                    name: {"tps": [], "fsyncs": [], "messages": [], "wait": []}
                    for name in SETTINGS}
                for _ in range(rounds):
                    for name, (defer, idle_s) in SETTINGS.items():
                        driver.defer_slowest, driver.commit_only_idle_s = defer, idle_s
                        time.sleep(0.2)  # let the previous round's tail settle
                        sk0, st = _sk_counters(cluster), driver.stats
                        waits0, wait_s0 = st.quorum_waits, st.quorum_wait_s
                        out = _pgbench(server, "-c", str(clients), "-j",
                                       str(min(clients, 2)), "-T", str(seconds), "-n", *args)
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
                tag = f"{workload}_c{clients}"
                old, new = figures["old"], figures["new"]
                report.add(f"tps_old_{tag}", statistics.median(old["tps"]), "tps")
                report.add(f"tps_new_{tag}", statistics.median(new["tps"]), "tps",
                           statistics.median(old["tps"]))
                for key, unit in (("fsyncs", "fsyncs"), ("messages", "messages"),
                                  ("wait", "ms")):
                    name = {"fsyncs": "sk_fsyncs_per_txn", "messages": "sk_messages_per_txn",
                            "wait": "quorum_wait_ms"}[key]
                    report.add(f"{name}_old_{tag}", statistics.mean(old[key]), unit)
                    report.add(f"{name}_new_{tag}", statistics.mean(new[key]), unit,
                               statistics.mean(old[key]))
        assert rc.fenced == [], rc.fenced
        report.note(f"pgbench -s 1 on one Strata compute, {rounds} rounds of {seconds} s per "
                    "setting and load, settings alternating; old: no deferred safekeeper, "
                    "commit-only appends at the first idle tick; new: deferred safekeeper, "
                    "commit-only appends after 100 ms without WAL; load average at the end "
                    f"{os.getloadavg()[0]:.1f}")

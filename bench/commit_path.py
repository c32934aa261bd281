"""One commit's path through the safekeepers, hop by hop: a single client commits small
transactions one after another on a Strata compute (walproposer sidecar, 3 safekeepers,
pageserver following them) and, in the same run, on stock PostgreSQL with synchronous
replication to one standby (the baseline).

Hops (docs/walproposer.md, "Where a commit's time goes"):
- client: the commit as the client sees it (INSERT with autocommit, psycopg);
- quorum: inside the sidecar, from the WAL arriving from the walsender until the quorum's
  commit LSN covers it (appends out, two safekeepers' fsyncs, replies back;
  `QuorumDriver.stats`);
- safekeeper fsync: the mean WAL fsync on the safekeepers (`wal_fsync_seconds` /
  `wal_fsyncs` from their /metrics) and their control-file writes per commit;
- the rest (client minus quorum): PostgreSQL's own work, the walsender, the status update
  and the backend's wake-up;
- wake-ups: voluntary context switches (from /proc) per commit beyond the idle rate, of
  the same three (a thread hand-off, a blocking read, an fsync each count one);
- CPU (ms of user + system time from /proc) of the safekeepers (summed), the pageserver
  (with its children) and the sidecar's event-loop thread: per second while idle (timers,
  polls), and per commit beyond that: on 2 shared cores the wake-ups and per-message work
  of these processes are what a commit waits behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Report
from bench.safekeepers import _stock_sync_rep, strata_compute
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer

_METRICS = ("wal_fsyncs", "wal_fsync_seconds", "control_writes", "control_write_seconds",
            "batches", "messages")


def _commit_latencies_ms(server: PgServer, seconds: float) -> list[float]:
    """Single-row autocommit INSERTs one after another for `seconds`."""
    out: list[float] = []
    with server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS commit_path (id bigserial, v int)")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            conn.execute("INSERT INTO commit_path (v) VALUES (1)")
            out.append((time.perf_counter() - t0) * 1000)
    return out


def _sk_counters(cluster: Any) -> dict[str, float]:
    """The safekeepers' timeline counters, summed."""
    import urllib.request

    totals = dict.fromkeys(_METRICS, 0.0)
    for sk in cluster.safekeepers:
        with urllib.request.urlopen(f"http://127.0.0.1:{sk.http_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        for name in _METRICS:
            for m in re.finditer(rf"^safekeeper_timeline_{name}_total\{{[^}}]*\}} (\S+)$",
                                 text, re.M):
                totals[name] += float(m.group(1))
    return totals


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads) and its children, or of one
    thread of it."""
    if tid is not None:
        return _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")
    total = _stat_cpu_s(f"/proc/{pid}/stat")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                total += _cpu_s(int(child))
    return total


def _wakeups(pid: int, tid: int | None = None) -> int:
    """Voluntary context switches (blocking waits: a socket read, a thread hand-off, an
    fsync) of a process's live threads and its children, or of one thread of it."""
    if tid is not None:
        return _status_wakeups(f"/proc/{pid}/task/{tid}/status")
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += _status_wakeups(str(task / "status"))
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                total += _wakeups(int(child))
    return total


def _status_wakeups(path: str) -> int:
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)$", text, re.M)
    return int(m.group(1)) if m else 0


def _stat_cpu_s(path: str) -> float:
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(report: Report, quick: bool) -> None:
    seconds = 5.0 if quick else 20.0
    with tempfile.TemporaryDirectory(prefix="strata-bench-cp-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        stock = _stock_sync_rep(stack, base)
        cluster, rc = strata_compute(stack, base)
        strata = rc.compute.server
        _commit_latencies_ms(stock, 1.0)  # warm up both
        _commit_latencies_ms(strata, 1.0)

        stock_ms = _commit_latencies_ms(stock, seconds)
        driver = rc.sidecar.driver
        assert driver is not None
        before_sk = _sk_counters(cluster)
        before: dict[str, Any] = {k: getattr(driver.stats, k) for k in
                                  ("wal_pieces", "appends", "quorum_waits", "quorum_wait_s")}
        sk_pids = [sk.proc.pid for sk in cluster.safekeepers if sk.proc is not None]
        ps_proc = cluster.env.pageserver.proc
        assert ps_proc is not None
        sidecar_tid = cluster.loop.thread.native_id
        assert sidecar_tid is not None

        def cpu() -> tuple[float, float, float]:
            return (sum(map(_cpu_s, sk_pids)), _cpu_s(ps_proc.pid),
                    _cpu_s(os.getpid(), sidecar_tid))

        def wakeups() -> tuple[int, int, int]:
            return (sum(map(_wakeups, sk_pids)), _wakeups(ps_proc.pid),
                    _wakeups(os.getpid(), sidecar_tid))

        idle_s = 2.0
        idle_before, wake_idle_before = cpu(), wakeups()
        time.sleep(idle_s)
        cpu_before, wake_before = cpu(), wakeups()
        strata_ms = _commit_latencies_ms(strata, seconds)
        cpu_after, wake_after = cpu(), wakeups()
        after_sk = _sk_counters(cluster)
        st = driver.stats
        commits = len(strata_ms)
        d = {k: after_sk[k] - before_sk[k] for k in _METRICS}
        waits = st.quorum_waits - before["quorum_waits"]
        quorum_ms = 1000 * (st.quorum_wait_s - before["quorum_wait_s"]) / max(1, waits)
        client_ms = statistics.mean(strata_ms)

        report.add("client_commit_ms_mean", client_ms, "ms", statistics.mean(stock_ms))
        report.add("client_commit_ms_p50", _pct(strata_ms, 0.5), "ms", _pct(stock_ms, 0.5))
        report.add("client_commit_ms_p99", _pct(strata_ms, 0.99), "ms", _pct(stock_ms, 0.99))
        report.add("hop_quorum_ms_mean", quorum_ms, "ms", client_ms)
        report.add("hop_rest_ms_mean", client_ms - quorum_ms, "ms", client_ms)
        report.add("sk_wal_fsync_ms_mean",
                   1000 * d["wal_fsync_seconds"] / max(1, d["wal_fsyncs"]), "ms")
        report.add("sk_control_write_ms_mean",
                   1000 * d["control_write_seconds"] / max(1, d["control_writes"]), "ms")
        report.add("sk_control_writes_per_commit", d["control_writes"] / 3 / commits, "writes")
        report.add("sk_fsyncs_per_commit", d["wal_fsyncs"] / 3 / commits, "fsyncs")
        report.add("sk_messages_per_commit", d["messages"] / 3 / commits, "messages")
        report.add("sk_messages_per_batch", d["messages"] / max(1, d["batches"]), "messages")
        report.add("sidecar_wal_pieces_per_commit",
                   (st.wal_pieces - before["wal_pieces"]) / commits, "pieces")
        report.add("sidecar_appends_per_commit", (st.appends - before["appends"]) / commits,
                   "appends")
        for i, name in enumerate(("safekeepers", "pageserver", "sidecar")):
            idle = (cpu_before[i] - idle_before[i]) / idle_s  # CPU seconds per second
            report.add(f"cpu_ms_per_s_idle_{name}", 1000 * idle, "ms")
            report.add(f"cpu_ms_per_commit_{name}",
                       1000 * (cpu_after[i] - cpu_before[i] - idle * seconds) / commits, "ms")
            idle_wakes = (wake_before[i] - wake_idle_before[i]) / idle_s
            report.add(f"wakeups_per_commit_{name}",
                       (wake_after[i] - wake_before[i] - idle_wakes * seconds) / commits,
                       "switches")
        report.add("commits", commits, "commits", len(stock_ms))
        report.note(f"one client, autocommit single-row INSERTs for {seconds:g} s on each "
                    "setup; baseline: stock PostgreSQL with synchronous replication to one "
                    "standby (fsync on); Strata: 3 safekeepers, 2 must fsync; hop_rest = "
                    "PostgreSQL, walsender, status update and wake-up; load average "
                    f"{os.getloadavg()[0]:.1f}")
        assert rc.fenced == [], rc.fenced

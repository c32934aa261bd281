"""Where pull mode's commit time goes (issue 13): CPU per committed transaction of every
process on the commit path, and what the compute's backends and walsenders wait on, for

- `strata_pull`: a Strata cluster in pull mode (bench/safekeepers.py `strata_compute(...,
  pull=True)`: a full-mode compute, its sidecar in this process's event-loop thread, three
  safekeeper processes pulling on slots sk1..sk3 with `ANY 2`, a pageserver following
  them);
- `sk_pull3`: three safekeeper processes pulling from a plain fsync-off primary, hand
  elected, no sidecar, no pageserver (bench/sk_pull.py);
- more variants from `STRATA_PULL_PROFILE` (comma-separated, default
  `strata_pull,sk_pull3`): `strata_pull_nice` (the same cluster as strata_pull with its
  pageserver at `nice = 10`), `strata_pull_tick20` (the same with the sidecar's timer at
  20 ms, push mode's tick, instead of pull mode's 50 ms: its commit-only appends to the
  safekeepers go 2.5 times as often), `strata_pull_sk_nice` (the same with every
  safekeeper thread, and a safekeeper's own autogroup, at nice -10: the commit path ahead
  of the pageserver, the sidecar and the other helpers' work; needs root),
  `strata_pull_answer_each` (the same with the
  safekeepers' `--pull-answer-interval-ms 0`: an `AppendResponse` to the sidecar after every
  fsync batch of pulled WAL instead of at most one per 20 ms), `pull3` (three bare Python
  receivers, bench/commit_pull.py), `stock_sync1` (issue 13's baseline, what `bench/run
  safekeepers` compares against: stock PostgreSQL, fsync on, synchronous replication to one
  stock standby (bench/safekeepers.py `_stock_sync_rep`); its primary's walsender is
  `pg_walsender_other`, the standby's processes `standby_walreceiver`, `standby_startup`
  and `standby_other` (its postmaster, checkpointer, background writer)).

Each round runs pgbench (TPC-B and -N at -c 4; --quick: 8 s, 1 round; else 15 s, 2
rounds) on each setup in turn (alternating, so the other helpers' load hits them alike)
while a separate process samples `pg_stat_activity` every 20 ms. CPU comes from
/proc/PID/stat (user + system): the postmaster's children by kind (client backends that
exited are in the postmaster's reaped-children times; pull mode's sidecar watches the
compute on a plain session, `pg_sidecar_session`), the safekeepers, the pageserver
with its children, the sidecar's thread of this process, pgbench (this process's reaped
children minus the sampler) and the rest of the machine (/proc/stat busy time minus all
of these: mostly the other helpers on a shared machine). Figures: microseconds of CPU per
committed transaction (`cpu_us_per_tx_SETUP_LOAD_PROCESS`; `PROCESS_sys`: the part of a
Strata process's CPU spent in the kernel: fsync, sockets), tps, batches of pulled WAL per
committed transaction per safekeeper (`batches_per_tx_SETUP_LOAD`, from their
`safekeeper_timeline_pull_batches_total`: one fdatasync each), and the share of
samples per wait event (`wait_SETUP_LOAD_KIND_EVENT`, in % of that kind's samples).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.report import Report
from bench.safekeepers import _pgbench, strata_compute
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer
from strata.compute.quorum import DEFAULT_APPLICATION_NAME

LOADS: tuple[tuple[str, tuple[str, ...]], ...] = (("tpcb", ()), ("simple", ("-N",)))
CLIENTS = 4
SK_NICE = -10  # strata_pull_sk_nice: the safekeepers' nice value (set as root)
SAMPLE_INTERVAL_S = 0.02
SYS = "_sys"  # a service's kernel CPU, also counted in its total
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_SQL = ("select backend_type, coalesce(application_name, ''), "
              "coalesce(wait_event_type, ''), coalesce(wait_event, '') from pg_stat_activity "
              "where pid <> pg_backend_pid() and (backend_type = 'walsender' or "
              "(backend_type = 'client backend' and state = 'active'))")


def _stat(pid: int, tid: int | None = None) -> tuple[float, float, int, float] | None:
    """(own CPU s, reaped children's CPU s, parent pid, own system CPU s) of a process or
    one thread."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK, int(fields[1]), stime / TICK


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (by walking /proc once)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)] = st[2]
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in cpu[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


@dataclass
class Setup:
    """One setup under test: its compute, and the processes to account for."""

    name: str
    server: PgServer
    services: dict[str, list[int]]  # kind -> pids (with their descendants)
    threads: dict[str, int] = field(default_factory=dict)  # kind -> a thread of this process
    check: Callable[[], None] = lambda: None  # raises if the setup went wrong (fenced)
    # kind -> pids counted alone (not their descendants: a standby's postmaster, whose
    # children are counted by kind in `services`)
    alone: dict[str, list[int]] = field(default_factory=dict)
    # the safekeepers' HTTP ports (pull setups): batches of pulled WAL per transaction
    sk_http_ports: list[int] = field(default_factory=list)


def _postgres_kind(pid: int, walsender_names: dict[int, str]) -> str:
    cmd = _cmdline(pid)
    if "walsender" in cmd:
        name = walsender_names.get(pid, "")
        return "pg_walsender_sk" if re.fullmatch(r"sk\d+", name) else "pg_walsender_other"
    for kind in ("walwriter", "checkpointer", "background writer"):
        if kind in cmd:
            return "pg_" + kind.replace(" ", "")
    if "[local]" in cmd or "127.0.0.1" in cmd:
        return "pg_backends"
    return "pg_other"


class CpuMeter:
    """CPU seconds per kind of process between `__init__` and `stop()`."""

    def __init__(self, setup: Setup, sampler_pid: int) -> None:
        self.setup = setup
        self.sampler_pid = sampler_pid
        pm = setup.server.pid
        assert pm is not None, f"{setup.name}: the postmaster is not running"
        self.pm = pm
        self.walsender_names = {pid: name for pid, name in setup.server.sql(
            "select pid, coalesce(application_name, '') from pg_stat_activity "
            "where backend_type = 'walsender'")}
        # The sidecar's plain session (pull mode watches the compute on one): its own kind,
        # not a client backend that stop() would wait for.
        self.sidecar_sessions = {pid for (pid,) in setup.server.sql(
            "select pid from pg_stat_activity where backend_type = 'client backend' "
            "and application_name = %s", DEFAULT_APPLICATION_NAME)}
        self.start = self._snapshot()
        self.t0 = time.monotonic()

    def _snapshot(self) -> dict[tuple[str, int], tuple[str, float]]:
        """(kind, pid or -tid) -> (kind, CPU s); the postmaster's reaped children count
        as client backends (backends exit with their pgbench connection)."""
        snap: dict[tuple[str, int], tuple[str, float]] = {}
        st = _stat(self.pm)
        assert st is not None
        snap[("pg_postmaster", self.pm)] = ("pg_postmaster", st[0])
        snap[("pg_backends", -1)] = ("pg_backends", st[1])
        for pid in _children(self.pm):
            cst = _stat(pid)
            if cst is not None:
                kind = "pg_sampler" if pid == self.sampler_pid else \
                    "pg_sidecar_session" if pid in self.sidecar_sessions else \
                    _postgres_kind(pid, self.walsender_names)
                snap[(kind, pid)] = (kind, cst[0])
        for kind, pids in self.setup.services.items():
            for top in pids:
                for pid in [top, *_children(top)]:
                    sst = _stat(pid)
                    if sst is not None:
                        snap[(kind, pid)] = (kind, sst[0] + (sst[1] if pid == top else 0.0))
                        snap[(kind + SYS, pid)] = (kind + SYS, sst[3])
        for kind, pids in self.setup.alone.items():
            for pid in pids:
                ast = _stat(pid)
                if ast is not None:
                    snap[(kind, pid)] = (kind, ast[0])
        for kind, tid in self.setup.threads.items():
            tst = _stat(os.getpid(), tid)
            if tst is not None:
                snap[(kind, -tid)] = (kind, tst[0])
                snap[(kind + SYS, -tid)] = (kind + SYS, tst[3])
        return snap

    def stop(self) -> dict[str, float]:
        # pgbench has returned; its backends may still be exiting, and one that exits
        # between the postmaster's stat and the scan of its children would be lost.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                _postgres_kind(pid, self.walsender_names) == "pg_backends"
                for pid in _children(self.pm)
                if pid != self.sampler_pid and pid not in self.sidecar_sessions):
            time.sleep(0.02)
        end = self._snapshot()
        cpu: dict[str, float] = {}
        for key, (kind, secs) in end.items():
            before = self.start.get(key, (kind, 0.0))[1]
            # A pid that was not there at the start began during the run (a backend of
            # pgbench that is still exiting): all its CPU is the run's, as a backend.
            kind = kind if key in self.start or not kind.startswith("pg_") else "pg_backends"
            cpu[kind] = cpu.get(kind, 0.0) + secs - before
        return cpu


def _sampler(connstr: str, seconds: float) -> None:
    """Child process: sample pg_stat_activity, print the counts and own CPU as JSON."""
    import psycopg

    counts: Counter[str] = Counter()
    samples = 0
    with psycopg.connect(connstr, autocommit=True) as conn:
        print(json.dumps({"pid": conn.info.backend_pid}), flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples += 1
            for backend_type, app, etype, event in conn.execute(SAMPLE_SQL).fetchall():
                if backend_type == "walsender":
                    kind = "walsender_sk" if re.fullmatch(r"sk\d+", app) else "walsender_other"
                else:
                    kind = "backend"
                counts[f"{kind}|{etype}:{event}" if event else f"{kind}|CPU"] += 1
            time.sleep(SAMPLE_INTERVAL_S)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"samples": samples, "counts": counts,
                          "cpu_s": ru.ru_utime + ru.ru_stime}), flush=True)
        sys.stdin.read()  # its backend stays until the parent has read the CPU times


@dataclass
class Result:
    tps: list[float] = field(default_factory=list)
    transactions: int = 0
    batches: float = 0.0  # batches of pulled WAL applied, all safekeepers together
    cpu: dict[str, float] = field(default_factory=dict)
    waits: Counter[str] = field(default_factory=Counter)


def _pull_batches(http_ports: list[int]) -> float:
    """The safekeepers' `safekeeper_timeline_pull_batches_total`, summed (one fsync each)."""
    total = 0.0
    for port in http_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            total += sum(sample.value for sample in family.samples
                         if sample.name == "safekeeper_timeline_pull_batches_total")
    return total


def _profile(setup: Setup, seconds: int, args: tuple[str, ...], into: Result) -> None:
    sampler = subprocess.Popen(
        [sys.executable, "-m", "bench.pull_profile", "--sample", setup.server.connstr(),
         str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent)
    assert sampler.stdout is not None and sampler.stdin is not None
    ready = sampler.stdout.readline()
    assert ready, f"{setup.name}: the pg_stat_activity sampler did not start"
    meter = CpuMeter(setup, json.loads(ready)["pid"])
    batches0 = _pull_batches(setup.sk_http_ports)
    busy0 = _machine_busy_s()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = _pgbench(setup.server, "-c", str(CLIENTS), "-j", "2", "-T", str(seconds), "-n",
                   *args)
    sampled = json.loads(sampler.stdout.readline())
    cpu = meter.stop()
    into.batches += _pull_batches(setup.sk_http_ports) - batches0
    busy = _machine_busy_s() - busy0
    sampler.communicate(timeout=60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    setup.check()
    m = re.search(r"tps = ([0-9.]+)", out)
    n = re.search(r"number of transactions actually processed: (\d+)", out)
    assert m and n, out
    into.tps.append(float(m.group(1)))
    into.transactions += int(n.group(1))
    # pgbench and the sampler are this process's only children reaped in the meantime
    # (the sampler's CPU after its report, to disconnect and exit, counts as pgbench's).
    cpu["pgbench"] = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
                      - sampled["cpu_s"])
    cpu["machine_rest"] = busy - sum(v for k, v in cpu.items() if not k.endswith(SYS))
    for kind, secs in cpu.items():
        into.cpu[kind] = into.cpu.get(kind, 0.0) + secs
    into.waits.update(sampled["counts"])


def _strata_pull(stack: contextlib.ExitStack, base: Path, name: str,
                 overrides: list[str] | None = None, *, tick_s: float | None = None,
                 safekeeper_args: list[str] | None = None) -> Setup:
    cluster, rc = strata_compute(stack, base, name, overrides, pull=True,
                                 safekeeper_args=safekeeper_args)
    if tick_s is not None:
        deadline = time.monotonic() + 60
        while rc.sidecar.driver is None:  # the sidecar starts in the cluster's loop thread
            assert time.monotonic() < deadline, "the sidecar did not start its driver"
            time.sleep(0.05)
        rc.sidecar.driver.tick_s = tick_s  # read by its timer at every tick
    assert cluster.env.pageserver.proc is not None
    sks = [sk.proc.pid for sk in cluster.safekeepers if sk.proc is not None]
    thread = cluster.loop.thread.native_id
    assert thread is not None

    def check() -> None:
        assert rc.fenced == [], rc.fenced

    return Setup(name, rc.compute.server, {"safekeepers": sks,
                                           "pageserver": [cluster.env.pageserver.proc.pid]},
                 {"sidecar": thread}, check,
                 sk_http_ports=[sk.http_port for sk in cluster.safekeepers])


def _renice(pid: int, nice: int) -> None:
    """Every thread of `pid` (nice is per thread on Linux) and, when the process has an
    autogroup of its own (a session other than this process's), that autogroup too: with
    `kernel.sched_autogroup_enabled`, CPU is shared between autogroups first. Needs root
    for a negative value."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    group = Path(f"/proc/{pid}/autogroup")
    with contextlib.suppress(OSError):
        if group.read_text().split()[0] != Path("/proc/self/autogroup").read_text().split()[0]:
            group.write_text(str(nice))


def _stock_sync1(stack: contextlib.ExitStack, base: Path) -> Setup:
    """bench/safekeepers.py's stock_sync_rep: a stock primary (fsync on) replicating
    synchronously to one stock standby; the standby's processes by kind."""
    from bench.safekeepers import _stock_sync_rep

    primary = _stock_sync_rep(stack, base, 1, "stock_sync1-")
    pid_file = base / "stock_sync1-standby" / "postmaster.pid"
    standby_pm = int(pid_file.read_text().split()[0])
    services: dict[str, list[int]] = {"standby_walreceiver": [], "standby_startup": [],
                                      "standby_other": []}
    for pid in _children(standby_pm):
        cmd = _cmdline(pid)
        kind = "standby_walreceiver" if "walreceiver" in cmd else \
            "standby_startup" if "startup" in cmd else "standby_other"
        services[kind].append(pid)
    assert services["standby_walreceiver"] and services["standby_startup"], \
        f"stock_sync1: no walreceiver or startup process under the standby {standby_pm}"
    return Setup("stock_sync1", primary, services, alone={"standby_other": [standby_pm]})


def _setups(stack: contextlib.ExitStack, base: Path, names: list[str]) -> list[Setup]:
    from bench.commit_pull import _pull
    from bench.sk_pull import sk_pull_setup

    setups = []
    for name in names:
        if name == "strata_pull":
            setups.append(_strata_pull(stack, base, "strata_pull"))
        elif name == "strata_pull_nice":
            setups.append(_strata_pull(stack, base, "strata_pull_nice", ["nice=10"]))
        elif name == "strata_pull_sk_nice":
            setup = _strata_pull(stack, base, name)
            for pid in setup.services["safekeepers"]:
                _renice(pid, SK_NICE)
            setups.append(setup)
        elif name == "strata_pull_tick20":
            setups.append(_strata_pull(stack, base, "strata_pull_tick20", tick_s=0.02))
        elif name == "strata_pull_answer_each":
            setups.append(_strata_pull(stack, base, name,
                                       safekeeper_args=["--pull-answer-interval-ms", "0"]))
        elif name == "stock_sync1":
            setups.append(_stock_sync1(stack, base))
        elif name == "sk_pull3":
            primary, sks = sk_pull_setup(stack, base / "sk_pull3")
            setups.append(Setup(name, primary, {"safekeepers": [
                sk.proc.pid for sk in sks if sk.proc is not None]},
                sk_http_ports=[sk.http_port for sk in sks]))
        elif name == "pull3":
            primary = _pull(stack, base / "pull3", 3)
            assert primary.pid is not None
            # The receivers are children of this process, not of the postmaster.
            receivers = [int(p) for p in _children(os.getpid())
                         if "walreceiver_proc" in _cmdline(int(p))]
            setups.append(Setup(name, primary, {"receivers": receivers}))
        else:
            raise SystemExit(f"STRATA_PULL_PROFILE: unknown setup {name!r}")
    for setup in setups:
        _pgbench(setup.server, "-i", "-s", "1", "-q")
    return setups


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (8, 1) if quick else (15, 2)
    names = os.environ.get("STRATA_PULL_PROFILE", "strata_pull,sk_pull3").split(",")
    with tempfile.TemporaryDirectory(prefix="strata-bench-pullprof-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        setups = _setups(stack, base, names)
        loads: list[str] = []
        for workload, args in LOADS:
            results = {s.name: Result() for s in setups}
            for _ in range(rounds):
                for setup in setups:
                    _profile(setup, seconds, args, results[setup.name])
                    loads.append(f"{os.getloadavg()[0]:.1f}")
            tag = f"{workload}_c{CLIENTS}"
            for setup in setups:
                r = results[setup.name]
                report.add(f"tps_{setup.name}_{tag}", sorted(r.tps)[len(r.tps) // 2], "tps")
                if setup.sk_http_ports:  # per safekeeper: its fsyncs per transaction
                    report.add(f"batches_per_tx_{setup.name}_{tag}",
                               r.batches / len(setup.sk_http_ports) / r.transactions, "batches")
                for kind, secs in sorted(r.cpu.items()):
                    report.add(f"cpu_us_per_tx_{setup.name}_{tag}_{kind}",
                               secs / r.transactions * 1e6, "us")
                own = sum(v for k, v in r.cpu.items()
                          if k != "machine_rest" and not k.endswith(SYS))
                report.add(f"cpu_us_per_tx_{setup.name}_{tag}_total", own / r.transactions
                           * 1e6, "us")
                per_kind: Counter[str] = Counter()
                for key, count in r.waits.items():
                    per_kind[key.split("|")[0]] += count
                for key, count in sorted(r.waits.items(), key=lambda kv: -kv[1]):
                    kind, event = key.split("|")
                    share = 100.0 * count / per_kind[kind]
                    if share >= 1.0:
                        report.add(f"wait_{setup.name}_{tag}_{kind}_{event}", share, "%")
        report.note(f"pgbench -s 1 -c {CLIENTS} -j 2, TPC-B and -N, -T {seconds}, {rounds} "
                    f"alternating round(s) per setup ({', '.join(names)}); CPU from "
                    "/proc/PID/stat per kind of process, per committed transaction; "
                    "machine_rest: the machine's busy time not in these processes (other "
                    "work on the host); waits: pg_stat_activity every 20 ms, % of that "
                    "kind's samples (backend: active client backends; CPU = no wait event); "
                    f"load average after each round {', '.join(loads)}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--sample":
        _sampler(sys.argv[2], float(sys.argv[3]))
    else:
        raise SystemExit("usage: python -m bench.pull_profile --sample CONNSTR SECONDS "
                         "(the sampler child; run the benchmark with bench/run pull_profile)")

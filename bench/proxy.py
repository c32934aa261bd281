"""The proxy against direct connections, same run, same environment (`strata init`).

Two direct baselines: `unix`, the compute's unix socket (trusted: no TLS, no SCRAM; what
Strata's own tools use), and `tcp`, the compute's TCP port with SCRAM-SHA-256 (no TLS),
what a client that is not on the compute's machine would have without the proxy; and
`tls_direct`, the same TCP port with TLS (the bench turns `ssl` on in the compute with
the proxy's certificate), what a remote client would have, to compare TLS through the
proxy with. A compute started while the proxy runs does not listen on TCP, so the bench
restarts `main` once with the proxy stopped, which makes it listen on both.

- `connect_ms_{direct_tcp,direct_tls,tls_sni,plain_options}`: connect + `select 1` +
  close (median; the ways interleaved over 5 rounds), baseline: the same over the unix
  socket (a note gives the ratios to tcp and to tls_direct);
- `tps_{select_only,tpcb}_{direct_tcp,plain,tls}`: pgbench -c 4 -j 2, `-S` (tiny
  read-only transactions, the proxy's worst case) and the default TPC-B-like script
  (whose commits go through the safekeepers), at scale 4; the ways interleaved over the
  rounds; baseline: the unix socket (median TPS; a note gives each round's own ratios
  to unix and to tcp); `tps_{select_only,tpcb}_{plain,tls}_vs_tcp`: the same against
  the TCP baseline; `tps_{select_only,tpcb}_tls_vs_tls_direct`: TLS through the proxy
  against TLS direct;
- `proxy_cpu_us_per_tx_{select_only,tpcb}_{plain,tls}`: the proxy process's CPU time
  per transaction (independent of the machine's load, unlike the TPS ratio);
- `roundtrip_ms_{way}`: TPC-B's BEGIN latency (pgbench -r, median of rounds), one round
  trip through each way (the server does nothing for it), baseline: the tcp way's; a
  TPC-B transaction is 7 round trips and a commit, so this shows what the proxy adds to
  each (notes also give the baselines' TPS per round, their spread);
- `wake_s{N}`: connect to a suspended endpoint until the first query answers, at pgbench
  scale N (scale 1 ~ 15 MB; 320 ~ 5 GB), after `load_s{N}` seconds of `pgbench -i`
  (server-side data generation) through the proxy; notes give the start's phases and the
  proxy's own share from its log. Scales: env PROXY_WAKE_SCALES (comma-separated,
  default 1; a large scale loads through the safekeepers: hours at 320 here);
- `wake_import_s{N}`: the same wake (TLS, SNI, SCRAM, to the first row), median of 3,
  of an endpoint on a tenant imported from stock PostgreSQL's pgbench database at scale
  N (bench/_stockdb.py: built once, cached under /var/tmp; `strata tenant create
  --import-datadir`), the cheap way to the 5 GB point. Scales: env
  PROXY_WAKE_IMPORT_SCALES (default 320; --quick none);
- the A/B of the proxy's relays, same run: each of env PROXY_VARIANTS (comma-separated,
  default `tls_threads,plain_threads,plain_nice0,tls_nice0`, see VARIANTS; empty: none)
  is one more way through the proxy, restarted with that relay (or priority):
  `tps_{workload}_{variant}` (to unix), `..._vs_tls_direct` or `..._vs_tcp`,
  `proxy_cpu_us_per_tx_{workload}_{variant}`, and `tps_{workload}_{tls,plain}_vs_{variant}`:
  the default against it (a note gives each round's own ratio). Rounds: env
  PROXY_ROUNDS (default 3; --quick 2).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psycopg

from bench.report import Report

PASSWORD = "bench-password"


def _strata(repo: Path, *args: str, stdin: str | None = None,
            env: dict[str, str] | None = None) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "strata"), *args],
                         env={**os.environ, **(env or {}), "STRATA_REPO_DIR": str(repo)},
                         input=stdin,
                         capture_output=True, text=True, timeout=3600, check=False)
    if out.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def _dsns(repo: Path, endpoint: str) -> dict[str, str]:
    port = tomllib.loads((repo / "config.toml").read_text())["proxy"]["port"]
    common = f"port={port} user=strata dbname=strata password={PASSWORD}"
    return {"tls_sni": f"host={endpoint}.localhost hostaddr=127.0.0.1 {common} "
                       "sslmode=require",
            "plain_options": f"host=127.0.0.1 {common} sslmode=disable "
                             f"options=endpoint={endpoint}"}


def _connect_ms(dsn: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select 1").fetchone()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _connect_interleaved(dsns: dict[str, str], n: int, rounds: int = 5) -> dict[str, float]:
    """Median connect + `select 1` + close time (ms) of each way, `n` connects each, in
    `rounds` rounds with the ways' order rotated per round (the load drifts over all)."""
    times: dict[str, list[float]] = {way: [] for way in dsns}
    ways = list(dsns)
    for i in range(rounds):
        for way in ways[i % len(ways):] + ways[:i % len(ways)]:
            times[way] += _connect_ms(dsns[way], max(1, n // rounds))
    return {way: statistics.median(t) for way, t in times.items()}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (proc(5) stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WORKLOADS = {"select_only": ["-S"], "tpcb": []}


def _pgbench(dsn: str, args: list[str], seconds: int,
             proxy_pid: int) -> tuple[float, float, float]:
    """pgbench -c 4 -j 2 -r `args`: (tps, the proxy's CPU microseconds per transaction,
    the first statement's mean latency in ms: for TPC-B its BEGIN, a bare round trip)."""
    cpu = _cpu_s(proxy_pid)
    out = subprocess.run(["pgbench", "-n", "-r", *args, "-c", "4", "-j", "2", "-T",
                          str(seconds), dsn], capture_output=True, text=True,
                         timeout=seconds + 300, check=True)
    cpu = _cpu_s(proxy_pid) - cpu
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    n = re.search(r"number of transactions actually processed: ([0-9]+)", out.stdout)
    # -r: "statement latencies in milliseconds", one "  <ms>  <failures>  <command>" line
    # per statement (\set lines come first, with their own tiny latencies).
    lat = re.findall(r"^\s+([0-9.]+)\s+[0-9]+\s+([A-Za-z].*)$", out.stdout, re.MULTILINE)
    assert m is not None and n is not None and lat, out.stdout
    return float(m.group(1)), cpu * 1e6 / max(1, int(n.group(1))), float(lat[0][0])


def _wait_suspended(repo: Path, name: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        eps = json.loads(_strata(repo, "status", "--json"))["endpoints"]
        if next(e for e in eps if e["name"] == name)["state"] == "suspended":
            return
        assert time.monotonic() < deadline, f"endpoint {name} was not suspended"
        time.sleep(0.5)


def _endpoint(repo: Path, name: str) -> dict[str, str]:
    return next(e for e in json.loads(_strata(repo, "endpoint", "list", "--json"))
                if e["name"] == name)


VARIANTS = {"tls_threads": ("tls", {"STRATA_PROXY_TLS_RELAY": "threads"}),
            "plain_threads": ("plain", {"STRATA_PROXY_SOCKMAP": "0"}),
            "plain_sockmap": ("plain", {"STRATA_PROXY_SOCKMAP": "1"}),
            "plain_nice0": ("plain", {"STRATA_PROXY_NICE": "0"}),
            "tls_nice0": ("tls", {"STRATA_PROXY_NICE": "0"})}
"""The proxy's other relays, each run as one more way (the proxy restarted with its
environment for it): `tls_threads`, TLS relayed by a thread per direction on the proxy's
own TLS session (the default relay of sessions 24-27; the default `tls` is the event
loop's protocols on uvloop's TLS transport); `plain_threads`, plain connections relayed
by splice threads both ways (config `kernel_relay = false`); `plain_sockmap`, the
compute's bytes forwarded by a BPF sockmap (the default `plain` where the proxy may use
one: needs root; kept for environments whose config turns it off); `plain_nice0` and
`tls_nice0`, the default relays with the proxy at nice 0 (not at its own priority,
strata.proxy.main.PROXY_NICE)."""


DEFAULT_VARIANTS = "tls_threads,plain_threads,plain_nice0,tls_nice0"


class _Proxy:
    """The running proxy, restarted when a way needs another environment."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env: dict[str, str] = {}
        self.pid = int((repo / "run" / "proxy.pid").read_text())

    def use(self, env: dict[str, str]) -> int:
        if env != self.env:
            _strata(self.repo, "proxy", "stop")
            _strata(self.repo, "proxy", "start", env=env)
            self.env = env
            self.pid = int((self.repo / "run" / "proxy.pid").read_text())
        return self.pid


def _throughput(report: Report, repo: Path, targets: dict[str, str], quick: bool,
                variants: list[str]) -> None:
    """pgbench through each target, interleaved (rotated order per round) so that the
    machine's load drifts over all of them alike; `variants` (of VARIANTS) are more ways
    through the proxy, each with its relay."""
    seconds, rounds = (5, 2) if quick else (15, 3)
    rounds = int(os.environ.get("PROXY_ROUNDS", rounds))
    proxy = _Proxy(repo)
    targets = {**targets, **{v: targets[VARIANTS[v][0]] for v in variants}}
    ways = list(targets)
    for workload, args in WORKLOADS.items():
        tps: dict[str, list[float]] = {w: [] for w in ways}
        cpu: dict[str, list[float]] = {w: [] for w in ways}
        first: dict[str, list[float]] = {w: [] for w in ways}
        loads = []
        for i in range(rounds):
            for way in ways[i % len(ways):] + ways[:i % len(ways)]:
                proxy_pid = proxy.use(VARIANTS[way][1] if way in VARIANTS else {})
                t, c, f = _pgbench(targets[way], args, seconds, proxy_pid)
                tps[way].append(t)
                cpu[way].append(c)
                first[way].append(f)
            loads.append(os.getloadavg()[0])
        report.note(f"pgbench {' '.join(args) or '(TPC-B)'} -c 4 -j 2 -T {seconds} -r, "
                    f"{rounds} rounds; load average {min(loads):.1f}-{max(loads):.1f}")
        unix, tcp = statistics.median(tps["unix"]), statistics.median(tps["tcp"])
        for way in ("unix", "tcp", "tls_direct"):  # the baselines' own spread
            report.note(f"{workload} {way}: TPS per round "
                        + " ".join(f"{t:.0f}" for t in tps[way]))
        if workload == "tpcb":
            # BEGIN does nothing in the server: its latency is one round trip through
            # each way, which a TPC-B transaction makes 7 of (and the commit's wait).
            base_rt = statistics.median(first["tcp"])
            for way in ways:
                if way != "tcp":
                    report.add(f"roundtrip_ms_{way}", statistics.median(first[way]), "ms",
                               baseline=base_rt)
            report.add("roundtrip_ms_tcp", base_rt, "ms")
        report.add(f"tps_{workload}_direct_tcp", tcp, "tps", baseline=unix)
        tls_direct = statistics.median(tps["tls_direct"])
        report.add(f"tps_{workload}_direct_tls", tls_direct, "tps", baseline=unix)
        report.add(f"tps_{workload}_tls_vs_tls_direct", statistics.median(tps["tls"]), "tps",
                   baseline=tls_direct)
        for way in ("plain", "tls", *variants):
            to_unix = [t / d for t, d in zip(tps[way], tps["unix"], strict=True)]
            to_tcp = [t / d for t, d in zip(tps[way], tps["tcp"], strict=True)]
            report.note(f"{workload} {way}: per-round TPS ratios to unix "
                        + " ".join(f"{r:.2f}" for r in to_unix) + ", to tcp "
                        + " ".join(f"{r:.2f}" for r in to_tcp))
            median = statistics.median(tps[way])
            report.add(f"tps_{workload}_{way}", median, "tps", baseline=unix)
            report.add(f"tps_{workload}_{way}_vs_tcp", median, "tps", baseline=tcp)
            # Load-independent: what relaying costs (on a shared machine the TPS ratio
            # mostly measures how long each hop waits for a core).
            report.add(f"proxy_cpu_us_per_tx_{workload}_{way}", statistics.median(cpu[way]),
                       "us")
        for variant in variants:  # the A/B: the default relay against this one
            way = VARIANTS[variant][0]
            if way == "tls":
                report.add(f"tps_{workload}_{variant}_vs_tls_direct",
                           statistics.median(tps[variant]), "tps", baseline=tls_direct)
            report.add(f"tps_{workload}_{way}_vs_{variant}", statistics.median(tps[way]),
                       "tps", baseline=statistics.median(tps[variant]))
            report.note(f"{workload} {way} vs {variant}: per-round TPS ratios "
                        + " ".join(f"{a / b:.2f}" for a, b in zip(tps[way], tps[variant],
                                                                  strict=True)))
    proxy.use({})


def _direct_tls(repo: Path, main: dict[str, str], tmp: Path) -> None:
    """Turn TLS on in `main` (its own TCP port; pg_hba's `host` lines take TLS too), with
    the proxy's certificate, readable by the user PostgreSQL runs as."""
    owner = os.stat(main["socket_dir"]).st_uid
    for name in ("server.crt", "server.key"):
        copy = tmp / f"compute-{name}"
        copy.write_bytes((repo / "proxy" / name).read_bytes())
        os.chown(copy, owner, -1)
        copy.chmod(0o600)
    _, port = main["address"].rsplit(":", 1)
    with psycopg.connect(f"host={main['socket_dir']} port={port} user=postgres "
                         "dbname=postgres", autocommit=True) as conn:
        conn.execute(f"alter system set ssl_cert_file = '{tmp / 'compute-server.crt'}'")
        conn.execute(f"alter system set ssl_key_file = '{tmp / 'compute-server.key'}'")
        conn.execute("alter system set ssl = on")
        conn.execute("select pg_reload_conf()")


def _wake(report: Report, repo: Path, scale: int) -> None:
    name = f"s{scale}"
    _strata(repo, "timeline", "branch", name)
    _strata(repo, "endpoint", "create", name, "--branch", name, "--suspend-timeout-s", "2")
    dsn = _dsns(repo, name)["tls_sni"]
    t = time.monotonic()
    # G: the rows are made by the server (generate_series), not sent by pgbench.
    subprocess.run(["pgbench", "-i", "-q", "-I", "dtGvp", "-s", str(scale), dsn],
                   capture_output=True, timeout=4 * 3600, check=True)
    report.add(f"load_s{scale}", time.monotonic() - t, "s")
    _wait_suspended(repo, name)
    t = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select count(*) from pgbench_branches").fetchone()
        wake_s = time.monotonic() - t
        row = conn.execute("select pg_database_size(current_database())").fetchone()
    assert row is not None
    report.add(f"wake_s{scale}", wake_s, "s")
    report.add(f"db_mb_s{scale}", row[0] / 1e6, "MB")
    log = (repo / "logs" / "proxy.log").read_text().splitlines()
    woke = [line for line in log if f"woke endpoint {name} in" in line]
    if woke:  # the start's phases, as the proxy logged them
        report.note(woke[-1].split("woke ", 1)[1])
    own = [line for line in log if f"connection to endpoint {name} after its wake" in line]
    if own:  # the proxy's own share: the client's side and the compute login
        report.note(own[-1].split("after its wake: ", 1)[1])


def _wake_imported(report: Report, repo: Path, scale: int, tries: int = 3) -> None:
    from bench._stockdb import import_tenant, stock_pgbench_datadir

    db = stock_pgbench_datadir(scale)
    name = f"imp{scale}"
    import_s = import_tenant(repo, name, db, "--suspend-timeout-s", "2")
    report.note(f"import scale {scale}: {db.size_mb:.0f} MB imported in {import_s:.1f} s")
    _strata(repo, "role", "create", "strata", "--tenant", name, "--branch", "main",
            "--password-stdin", stdin=PASSWORD + "\n")
    # The imported tables are the superuser's: the role may read them (granted over the
    # unix socket, Strata's own way in); the first start after the import is not timed.
    _strata(repo, "endpoint", "start", name)
    ep = _endpoint(repo, name)
    with psycopg.connect(host=ep["socket_dir"], port=ep["address"].rsplit(":", 1)[1],
                         user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute("grant select on all tables in schema public to strata")
    _strata(repo, "endpoint", "stop", name)
    dsn = _dsns(repo, name)["tls_sni"].replace("dbname=strata", "dbname=postgres")
    wakes = []
    for _ in range(tries):
        _wait_suspended(repo, name)  # the proxy suspends it 2 s after its last client
        t = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("select count(*) from pgbench_branches").fetchone()
            wakes.append(time.monotonic() - t)
        assert row is not None and row[0] == scale, row
    report.add(f"wake_import_s{scale}", statistics.median(wakes), "s")
    report.note(f"wake_import_s{scale}: " + " ".join(f"{w:.2f}" for w in wakes)
                + f" s; load average {os.getloadavg()[0]:.1f}")
    log = (repo / "logs" / "proxy.log").read_text().splitlines()
    woke = [line for line in log if f"woke endpoint {name} in" in line]
    if woke:
        report.note(woke[-1].split("woke ", 1)[1])


def run(report: Report, quick: bool) -> None:
    scales = [int(s) for s in os.environ.get("PROXY_WAKE_SCALES", "1").split(",") if s]
    variants = [v for v in os.environ.get("PROXY_VARIANTS", DEFAULT_VARIANTS).split(",")
                if v]
    unknown = set(variants) - set(VARIANTS)
    assert not unknown, f"PROXY_VARIANTS: unknown {sorted(unknown)}; known {list(VARIANTS)}"
    imported = [int(s) for s in os.environ.get("PROXY_WAKE_IMPORT_SCALES",
                                               "" if quick else "320").split(",") if s]
    with tempfile.TemporaryDirectory(prefix="strata-bench-proxy-") as tmp:
        repo = Path(tmp) / "env"
        _strata(repo, "init")
        try:
            _strata(repo, "start")
            _strata(repo, "role", "create", "strata", "--password-stdin", stdin=PASSWORD + "\n")
            # With the proxy running a compute does not listen on TCP (issue 16): restart
            # main with the proxy stopped for the TCP baseline, then start the proxy.
            _strata(repo, "proxy", "stop")
            _strata(repo, "endpoint", "stop", "main")
            _strata(repo, "endpoint", "start", "main")
            _strata(repo, "proxy", "start")
            main = _endpoint(repo, "main")
            host, port = main["address"].rsplit(":", 1)
            unix = f"host={main['socket_dir']} port={port} user=strata dbname=strata"
            tcp = (f"host={host} port={port} user=strata dbname=strata password={PASSWORD} "
                   "sslmode=disable")
            _direct_tls(repo, main, Path(tmp))
            tls_direct = tcp.replace("sslmode=disable", "sslmode=require")
            report.note("baselines: 'unix', the compute's unix socket, trusted (no TLS, no "
                        "SCRAM); 'tcp', its TCP port with SCRAM (no TLS); 'tls_direct', that "
                        "port with TLS and SCRAM; the proxy's figures include SCRAM and, for "
                        "tls, TLS")
            dsns = _dsns(repo, "main")
            connect = _connect_interleaved({"unix": unix, "tcp": tcp, "tls": tls_direct,
                                            **dsns}, 20 if quick else 100)
            base, base_tcp = connect["unix"], connect["tcp"]
            report.add("connect_ms_direct_tcp", base_tcp, "ms", baseline=base)
            report.add("connect_ms_direct_tls", connect["tls"], "ms", baseline=base)
            for how in dsns:
                ms = connect[how]
                report.add(f"connect_ms_{how}", ms, "ms", baseline=base)
                report.note(f"connect_ms_{how}: {ms / base_tcp:.2f}x the tcp baseline"
                            + (f", {ms / connect['tls']:.2f}x tls_direct"
                               if how == "tls_sni" else ""))
            subprocess.run(["pgbench", "-i", "-q", "-s", "4", unix], capture_output=True,
                           timeout=3600, check=True)
            _throughput(report, repo, {"unix": unix, "tcp": tcp, "tls_direct": tls_direct,
                                       "plain": dsns["plain_options"],
                                       "tls": dsns["tls_sni"]}, quick, variants)
            if "forwarded by the kernel (BPF sockmap)" not in \
                    (repo / "logs" / "proxy.log").read_text():
                report.note("the proxy could not use a BPF sockmap here: plain (and "
                            "plain_sockmap) figures are the splice threads'")
            for scale in scales:
                _wake(report, repo, scale)
            for scale in imported:
                _wake_imported(report, repo, scale)
        finally:
            _strata(repo, "stop", "--immediate")

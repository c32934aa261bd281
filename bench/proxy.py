"""The proxy against direct connections, same run, same environment (`strata init`):

- `connect_ms_{tls_sni,plain_options}`: connect + `select 1` + close through the proxy
  to a running endpoint (median), baseline: the same directly to the compute over its
  unix socket (trusted: no SCRAM; computes do not listen on TCP while the proxy runs);
- `wake_s{N}`: connect to a suspended endpoint until the first query answers, at pgbench
  scale N (scale 1 ~ 15 MB; 340 ~ 5 GB, not in --quick); a note gives the start's phases
  from the proxy's log;
- `tps_select_only_{plain,tls}`: pgbench -S through the proxy, baseline: direct (the
  unix socket);
- `proxy_cpu_us_per_tx_{plain,tls}`: the proxy process's CPU time per transaction of
  those runs (independent of the machine's load, unlike the TPS ratio).
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


def _strata(repo: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "strata"), *args],
                         env={**os.environ, "STRATA_REPO_DIR": str(repo)}, input=stdin,
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


def _connect_ms(dsn: str, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select 1").fetchone()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (proc(5) stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pgbench(dsn: str, seconds: int, proxy_pid: int) -> tuple[float, float]:
    """pgbench -S: (tps, the proxy's CPU microseconds per transaction)."""
    cpu = _cpu_s(proxy_pid)
    out = subprocess.run(["pgbench", "-n", "-S", "-c", "4", "-j", "2", "-T", str(seconds),
                          dsn], capture_output=True, text=True, timeout=seconds + 300,
                         check=True)
    cpu = _cpu_s(proxy_pid) - cpu
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    n = re.search(r"number of transactions actually processed: ([0-9]+)", out.stdout)
    assert m is not None and n is not None, out.stdout
    return float(m.group(1)), cpu * 1e6 / max(1, int(n.group(1)))


def _wait_suspended(repo: Path, name: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        eps = json.loads(_strata(repo, "status", "--json"))["endpoints"]
        if next(e for e in eps if e["name"] == name)["state"] == "suspended":
            return
        assert time.monotonic() < deadline, f"endpoint {name} was not suspended"
        time.sleep(0.5)


def run(report: Report, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="strata-bench-proxy-") as tmp:
        repo = Path(tmp) / "env"
        _strata(repo, "init")
        try:
            _strata(repo, "start")
            _strata(repo, "role", "create", "strata", "--password-stdin", stdin=PASSWORD + "\n")
            # The compute's unix socket: with the proxy running a compute does not listen
            # on TCP (issue 16), and its socket is trusted (no SCRAM, unlike the proxy).
            main = next(e for e in json.loads(_strata(repo, "endpoint", "list", "--json"))
                        if e["name"] == "main")
            direct = (f"host={main['socket_dir']} port={main['address'].rsplit(':', 1)[1]} "
                      "user=strata dbname=strata")
            report.note("baseline 'direct': the compute's unix socket, trusted (no TLS, no "
                        "SCRAM); the proxy's figures include SCRAM and, for tls, TLS")
            dsns = _dsns(repo, "main")
            n = 20 if quick else 100
            base = _connect_ms(direct, n)
            for how, dsn in dsns.items():
                report.add(f"connect_ms_{how}", _connect_ms(dsn, n), "ms", baseline=base)
            scales = [1] if quick else [1, 340]
            seconds = 5 if quick else 30
            for scale in scales:
                _strata(repo, "timeline", "branch", f"s{scale}")
                _strata(repo, "endpoint", "create", f"s{scale}", "--branch", f"s{scale}",
                        "--suspend-timeout-s", "2")
                dsn = _dsns(repo, f"s{scale}")["tls_sni"]
                subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), dsn],
                               capture_output=True, timeout=7200, check=True)
                _wait_suspended(repo, f"s{scale}")
                t = time.monotonic()
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("select count(*) from pgbench_branches").fetchone()
                report.add(f"wake_s{scale}", time.monotonic() - t, "s")
                log = (repo / "logs" / "proxy.log").read_text().splitlines()
                woke = [line for line in log if f"woke endpoint s{scale} in" in line]
                if woke:  # the start's phases, as the proxy logged them
                    report.note(woke[-1].split("woke ", 1)[1])
                own = [line for line in log
                       if f"connection to endpoint s{scale} after its wake" in line]
                if own:  # the proxy's own share: the client's side and the compute login
                    report.note(own[-1].split("after its wake: ", 1)[1])
            subprocess.run(["pgbench", "-i", "-q", "-s", "1", direct], capture_output=True,
                           timeout=3600, check=True)
            proxy_pid = int((repo / "run" / "proxy.pid").read_text())
            base_tps, _ = _pgbench(direct, seconds, proxy_pid)
            for how, dsn in (("plain", dsns["plain_options"]), ("tls", dsns["tls_sni"])):
                tps, cpu_us = _pgbench(dsn, seconds, proxy_pid)
                report.add(f"tps_select_only_{how}", tps, "tps", baseline=base_tps)
                # Load-independent: what relaying costs (on a shared machine the TPS ratio
                # mostly measures how long each hop waits for a core).
                report.add(f"proxy_cpu_us_per_tx_{how}", cpu_us, "us")
        finally:
            _strata(repo, "stop", "--immediate")

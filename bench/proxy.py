"""The proxy against direct connections, same run, same environment (`strata init`):

- `connect_ms_{tls_sni,plain_options}`: connect + `select 1` + close through the proxy
  to a running endpoint (median), baseline: the same directly to the compute;
- `wake_s{N}`: connect to a suspended endpoint until the first query answers, at pgbench
  scale N (scale 1 ~ 15 MB; 340 ~ 5 GB, not in --quick);
- `tps_select_only_{plain,tls}`: pgbench -S through the proxy, baseline: direct.
"""

from __future__ import annotations

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


def _pgbench_tps(dsn: str, seconds: int) -> float:
    out = subprocess.run(["pgbench", "-n", "-S", "-c", "4", "-j", "2", "-T", str(seconds),
                          dsn], capture_output=True, text=True, timeout=seconds + 300,
                         check=True)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    assert m is not None, out.stdout
    return float(m.group(1))


def _wait_suspended(repo: Path, name: str) -> None:
    import json

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
            direct = _strata(repo, "start").strip().splitlines()[-1].split(": ", 1)[1]
            _strata(repo, "role", "create", "strata", "--password-stdin", stdin=PASSWORD + "\n")
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
            subprocess.run(["pgbench", "-i", "-q", "-s", "1", direct], capture_output=True,
                           timeout=3600, check=True)
            base_tps = _pgbench_tps(direct, seconds)
            report.add("tps_select_only_plain", _pgbench_tps(dsns["plain_options"], seconds),
                       "tps", baseline=base_tps)
            report.add("tps_select_only_tls", _pgbench_tps(dsns["tls_sni"], seconds), "tps",
                       baseline=base_tps)
        finally:
            _strata(repo, "stop", "--immediate")

"""The proxy's relay alone (no startup, no authentication): pgbench -S -c 4 through a bare
relay process (`bench/_relay_server.py`, TCP in, PostgreSQL's unix socket out), each of
`strata.proxy.relay`'s ways, runs interleaved (A B C A B C) so that the machine's load
drifts over all of them alike; baseline: pgbench directly on the unix socket.

- `relay_tps_<mode>`: median TPS over the rounds (ratio: to direct in the same rounds;
  a note gives each round's own ratio, the steadier figure on a loaded machine);
- `relay_cpu_us_per_tx_<mode>`: the relay process's CPU (/proc/PID/stat) per transaction.

Modes: `protocols` (asyncio protocols on uvloop), `threads` (a thread per direction,
os.splice through a pipe), `threads-copy` (a thread per direction, recv/send),
`sockmap` (the kernel forwards, a BPF sockmap, `strata.proxy.sockmap`; needs root); each
plain, and `protocols-tls` and `threads-tls` (sslmode=require, TLS ended at the relay,
as the proxy does: uvloop's TLS transport and the protocols, or the proxy's own session
and a thread per direction, `strata.proxy.tlsrelay`). Environment: RELAY_MODES (comma-separated,
default all), RELAY_CLIENTS (default 4).
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.proxy import _cpu_s
from bench.report import Report
from strata.common.proc import free_port
from strata.compute.pgserver import PgServer
from strata.proxy.tls import make_self_signed

MODES = ("protocols", "threads", "threads-copy", "sockmap", "protocols-tls", "threads-tls")


def _pgbench(dsn: str, seconds: int, clients: int) -> tuple[float, int]:
    out = subprocess.run(["pgbench", "-n", "-S", "-c", str(clients), "-j", "2",
                          "-T", str(seconds), dsn],
                         capture_output=True, text=True, timeout=seconds + 120, check=True)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    n = re.search(r"number of transactions actually processed: ([0-9]+)", out.stdout)
    assert m is not None and n is not None, out.stdout
    return float(m.group(1)), int(n.group(1))


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"relay on port {port} not listening"
            time.sleep(0.05)


def _through_relay(mode: str, socket_path: str, tls_dir: Path, seconds: int,
                   clients: int) -> tuple[float, float]:
    port = free_port("127.0.0.1")
    relay = subprocess.Popen([sys.executable, "-m", "bench._relay_server", "--mode",
                              mode.removesuffix("-tls"), "--port", str(port),
                              "--socket", socket_path, "--tls-dir", str(tls_dir)],
                             cwd=Path(__file__).parent.parent)
    sslmode = "require" if mode.endswith("-tls") else "disable"
    try:
        _wait_listening(port)
        cpu = _cpu_s(relay.pid)
        tps, n = _pgbench(f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
                          f"sslmode={sslmode}", seconds, clients)
        return tps, (_cpu_s(relay.pid) - cpu) * 1e6 / max(1, n)
    finally:
        relay.terminate()
        relay.wait(10)


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (5, 3) if quick else (10, 5)
    clients = int(os.environ.get("RELAY_CLIENTS", "4"))
    modes = os.environ.get("RELAY_MODES", ",".join(MODES)).split(",")
    with tempfile.TemporaryDirectory(prefix="strata-bench-relay-") as tmp:
        tls_dir = Path(tmp) / "tls"
        make_self_signed(tls_dir, "localhost")
        pg = PgServer(Path(tmp) / "pgdata")
        pg.initdb()
        pg.start({"max_connections": 50})
        try:
            socket_path = str(pg.socket_dir / f".s.PGSQL.{pg.port}")
            direct = f"host={pg.socket_dir} port={pg.port} user=postgres dbname=postgres"
            subprocess.run(["pgbench", "-i", "-q", "-s", "1", direct], capture_output=True,
                           timeout=600, check=True)
            tps: dict[str, list[float]] = {m: [] for m in ("direct", *modes)}
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            for i in range(rounds):
                tps["direct"].append(_pgbench(direct, seconds, clients)[0])
                for mode in modes[i % len(modes):] + modes[:i % len(modes)]:  # rotated
                    t, c = _through_relay(mode, socket_path, tls_dir, seconds, clients)
                    tps[mode].append(t)
                    cpu[mode].append(c)
            report.note(f"pgbench -S -c {clients} -j 2 -T {seconds}, {rounds} rounds; load "
                        f"average {os.getloadavg()[0]:.1f}")
            base = statistics.median(tps["direct"])
            for mode in modes:
                # Each round's ratio to that round's direct run: steadier than the ratio
                # of medians when the load drifts between rounds.
                paired = [t / d for t, d in zip(tps[mode], tps["direct"], strict=True)]
                report.note(f"{mode}: per-round TPS ratios to direct "
                            + " ".join(f"{r:.2f}" for r in paired)
                            + f" (median {statistics.median(paired):.2f})")
                report.add(f"relay_tps_{mode}", statistics.median(tps[mode]), "tps",
                           baseline=base)
                report.add(f"relay_cpu_us_per_tx_{mode}", statistics.median(cpu[mode]), "us")
        finally:
            pg.stop()

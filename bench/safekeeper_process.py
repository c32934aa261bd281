"""Three safekeeper processes (`python -m strata.safekeeper`) on this machine, driven by the
walproposer's `QuorumDriver` with generated PostgreSQL 15 WAL (tests/sim/walgen.py).

- `commit_latency_p50_ms` / `_p99_ms`: one small record (100 bytes) appended, then wait until
  the quorum commits it, one at a time: a round of messages plus one WAL fsync on two of the
  three safekeepers. Baseline: one 8 KB write + fsync in the same directory (the floor).
- `append_mb_per_s`: 8 KB records appended as fast as the proposer's window allows, until
  all of it is committed. Baseline: the same bytes written and fsynced in 128 KB pieces by
  one process (what the disk does without the protocol and the three processes).
- `append_fsyncs_per_mb`: WAL fsyncs per MB on one safekeeper during that phase. Baseline:
  proposer messages per MB it handled (one fsync each without batching).
- `restart_recovery_s`: a safekeeper with that WAL stopped and started again until it
  answers (it decodes and checks all the WAL it holds).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.walproposer import QuorumDriver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from test_safekeeper import PREV, SEG, START, Sk, quorum  # noqa: E402

from sim.walgen import SYSID, WalGenerator  # noqa: E402


def _fsync_floor(directory: Path, rounds: int) -> float:
    """Median ms of one 8 KB append + fsync."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            os.write(fd, bytes(8192))
            os.fsync(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


def _disk_mb_per_s(directory: Path, total: int) -> float:
    path = directory / "write-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = bytes(128 << 10)
    t0 = time.perf_counter()
    try:
        for _ in range(total // len(chunk)):
            os.write(fd, chunk)
            os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return total / (1 << 20) / (time.perf_counter() - t0)


def _counters(sk: Sk) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sk.http_port}/metrics") as resp:
        text = resp.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.endswith("_total")}


async def _wait_commit(driver: QuorumDriver, lsn: int) -> None:
    async with asyncio.timeout(120):
        while driver.commit_lsn.value < lsn:
            assert driver.fenced is None, driver.fenced
            await asyncio.sleep(0.0005)


def run(report: Report, quick: bool) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-sk-"))
    nodes = [Sk(i + 1, base / f"sk{i + 1}") for i in range(3)]
    for sk in nodes:
        sk.start()
    try:
        tenant, timeline = TenantId.generate(), TimelineId.generate()
        for sk in nodes:
            sk.create(tenant, timeline)
        gen = WalGenerator(START.value, PREV.value, SEG)
        rng = random.Random(0)
        commits = 100 if quick else 500
        total = (8 if quick else 64) << 20

        async def scenario() -> tuple[list[float], float, dict[str, float]]:
            driver = QuorumDriver(quorum(nodes, tenant, timeline), SYSID)
            driver.start()
            try:
                async with asyncio.timeout(30):
                    await driver.elected_event.wait()
                latencies = []
                for _ in range(commits):
                    _, data = gen.record(rng.randbytes(100))
                    t0 = time.perf_counter()
                    driver.append_wal(data)
                    await _wait_commit(driver, gen.end_lsn)
                    latencies.append((time.perf_counter() - t0) * 1000)
                start = gen.end_lsn
                before = await asyncio.to_thread(_counters, nodes[0])
                t0 = time.perf_counter()
                while gen.end_lsn - start < total:
                    _, data = gen.record(rng.randbytes(8000))
                    driver.append_wal(data)
                    if gen.end_lsn - driver.commit_lsn.value > (4 << 20):
                        await asyncio.sleep(0.001)  # let the window drain
                await _wait_commit(driver, gen.end_lsn)
                rate = (gen.end_lsn - start) / (1 << 20) / (time.perf_counter() - t0)
                after = await asyncio.to_thread(_counters, nodes[0])
                delta = {k: after[k] - before.get(k, 0) for k in after}
                return latencies, rate, delta
            finally:
                await driver.stop()

        latencies, rate, delta = asyncio.run(scenario())
        latencies.sort()
        floor = _fsync_floor(base, 50)
        report.add("commit_latency_p50_ms", statistics.median(latencies), "ms", baseline=floor)
        report.add("commit_latency_p99_ms", latencies[int(len(latencies) * 0.99) - 1], "ms",
                   baseline=floor)
        report.add("append_mb_per_s", rate, "MB/s", baseline=_disk_mb_per_s(base, total))
        mb = total / (1 << 20)
        report.add("append_fsyncs_per_mb", delta["safekeeper_timeline_wal_fsyncs_total"] / mb,
                   "fsyncs/MB", baseline=delta["safekeeper_timeline_messages_total"] / mb)
        nodes[0].stop()
        t0 = time.perf_counter()
        nodes[0].start()
        report.add("restart_recovery_s", time.perf_counter() - t0, "s")
        held = Lsn(gen.end_lsn) - START
        report.note(f"{held / (1 << 20):.1f} MB of WAL held per safekeeper at the restart; "
                    f"{commits} single-record commits; 3 processes on one machine")
    finally:
        for sk in nodes:
            sk.kill9()

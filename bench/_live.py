"""Shared pieces of the live benchmarks (bench/ingest, bench/basebackup): pgbench runs,
a live pageserver with computes on it, lag sampling and series statistics.

Not a benchmark itself (the runner skips modules starting with `_`).
"""

from __future__ import annotations

import bisect
import io
import os
import re
import sys
import threading
import time
import urllib.request
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.pgserver import PgServer
from strata.pageserver.client import PageserverClient
from strata.pg.walreader import read_wal_files

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures_env import Env, PageserverProcess  # noqa: E402

__all__ = ["Env", "PageserverProcess", "Sample", "LagSampler", "BlockCounts", "pgbench",
           "tps_of", "wal_lsn", "wait_caught_up", "slope", "scrape", "load_note", "Counter"]

MB = 1e6


def pgbench(server: PgServer, *args: str) -> str:
    out = server.run_tool("pgbench", "-h", server.host, "-p", str(server.port), "-U",
                          server.superuser, *args, "postgres")
    return out.stdout.decode() + out.stderr.decode()


def tps_of(output: str) -> float:
    m = re.search(r"tps = ([0-9.]+)", output)
    assert m, f"no tps in pgbench output:\n{output}"
    return float(m.group(1))


def wal_lsn(server: PgServer) -> int:
    """The server's current WAL insert position, as a plain int."""
    return Lsn.parse(server.sql("select pg_current_wal_insert_lsn()::text")[0][0]).value


def wait_caught_up(client: PageserverClient, tenant: TenantId, timeline: TimelineId,
                   target: int, timeout_s: float) -> float:
    """Wait until the pageserver's last_record_lsn reaches the page of `target` (a compute
    position that may lie past the last record's end by a page header); returns seconds."""
    t0 = time.monotonic()
    goal = Lsn(target).page_start().value
    while client.timeline(tenant, timeline).last_record_lsn.value < goal:
        if time.monotonic() - t0 > timeout_s:
            info = client.timeline(tenant, timeline)
            raise AssertionError(f"pageserver at {info.last_record_lsn} did not reach "
                                 f"{Lsn(target)} in {timeout_s}s")
        time.sleep(0.05)
    return time.monotonic() - t0


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the sampler started
    compute_lsn: int
    last_record_lsn: int
    disk_consistent_lsn: int

    @property
    def lag(self) -> int:
        return max(0, self.compute_lsn - self.last_record_lsn)

    @property
    def disk_lag(self) -> int:
        return max(0, self.compute_lsn - self.disk_consistent_lsn)


class LagSampler(threading.Thread):
    """Every `interval_s`, the pageserver's timeline status and then the compute's insert
    LSN (that order over-states the lag by what one query takes, never under-states it)."""

    def __init__(self, compute: PgServer, client: PageserverClient, tenant: TenantId,
                 timeline: TimelineId, interval_s: float = 1.0) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.compute, self.client = compute, client
        self.tenant, self.timeline = tenant, timeline
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample_now(self, conn: psycopg.Connection[Any]) -> Sample:
        info = self.client.timeline(self.tenant, self.timeline)
        row = conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        s = Sample(time.monotonic() - self.t0, Lsn.parse(row[0]).value,
                   info.last_record_lsn.value, info.disk_consistent_lsn.value)
        self.samples.append(s)
        return s

    def run(self) -> None:
        try:
            with self.compute.connect() as conn:
                next_t = time.monotonic()
                while not self._halt.is_set():
                    self.sample_now(conn)
                    next_t += self.interval_s
                    self._halt.wait(max(0.0, next_t - time.monotonic()))
        except BaseException as err:  # noqa: BLE001 - reported by stop()
            self.error = err

    def stop(self) -> list[Sample]:
        self._halt.set()
        self.join(30)
        if self.error is not None:
            raise AssertionError(f"lag sampler failed: {self.error!r}") from self.error
        return self.samples


class BlockCounts:
    """Cumulative block references (one page version each in the pageserver: every block
    reference carries an image under wal_consistency_checking=all, see ingest.py) and
    records by record end LSN, read from a compute's pg_wal with our WAL reader."""

    def __init__(self, pg_wal: Path, start: int, end: int) -> None:
        self.ends = array("q")
        self.blocks = array("q")
        self.records = array("q")
        blocks = records = 0
        for record in read_wal_files(pg_wal, start=Lsn(start), end=Lsn(end)):
            blocks += len(record.blocks)
            records += 1
            self.ends.append(record.end_lsn)
            self.blocks.append(blocks)
            self.records.append(records)

    def at(self, lsn: int) -> tuple[int, int]:
        """(blocks, records) of the records ending at or before `lsn`."""
        i = bisect.bisect_right(self.ends, lsn)
        return (self.blocks[i - 1], self.records[i - 1]) if i else (0, 0)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def load_note(when: str) -> str:
    """The host's load averages: the figures are only as quiet as the machine was."""
    one, five, fifteen = os.getloadavg()
    return (f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f} "
            f"on {os.cpu_count()} CPUs (other processes share them)")


def scrape(client: PageserverClient) -> dict[str, float]:
    """The pageserver's Prometheus metrics, each name summed over its label sets."""
    url = f"http://{client.host}:{client.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? (\S+)$", line)
        if m and not line.startswith("#"):
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


class Counter(io.RawIOBase):
    """A write-only sink that counts bytes (the tar is measured, not stored)."""

    def __init__(self) -> None:
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.bytes += len(data)
        return len(data)

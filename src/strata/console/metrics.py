"""The console's charts: a sampler that scrapes the services' Prometheus `/metrics` every
few seconds and keeps the last hour: a ring of samples in memory, appended one JSON line
each to ENV/console-metrics.jsonl so that a restarted console shows the hour before it
(the file is rewritten with only the ring once it holds twice the window; a torn last
line after a crash is skipped).

Each sample holds, summed over the timelines of the environment:

    wal_ingested_bytes   pageserver: WAL applied since it started (a counter: the chart
                         shows its rate)
    getpage_requests     pageserver: page service requests answered (a counter: rate)
    commit_lsn, ingested_lsn  per timeline, the safekeepers' highest commit LSN and the
                         pageserver's last_record_lsn; commit_lag_bytes is their gap summed
    ingest_lag_bytes     pageserver: WAL received but not yet applied
    layers, layer_bytes  pageserver: layer files of every timeline, and their bytes
    connections          per running endpoint, its client backends (pg_stat_activity),
                         not counting the sidecar's own session (pull mode's watch)

`parse_sample` is pure (text in, numbers out) so the arithmetic is tested without servers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from strata.compute.quorum import DEFAULT_APPLICATION_NAME
from strata.control.endpoints import running_pid, superuser_connect
from strata.control.env import Environment, WalMode

log = logging.getLogger(__name__)
INTERVAL_S = 5.0
WINDOW_S = 3600.0
SCRAPE_TIMEOUT_S = 5.0
SAMPLES_FILE = "console-metrics.jsonl"


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    wal_ingested_bytes: float | None = None
    getpage_requests: float | None = None
    ingest_lag_bytes: float | None = None
    commit_lag_bytes: float | None = None
    layers: float | None = None
    layer_bytes: float | None = None
    connections: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "wal_ingested_bytes": self.wal_ingested_bytes,
                "getpage_requests": self.getpage_requests,
                "ingest_lag_bytes": self.ingest_lag_bytes,
                "commit_lag_bytes": self.commit_lag_bytes, "layers": self.layers,
                "layer_bytes": self.layer_bytes, "connections": dict(self.connections)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        def number(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(float(data["at"]), number("wal_ingested_bytes"), number("getpage_requests"),
                   number("ingest_lag_bytes"), number("commit_lag_bytes"), number("layers"),
                   number("layer_bytes"),
                   {str(k): int(v) for k, v in dict(data.get("connections") or {}).items()})


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


def parse_sample(at: float, pageserver_text: str | None, safekeeper_texts: Iterable[str],
                 connections: dict[str, int]) -> Sample:
    """One sample from the pageserver's and the safekeepers' /metrics texts (None or
    missing: that service did not answer, its figures are None)."""
    if pageserver_text is None:
        return Sample(at, connections=connections)
    ingested = getpage = lag = layers = layer_bytes = 0.0
    last_record: dict[tuple[str, str], float] = {}
    for name, labels, value in _samples(pageserver_text):
        ids = (labels.get("tenant_id", ""), labels.get("timeline_id", ""))
        if name == "strata_pageserver_wal_ingested_bytes_total":
            ingested += value
        elif name == "strata_pageserver_page_requests_total":
            getpage += value
        elif name == "strata_pageserver_ingest_lag_bytes":
            lag += value
        elif name == "strata_pageserver_layer_count":
            layers += value
        elif name == "strata_pageserver_layer_bytes":
            layer_bytes += value
        elif name == "strata_pageserver_timeline_lsn" and labels.get("kind") == "last_record":
            last_record[ids] = value
    commit: dict[tuple[str, str], float] = {}
    for text in safekeeper_texts:
        for name, labels, value in _samples(text):
            if name == "safekeeper_timeline_commit_lsn":
                ids = (labels.get("tenant_id", ""), labels.get("timeline_id", ""))
                commit[ids] = max(commit.get(ids, 0.0), value)
    commit_lag = sum(max(0.0, lsn - last_record[ids]) for ids, lsn in commit.items()
                     if ids in last_record)
    return Sample(at, ingested, getpage, lag, commit_lag, layers, layer_bytes, connections)


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def connection_counts(env: Environment) -> dict[str, int]:
    out: dict[str, int] = {}
    for ep in env.read_state().endpoints.values():
        if running_pid(env, ep.name) is None:
            continue
        try:
            with superuser_connect(env, ep) as conn:
                row = conn.execute("select count(*) from pg_stat_activity where "
                                   "backend_type = 'client backend' and pid <> "
                                   "pg_backend_pid() and application_name <> %s",
                                   (DEFAULT_APPLICATION_NAME,)).fetchone()
        except psycopg.Error:
            continue  # stopping or starting: no figure this time
        out[ep.name] = int(row[0]) if row else 0
    return out


class Sampler:
    """Scrapes every `interval_s` into a ring covering `WINDOW_S`."""

    def __init__(self, env: Environment, interval_s: float = INTERVAL_S) -> None:
        self.env = env
        self.interval_s = interval_s
        self.ring: deque[Sample] = deque(maxlen=int(WINDOW_S / interval_s) + 1)
        self.path = env.root / SAMPLES_FILE
        self._lines = 0
        self._load()

    def _load(self) -> None:
        """The samples of the last hour a previous console run stored."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return
        cutoff = time.time() - WINDOW_S
        for line in lines:
            try:
                sample = Sample.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line torn by a crash, or from an older format
            if sample.at >= cutoff:
                self.ring.append(sample)
        self._lines = len(lines)

    def _store(self, sample: Sample) -> None:
        if self._lines >= 2 * (self.ring.maxlen or 1):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(s.to_json()) + "\n" for s in self.ring))
            os.replace(tmp, self.path)
            self._lines = len(self.ring)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(sample.to_json()) + "\n")
        self._lines += 1

    def sample_now(self) -> Sample:
        """One scrape (blocking: run it in a thread)."""
        config = self.env.config()
        ps = config.pageserver
        ps_text = _get(f"http://{ps.host}:{ps.http_port}/metrics")
        sk_texts = [t for sk in config.safekeepers
                    if config.wal_mode is WalMode.SAFEKEEPERS
                    and (t := _get(f"http://{sk.host}:{sk.http_port}/metrics")) is not None]
        sample = parse_sample(time.time(), ps_text, sk_texts, connection_counts(self.env))
        self.ring.append(sample)
        try:
            self._store(sample)
        except OSError as err:
            log.warning("metrics: could not store a sample in %s: %s", self.path, err)
        return sample

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sample_now)
            except Exception as err:  # noqa: BLE001 - a bad scrape must not end the charts
                log.warning("metrics sample failed: %s: %s", type(err).__name__, err)
            await asyncio.sleep(self.interval_s)

    def series(self, since_s: float) -> list[dict[str, Any]]:
        cutoff = time.time() - since_s
        return [s.to_json() for s in self.ring if s.at >= cutoff]

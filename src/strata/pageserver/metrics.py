"""The pageserver's Prometheus metrics, served as text at `GET /metrics`.

Each `Pageserver` has its own `CollectorRegistry` (so tests may run several in one
process). Two kinds of figures:

- events counted where they happen: GetPage-class request latency (histogram per request
  kind), HTTP requests, compaction and GC runs (counts, durations, layers written or
  removed, expired leases), background job failures;
- state read at scrape time by `TimelineCollector` from the live timelines: ingested WAL
  bytes (a counter, so `rate()` is the ingest rate), ingest lag (WAL received but not yet
  applied), LSNs, layer counts and bytes, live leases.

Names are `strata_pageserver_*`; docs/pageserver.md lists them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strata.storage.timeline import Timeline

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Page reads are tens of microseconds in memory, milliseconds from cold layer files, and
# up to wait_lsn_timeout_s when a request waits for WAL: buckets span all three.
GETPAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True, slots=True)
class TimelineState:
    """What the collector reads of one timeline (and its WAL path) at scrape time."""

    timeline: Timeline
    received_lsn: int | None
    """End of the WAL durably received for this timeline (its log's flush LSN), if known."""
    start_lsn: int
    """last_record_lsn when this process started serving the timeline."""


class TimelineCollector(Collector):
    """Reads the live timelines at scrape time (`states` returns them)."""

    def __init__(self, states: Callable[[], Iterable[TimelineState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant_id", "timeline_id"]
        ingested = CounterMetricFamily(
            "strata_pageserver_wal_ingested_bytes",
            "WAL bytes applied to the timeline since this process started (rate() = ingest "
            "rate)", labels=labels)
        lag = GaugeMetricFamily(
            "strata_pageserver_ingest_lag_bytes",
            "WAL durably received but not yet applied (received LSN - last_record_lsn)",
            labels=labels)
        lsns = GaugeMetricFamily("strata_pageserver_timeline_lsn",
                                 "LSNs of the timeline as byte positions",
                                 labels=[*labels, "kind"])
        layers = GaugeMetricFamily("strata_pageserver_layer_count",
                                   "Layer files of the timeline", labels=[*labels, "kind"])
        layer_bytes = GaugeMetricFamily("strata_pageserver_layer_bytes",
                                        "Bytes of the timeline's layer files",
                                        labels=[*labels, "kind"])
        leases = GaugeMetricFamily("strata_pageserver_live_leases",
                                   "Live LSN leases of the timeline", labels=labels)
        remote_reads = CounterMetricFamily(
            "strata_pageserver_remote_reads",
            "Reads of layers not on local disk since the timeline's remote client started: "
            "ranged GETs and their bytes, layers opened for ranged reads, whole layers "
            "downloaded and their bytes, reads that waited for a running whole download",
            labels=[*labels, "kind"])
        broken = GaugeMetricFamily("strata_pageserver_timeline_broken",
                                   "1 if the timeline is broken (reads refused)",
                                   labels=labels)
        for state in self._states():
            tl = state.timeline
            ids = [str(tl.tenant_id), str(tl.timeline_id)]
            last = tl.last_record_lsn.value
            ingested.add_metric(ids, max(0, last - state.start_lsn))
            received = state.received_lsn if state.received_lsn is not None else last
            lag.add_metric(ids, max(0, received - last))
            for kind, value in (("last_record", last), ("received", received),
                                ("disk_consistent", tl.disk_consistent_lsn.value),
                                ("gc_cutoff", tl.gc_cutoff.value)):
                lsns.add_metric([*ids, kind], value)
            counts = {"delta": 0, "image": 0}
            sizes = {"delta": 0, "image": 0}
            for desc in tl.layers():
                kind = "delta" if desc.is_delta else "image"
                counts[kind] += 1
                sizes[kind] += _file_size(tl, desc.file_name())
            for kind in ("delta", "image"):
                layers.add_metric([*ids, kind], counts[kind])
                layer_bytes.add_metric([*ids, kind], sizes[kind])
            leases.add_metric(ids, len(tl.leases.live(tl.clock())))
            broken.add_metric(ids, 1 if tl.broken_reason is not None else 0)
            stats = getattr(tl.remote, "read_stats", None)
            if stats is not None:
                for kind in ("ranged_gets", "ranged_bytes", "ranged_opens", "layer_downloads",
                             "layer_download_bytes"):
                    remote_reads.add_metric([*ids, kind], getattr(stats, kind))
                remote_reads.add_metric([*ids, "download_waits"], tl.download_waits)
        yield from (ingested, lag, lsns, layers, layer_bytes, leases, broken, remote_reads)


def _file_size(timeline: Timeline, name: str) -> int:
    try:
        return os.stat(timeline.dir / name).st_size
    except FileNotFoundError:
        return 0  # removed by GC between listing and stat


class PageserverMetrics:
    """The registry of one pageserver and the event metrics its parts update."""

    def __init__(self, states: Callable[[], Iterable[TimelineState]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.getpage_seconds = Histogram(
            "strata_pageserver_getpage_seconds",
            "Time to answer one page service request (including the wait for its LSN)",
            ["request"], buckets=GETPAGE_BUCKETS, registry=r)
        self.page_requests = Counter("strata_pageserver_page_requests",
                                     "Page service requests answered",
                                     ["request", "outcome"], registry=r)
        self.http_requests = Counter("strata_pageserver_http_requests",
                                     "HTTP management API requests",
                                     ["method", "route", "status"], registry=r)
        self.compaction_runs = Counter("strata_pageserver_compaction_runs",
                                       "Compaction runs of a timeline", ["trigger", "outcome"],
                                       registry=r)
        self.compaction_seconds = Histogram("strata_pageserver_compaction_seconds",
                                            "Duration of one timeline's compaction",
                                            buckets=JOB_BUCKETS, registry=r)
        self.image_layers_created = Counter("strata_pageserver_image_layers_created",
                                            "Image layers written by compaction", registry=r)
        self.gc_runs = Counter("strata_pageserver_gc_runs", "GC runs of a tenant",
                               ["trigger", "outcome"], registry=r)
        self.gc_seconds = Histogram("strata_pageserver_gc_seconds",
                                    "Duration of one tenant's GC", buckets=JOB_BUCKETS,
                                    registry=r)
        self.gc_layers_removed = Counter("strata_pageserver_gc_layers_removed",
                                         "Layer files deleted by GC", registry=r)
        self.leases_expired = Counter("strata_pageserver_leases_expired",
                                      "LSN leases found expired (and dropped) by GC",
                                      registry=r)
        self.ticks = Counter("strata_pageserver_timeline_ticks",
                             "Periodic timeline ticks (freeze old layers, flush)",
                             ["outcome"], registry=r)
        r.register(TimelineCollector(states))

    def render(self) -> bytes:
        return generate_latest(self.registry)

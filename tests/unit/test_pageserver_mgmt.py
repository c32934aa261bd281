"""Pure parts of the pageserver as a service: config limits, tenant config from JSON, the
background scheduler over a real in-process repository, and the timeline metrics."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.timestamp import parse_past_timestamp_us, parse_timestamp_us
from strata.pageserver.background import BackgroundWork
from strata.pageserver.config import PageserverConfig, tenant_config_from_json
from strata.pageserver.metrics import PageserverMetrics, TimelineState
from strata.pg.relfile import RelTag
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image

REL = RelTag(1663, 5, 16384, 0)


@pytest.mark.parametrize("override, fragment", [
    ("background_jobs=0", "background_jobs"),
    ("max_tenants=0", "max_tenants"),
    ("max_timelines_per_tenant=-1", "max_timelines_per_tenant"),
    ("tick_period_s=0", "tick_period_s"),
    ("max_request_body_bytes=10", "max_request_body_bytes"),
    ('default_tenant_conf.gc_horizon="lots"', "gc_horizon"),
])
def test_new_keys_are_validated_by_name(tmp_path: Path, override: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        PageserverConfig.load(tmp_path, [override])


def test_new_keys_override(tmp_path: Path) -> None:
    conf = PageserverConfig.load(tmp_path, ["background_jobs=2", "tick_period_s=0.5",
                                            "max_tenants=7"])
    assert (conf.background_jobs, conf.tick_period_s, conf.max_tenants) == (2, 0.5, 7)


def test_tenant_config_from_json_merges_and_checks_types() -> None:
    base = TenantConfig(gc_horizon=5)
    conf = tenant_config_from_json(base, {"gc_period_s": 10, "image_creation_threshold": 2})
    assert (conf.gc_horizon, conf.gc_period_s, conf.image_creation_threshold) == (5, 10, 2)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"nope": 1}, "nope"), ({"gc_horizon": 1.5}, "integer"),
        ({"gc_period_s": "1"}, "number"), ({"gc_period_s": True}, "number"),
        ({"pitr_interval_s": 1e300}, "at most"), ({"checkpoint_distance": 0}, "> 0")]
    for bad, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            tenant_config_from_json(base, bad)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["gc_horizon", "gc_period_s", "lease_length_s", "zz"]),
                       st.none() | st.booleans() | st.integers() | st.floats() | st.text()
                       | st.lists(st.integers(), max_size=2)))
def test_tenant_config_from_json_only_raises_user_errors(data: dict[str, object]) -> None:
    try:
        tenant_config_from_json(TenantConfig(), data)
    except UserError:
        pass


def test_parse_timestamp() -> None:
    assert parse_timestamp_us("1970-01-01T00:00:01Z") == 1_000_000
    assert parse_timestamp_us("1970-01-01 01:00:00.5+01:00") == 500_000
    for bad in ("yesterday", "2026-13-01", ""):
        with pytest.raises(UserError, match="timestamp"):
            parse_timestamp_us(bad)


def test_future_timestamp_is_refused() -> None:
    """A time after now would silently resolve to the head: refused, saying so."""
    assert parse_past_timestamp_us("1970-01-01T00:00:02Z", now_s=2.0) == 2_000_000
    with pytest.raises(UserError, match="in the future"):
        parse_past_timestamp_us("1970-01-01T00:00:02.000001Z", now_s=2.0)


# --- background work over a real repository -------------------------------------------------
def _tenant_with_data(tmp_path: Path, **conf: object) -> tuple[Repository, Tenant, Timeline]:
    repo = Repository(tmp_path)
    tenant = repo.create_tenant(TenantId(os.urandom(16)), TenantConfig(**conf))  # type: ignore[arg-type]
    tl = tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(0x100))
    for i in range(1, 4):
        tl.put_rel_page(REL, 0, Lsn(0x100 * (i + 1)), Image(bytes([i]) * 8192))
        tl.finish_record(Lsn(0x100 * (i + 1)), Lsn(0x100 * i))
    return repo, tenant, tl


def test_scheduler_runs_ticks_compaction_and_gc(tmp_path: Path) -> None:
    # checkpoint_timeout 0.05 s: the tick freezes and flushes the open layer by itself.
    repo, tenant, tl = _tenant_with_data(tmp_path, compaction_period_s=0.1, gc_period_s=0.1,
                                         checkpoint_timeout_s=0.05,
                                         image_creation_threshold=1)
    metrics = PageserverMetrics(lambda: [])

    async def scenario() -> None:
        work = BackgroundWork(lambda: dict(repo.tenants), metrics, max_jobs=1,
                              tick_period_s=0.02)
        work.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if (_value(metrics, "strata_pageserver_gc_runs_total") >= 2
                    and _value(metrics, "strata_pageserver_compaction_runs_total") >= 2
                    and tl.disk_consistent_lsn == tl.last_record_lsn):
                break
        await work.stop()

    asyncio.run(scenario())
    assert tl.disk_consistent_lsn == Lsn(0x400), "the tick did not flush the old layer"
    assert _value(metrics, "strata_pageserver_compaction_runs_total") >= 2
    assert _value(metrics, "strata_pageserver_gc_runs_total") >= 2
    assert _value(metrics, "strata_pageserver_timeline_ticks_total") >= 1
    assert tl.get_rel_page(REL, 0, Lsn(0x400)) == bytes([3]) * 8192
    repo.close()


def test_exclusive_waits_for_a_running_job_and_holds_off_new_ones(tmp_path: Path) -> None:
    repo, tenant, _tl = _tenant_with_data(tmp_path)
    metrics = PageserverMetrics(lambda: [])
    order: list[str] = []

    async def scenario() -> None:
        work = BackgroundWork(lambda: dict(repo.tenants), metrics, max_jobs=2,
                              tick_period_s=3600)
        async with work.exclusive(tenant.tenant_id):
            gc = asyncio.create_task(work.run_gc(tenant))
            await asyncio.sleep(0.1)
            assert not gc.done(), "GC ran while the tenant was held exclusively"
            order.append("exclusive")
        await gc
        order.append("gc")

    asyncio.run(scenario())
    assert order == ["exclusive", "gc"]
    assert _value(metrics, "strata_pageserver_gc_runs_total") == 1
    repo.close()


def test_timeline_collector_reports_lag_layers_and_leases(tmp_path: Path) -> None:
    repo, tenant, tl = _tenant_with_data(tmp_path)
    tl.flush()
    tl.leases.lease(Lsn(0x300), 60, tl.clock(), tl.gc_cutoff)
    metrics = PageserverMetrics(lambda: [TimelineState(tl, received_lsn=0x500,
                                                       start_lsn=0x200)])
    text = metrics.render().decode()
    ids = f'tenant_id="{tenant.tenant_id}",timeline_id="{tl.timeline_id}"'
    assert f"strata_pageserver_wal_ingested_bytes_total{{{ids}}} 512.0" in text
    assert f"strata_pageserver_ingest_lag_bytes{{{ids}}} 256.0" in text
    assert f'strata_pageserver_layer_count{{kind="delta",{ids}}} 1.0' in text
    size = re.search(rf'strata_pageserver_layer_bytes\{{kind="delta",{ids}\}} (\S+)', text)
    assert size and float(size.group(1)) > 0
    assert f"strata_pageserver_live_leases{{{ids}}} 1.0" in text
    assert f'strata_pageserver_timeline_lsn{{kind="disk_consistent",{ids}}} 1024.0' in text
    repo.close()


def _value(metrics: PageserverMetrics, name: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_a_job_waiting_on_a_deleted_tenant_does_nothing(tmp_path: Path) -> None:
    repo, tenant, _tl = _tenant_with_data(tmp_path)
    metrics = PageserverMetrics(lambda: [])

    async def scenario() -> dict[TimelineId, object]:
        work = BackgroundWork(lambda: dict(repo.tenants), metrics, max_jobs=1,
                              tick_period_s=3600)
        async with work.exclusive(tenant.tenant_id):
            gc = asyncio.create_task(work.run_gc(tenant))
            await asyncio.sleep(0.05)
            repo.delete_tenant(tenant.tenant_id)
        return dict(await gc)

    assert asyncio.run(scenario()) == {}
    assert _value(metrics, "strata_pageserver_gc_runs_total") == 0


def test_read_gate_keeps_gc_apart_from_reads() -> None:
    from strata.pageserver.background import ReadGate

    async def scenario() -> list[str]:
        gate = ReadGate()
        events: list[str] = []
        release = asyncio.Event()

        async def long_read() -> None:
            async with gate.shared():
                events.append("read starts")
                await release.wait()
                events.append("read ends")

        async def gc(timeout_s: float) -> None:
            async with gate.exclusive(timeout_s) as alone:
                events.append("gc runs" if alone else "gc put off")

        reader = asyncio.create_task(long_read())
        await asyncio.sleep(0.01)
        await gc(0.05)  # the read holds the gate past the timeout
        waiting = asyncio.create_task(gc(5))
        await asyncio.sleep(0.01)
        async with gate.shared():  # a GC that waits does not block new reads
            events.append("short read")
        release.set()
        await reader
        await waiting
        return events

    assert asyncio.run(scenario()) == ["read starts", "gc put off", "short read", "read ends",
                                       "gc runs"]

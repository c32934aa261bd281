"""LSN leases (D5) against GC in the real pageserver process with a real PostgreSQL 15.

A lease on L keeps GC's cutoff at or below L, so a read-only compute started at L reads
what was there; once the lease expires (and is reported: GET says 404, GC counts it), GC
moves past L and deletes the layers that only reads at L needed, and reads at L are
refused.
"""

from __future__ import annotations

import io
import re
import time

import pytest
from fixtures_env import Env
from test_e2e_compute import assert_balances, assert_same_dump, pg_dump, pgbench

from strata.common.errors import NotFound, StrataError, UserError
from strata.common.lsn import Lsn
from strata.pageserver.page_client import PageClientSync

LEASE_S = 20.0  # covers GC and two lease lookups (renewed just before GC)
TENANT_CONF = {"gc_horizon": 0, "pitr_interval_s": 0, "image_creation_threshold": 1,
               "gc_period_s": 3600, "compaction_period_s": 3600}


def test_lease_holds_gc_then_gc_proceeds_after_expiry(env: Env) -> None:
    c = env.client
    tenant, tl = c.create_tenant(config=TENANT_CONF)
    compute = env.start_compute(tenant, tl)
    compute.sql("create table t (id int primary key, v text)")
    compute.sql("insert into t select g, 'old' from generate_series(1, 2000) g")
    leased = c.checkpoint(tenant, tl).last_record_lsn

    granted = c.lease(tenant, tl, leased, LEASE_S)
    assert not granted.renewed and granted.expires_at > time.time() + LEASE_S - 5
    # The page service's lease request lands in the same table: a renewal.
    with PageClientSync("127.0.0.1", env.pageserver.pg_port, tenant, tl) as pc:
        expiry = pc.lease(leased, 1.0)
    assert expiry == pytest.approx(granted.expires_at)  # a renewal never shortens a lease
    assert c.lease(tenant, tl, leased, LEASE_S).renewed

    for _ in range(3):
        compute.sql("update t set v = 'new'")
    after = c.checkpoint(tenant, tl)
    assert after.disk_consistent_lsn > leased
    assert c.compact(tenant, tl) > 0

    # Renewed just before GC, so the steps above, slow on a loaded machine, cannot have
    # outlasted it: GC and the lease lookups below run within a fresh LEASE_S.
    c.lease(tenant, tl, leased, LEASE_S)
    held = c.gc(tenant)[tl]
    assert Lsn.parse(held["cutoff"]) == leased, held
    assert c.timeline(tenant, tl).gc_cutoff == leased
    live = c.get_lease(tenant, tl, leased)
    assert live.lsn == leased
    assert time.time() < live.expires_at, f"GC took longer than the {LEASE_S}s lease; raise LEASE_S"
    # No GC runs until the one below: the leased LSN stays readable.
    reader = env.start_compute(tenant, tl, lsn=leased, read_only=True)
    assert reader.sql("select v, count(*) from t group by v") == [("old", 2000)]

    # Expiry: reported by the lease lookup, then by GC, which now passes the LSN.
    time.sleep(max(0.0, live.expires_at - time.time()) + 0.2)
    with pytest.raises(NotFound, match="expired"):
        c.get_lease(tenant, tl, leased)
    freed = c.gc(tenant)[tl]
    assert freed["expired_leases"] == 1, freed
    assert Lsn.parse(freed["cutoff"]) > leased, freed
    assert freed["layers_removed"] > 0, freed
    assert re.search(r"^strata_pageserver_leases_expired_total 1\.0$", c.metrics_text(), re.M)

    # What only a reader at the old LSN needed is gone: such reads and leases are refused.
    with pytest.raises(StrataError, match="collected|GC cutoff"):
        c.basebackup(tenant, tl, io.BytesIO(), leased, read_only=True)
    with pytest.raises(UserError, match="below the GC cutoff"):
        c.lease(tenant, tl, leased, LEASE_S)
    # The present is intact.
    assert compute.sql("select v, count(*) from t group by v") == [("new", 2000)]
    env.allowed_log_errors.append("garbage collected|GC cutoff")


def test_background_maintenance_under_load_keeps_pages_exact(env: Env) -> None:
    """Ticks, compaction and GC every second while pgbench writes (1 MB layers, images
    after every delta, no history kept): a new compute afterwards sees exactly the data
    the old one had, and the background work did run (metrics)."""
    c = env.client
    tenant, tl = c.create_tenant(config={
        "gc_horizon": 0, "pitr_interval_s": 0, "image_creation_threshold": 1,
        "checkpoint_distance": 1 << 20, "checkpoint_timeout_s": 2.0, "gc_period_s": 1.0,
        "compaction_period_s": 1.0})
    compute = env.start_compute(tenant, tl)
    pgbench(compute, "-i", "-s", "2", "-q")
    pgbench(compute, "-c", "2", "-T", "8", "-n")
    assert assert_balances(compute) > 0
    dump = pg_dump(compute)
    text = c.metrics_text()

    def scheduled(name: str) -> float:
        found = re.search(rf'^strata_pageserver_{name}_runs_total\{{outcome="ok",'
                          rf'trigger="schedule"\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    assert scheduled("compaction") >= 3 and scheduled("gc") >= 3, text[-3000:]
    assert 'outcome="error"' not in text
    info = c.timeline(tenant, tl)
    assert info.gc_cutoff > Lsn(0)  # GC did advance while the load ran
    compute.stop("fast")
    again = env.start_compute(tenant, tl)
    assert_same_dump(dump, pg_dump(again))

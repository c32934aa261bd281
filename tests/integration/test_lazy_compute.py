"""Issue 9 end to end: lazy computes (D6) run on the pageserver through the FUSE file system.

The checks of test_e2e_compute.py run with lazy computes: pgbench balances, pg_dump
equality across restarts and branches, truncate and regrowth, the golden page check;
then what only lazy mode has: the smallest shared_buffers (pages are evicted and read
back all the time), the most aggressive GC while a compute holds its lease, kill -9 of
the FUSE server and of PostgreSQL (no committed row lost), and a full local disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_env import APP_NAME, COMPUTE_SETTINGS, SLOT, Env, wait_until
from test_e2e_compute import (
    assert_balances,
    assert_same_dump,
    check_golden,
    dumps,
    pg_dump,
    pgbench,
    run_everything,
    wait_ingested,
)

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import ComputeConfig
from strata.compute.lazy import LazyCompute, LazyOptions, start_lazy_compute

pytestmark = pytest.mark.slow


class Lazy:
    """Starts lazy computes on an Env and stops them all at the end of the test."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.computes: list[LazyCompute] = []
        self._seq = 0

    def start(self, tenant: TenantId, timeline: TimelineId, lsn: Lsn | None = None, *,
              read_only: bool = False, settings: dict[str, object] | None = None,
              shared_buffers: str = "32MB", options: LazyOptions | None = None) -> LazyCompute:
        env = self.env
        if not read_only:
            assert lsn is None, "a primary always starts at the timeline's end"
            lsn, _prev = env.client.compute_start(tenant, timeline)
        assert lsn is not None
        self._seq += 1
        config = ComputeConfig(read_only=read_only, receiver_name=APP_NAME,
                               shared_buffers=shared_buffers,
                               settings={**COMPUTE_SETTINGS, **(settings or {})})
        lazy = start_lazy_compute("127.0.0.1", env.pageserver.pg_port, tenant, timeline, lsn,
                                  env.test_dir / f"lazy{self._seq}", config, options=options)
        self.computes.append(lazy)
        if not read_only:
            env.client.attach_receiver(tenant, timeline, host=lazy.server.host,
                                       port=lazy.port, slot=SLOT, application_name=APP_NAME)
        return lazy

    def stop_all(self) -> None:
        for lazy in reversed(self.computes):
            lazy.stop("immediate", timeout_s=20)
        self.computes.clear()


@pytest.fixture
def lazy(env: Env) -> Iterator[Lazy]:
    starter = Lazy(env)
    try:
        yield starter
    finally:
        starter.stop_all()


def fuse_counters(lazy: LazyCompute) -> str:
    return lazy.fuse_log.read_text(errors="replace")


# --- tests ------------------------------------------------------------------------------------
def test_workload_on_lazy_computes_and_golden(env: Env, lazy: Lazy) -> None:
    """Everything compute 1 wrote (itself lazy) is what lazy compute 2 sees; compute 2 is
    writable; after reading every file through the mount, every page equals the
    pageserver's (golden)."""
    tenant, timeline = env.client.create_tenant()
    c1 = lazy.start(tenant, timeline)
    run_everything(c1.server)
    before = dumps(c1.server)
    c1.stop("fast")
    assert not os.path.ismount(c1.mountpoint)

    c2 = lazy.start(tenant, timeline)
    after = dumps(c2.server)
    assert after.keys() == before.keys()
    for db in before:
        assert_same_dump(before[db], after[db])
    assert assert_balances(c2.server) == 200
    for db in ("db_fc", "db_wl"):
        assert c2.sql("select count(*), min(a) from s", dbname=db) == [(5000, 1)]
    c2.sql("insert into items values (200000, 2, 'on compute 2', null)")
    wait_ingested(env, tenant, timeline, c2.server)
    c2.sql("checkpoint")
    # Every block local before the pageserver is stopped by the check.
    for path in sorted((c2.store / "tree").rglob("*")):
        if path.is_file():
            (c2.compute.datadir / path.relative_to(c2.store / "tree")).read_bytes()
    check_golden(env, tenant, timeline, c2.server)

"""The walproposer sidecar against a real PostgreSQL 15 compute (started from a pageserver
basebackup, so its slot begins at X) and three in-process stub safekeepers (the real Acceptor).

Proves, on the PostgreSQL side: the sidecar streams from exactly X, PostgreSQL sees it as its
synchronous standby, and a commit returns only once a majority holds the commit record; with
two safekeepers gone, a commit waits while reads go on, and returns once they are back (the
compute is not stopped); a newer proposer (sync) fences the sidecar, which stops PostgreSQL; with
ingest slowed by a failpoint, reports are held back so the WAL the compute has acknowledged
stays within max_write_lag_bytes of what the pageserver ingested.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fixtures_env import Env, LoopThread, PageserverProcess
from stub_rig import StubRig, current_lsn

from polling import wait_until
from sk_stub import StubSafekeeper
from strata.common.errors import UserError
from strata.compute.quorum import DEFAULT_APPLICATION_NAME
from strata.compute.safekeeper_sync import sync_safekeepers
from strata.compute.walproposer import (
    SidecarConfig,
    WalProposer,
)


class Rig(StubRig[StubSafekeeper]):
    """A compute at X from the pageserver, three stub safekeepers at X, and a sidecar."""

    def make_stub(self, node_id: int) -> StubSafekeeper:
        return StubSafekeeper(node_id, self.tenant, self.timeline, self.system_id, 16 << 20,
                              self.x, self.prev)


def test_commits_wait_for_a_majority_also_after_losing_it(
        env: Env, loop: LoopThread) -> None:
    rig = Rig(env, loop, "compute1")
    rig.start_sidecar(quorum_warn_s=1.0)
    rig.write_rows()
    rows = rig.compute.sql("SELECT application_name, sync_state FROM pg_stat_replication")
    assert rows == [(DEFAULT_APPLICATION_NAME, "sync")], rows
    # The stubs hold exactly PostgreSQL's WAL from X on.
    assert len(rig.stub_records()) > 100
    # Two of three gone: a commit waits (reads go on) and returns once a majority is back;
    # the compute is not stopped.
    rig.commit_waits_without_majority(back=(0, 1))


def test_a_sidecar_told_the_system_id_is_elected_before_postgresql_starts(
        env: Env, loop: LoopThread) -> None:
    """Given the cluster's system id (as `strata endpoint start` gives it), the sidecar
    takes its term while PostgreSQL is not up yet, then streams from X once PostgreSQL
    accepts connections, and commits return; told a wrong system id, it refuses the
    compute."""
    rig = Rig(env, loop, "early", start=False)
    fenced: list[str] = []
    sidecar = WalProposer(rig.quorum(), SidecarConfig(
        pg_host="127.0.0.1", pg_port=rig.compute.port, system_id=rig.system_id,
        pg_reconnect_timeout_s=60), on_fence=fenced.append)
    run = loop.spawn(sidecar.run())

    async def cancel() -> None:
        run.cancel()
    loop.closers.insert(0, cancel)
    wait_until(lambda: sidecar.driver is not None and sidecar.driver.elected is not None,
               30, "the sidecar's election")
    assert not rig.compute.is_running() and not run.done()
    rig.compute.start()
    rig.compute.sql("CREATE TABLE t (id int)")  # returns once a majority has its commit
    rows = rig.compute.sql("SELECT application_name, sync_state FROM pg_stat_replication")
    assert rows == [(DEFAULT_APPLICATION_NAME, "sync")], rows
    assert fenced == [] and not run.done()

    wrong = WalProposer(rig.quorum(), SidecarConfig(
        pg_host="127.0.0.1", pg_port=rig.compute.port, system_id=rig.system_id + 1),
        on_fence=fenced.append)
    with pytest.raises(UserError, match="system id"):
        loop.call(wrong.run())


def test_newer_proposer_stops_the_compute(env: Env, loop: LoopThread) -> None:
    rig = Rig(env, loop, "compute1")
    rig.start_sidecar()
    rig.compute.sql("CREATE TABLE t (id int)")
    rig.compute.sql("INSERT INTO t VALUES (1)")
    acked = current_lsn(rig.compute)
    result = sync_safekeepers(rig.quorum(), rig.system_id, timeout_s=10)
    assert result.lsn >= acked - 200
    wait_until(lambda: not rig.compute.is_running(), 10, "the fenced compute to stop")
    assert rig.fenced and "another proposer" in rig.fenced[0]


def test_backpressure_holds_commits_while_ingest_lags(
        test_dir: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_FAILPOINTS", "ingest-apply-record=sleep(0.002)")
    ps = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log")
    ps.start()
    env = Env(test_dir, ps)
    try:
        _backpressure(env, loop)
    finally:
        env.stop_all()


def _backpressure(env: Env, loop: LoopThread) -> None:
    limit = 256 << 10
    rig = Rig(env, loop, "compute1")
    compute = rig.compute
    # The pageserver follows the compute as an extra asynchronous standby (dev mode) through
    # its own slot; the sidecar reads its progress over HTTP.
    compute.sql("SELECT pg_create_physical_replication_slot('ps_async', true)")
    env.client.attach_receiver(rig.tenant, rig.timeline, host="127.0.0.1", port=compute.port,
                               slot="ps_async", application_name="ps_async")
    sidecar = rig.start_sidecar(pageserver_http=("127.0.0.1", env.pageserver.http_port),
                                max_write_lag_bytes=limit)
    compute.sql("CREATE TABLE t (id serial, v text)")
    stop = threading.Event()
    commits = [0]

    def writer() -> None:
        with compute.connect() as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO t (v) SELECT repeat('y', 200) FROM generate_series(1,20)")
                commits[0] += 1

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    worst = 0
    worst_written = 0  # all WAL the compute wrote, acknowledged or not
    held = 0
    # Load until ingest got well past the limit (however slow the shared machine is), so the
    # limit was reached and held more than once; at least 6 s.
    t0 = time.monotonic()
    ingested = rig.x
    try:
        while time.monotonic() - t0 < 6 or ingested - rig.x <= 3 * limit:
            assert time.monotonic() - t0 < 300, f"ingest stuck at {ingested} (from {rig.x})"
            reported = sidecar.reported_lsn
            ingested = env.client.timeline(rig.tenant, rig.timeline).last_record_lsn
            worst = max(worst, reported - ingested)
            worst_written = max(worst_written, current_lsn(compute) - ingested)
            driver = sidecar.driver
            if driver is not None and reported < driver.proposer.commit_lsn:
                held += 1
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    # Acknowledged WAL never ran more than the limit ahead of ingest ...
    assert worst <= limit, (worst, limit)
    # The compute's writers wait for their commits, so what it wrote beyond that is bounded
    # by the transactions in flight (4 writers of a few pages each).
    assert worst_written <= limit + (256 << 10), (worst_written, limit)
    print(f"lag: acknowledged {worst}, written {worst_written}, limit {limit}; "
          f"{commits[0]} commits, held back {sidecar.held_back_s:.1f}s")
    # ... because reports were actually held back, while commits kept going.
    assert held > 0 and sidecar.held_back_s > 0, (held, sidecar.held_back_s)
    assert commits[0] > 10, commits
    ingested_end = env.client.timeline(rig.tenant, rig.timeline).last_record_lsn
    assert ingested_end - rig.x > 2 * limit, (ingested_end, rig.x)

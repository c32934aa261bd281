"""Standby feedback of the pageserver's WAL receiver, as PostgreSQL 15 sees it.

pg_stat_replication of the compute shows, for the pageserver's connection: write_lsn =
WAL received, flush_lsn = WAL fsynced to the pageserver's log, replay_lsn = the
timeline's disk_consistent_lsn (what is in layer files, so what the compute's upstream
may drop). replay stays behind while WAL is only in memory and catches up after a
checkpoint.
"""

from __future__ import annotations

from fixtures_env import APP_NAME, Env

from polling import wait_until
from strata.common.lsn import Lsn
from strata.compute.pgserver import PgServer


def replication(compute: PgServer) -> tuple[Lsn, Lsn, Lsn] | None:
    rows = compute.sql("select write_lsn::text, flush_lsn::text, replay_lsn::text "
                       "from pg_stat_replication where application_name = %s", APP_NAME)
    if not rows or None in rows[0]:
        return None
    write, flush, replay = rows[0]
    return Lsn.parse(write), Lsn.parse(flush), Lsn.parse(replay)


def test_write_flush_apply_semantics(env: Env) -> None:
    c = env.client
    # A week of checkpoint_timeout and a huge checkpoint_distance: nothing is flushed to
    # layer files unless we ask.
    tenant, tl = c.create_tenant(config={"checkpoint_timeout_s": 7 * 86400.0,
                                         "checkpoint_distance": 1 << 40})
    compute = env.start_compute(tenant, tl)
    compute.sql("create table t (id int, v text)")
    compute.sql("insert into t select g, repeat('x', 100) from generate_series(1, 5000) g")
    commit = Lsn.parse(compute.sql("select pg_current_wal_flush_lsn()::text")[0][0])

    # synchronous_commit = on with the pageserver as the synchronous standby: the commit
    # returned, so the WAL is fsynced on the pageserver.
    def settled() -> bool:
        state = replication(compute)
        return state is not None and state[0] == state[1] >= commit

    wait_until(settled, 30, "write = flush >= the commit")
    info = c.timeline(tenant, tl)
    assert info.disk_consistent_lsn < commit, info  # in memory only

    def replay_is_dcl() -> bool:
        state = replication(compute)
        return state is not None and state[2] == c.timeline(tenant, tl).disk_consistent_lsn

    wait_until(replay_is_dcl, 30, "replay = disk_consistent_lsn")
    state = replication(compute)
    assert state is not None and state[2] < state[1], state  # apply trails flush

    flushed = c.checkpoint(tenant, tl).disk_consistent_lsn
    assert flushed >= commit.page_start()

    def caught_up() -> bool:
        state = replication(compute)
        return state is not None and state[2] == flushed

    wait_until(caught_up, 30, f"replay = the new disk_consistent_lsn {flushed}")
    write, flush, replay = replication(compute) or (Lsn(0), Lsn(0), Lsn(0))
    assert write >= flush >= replay == flushed

"""`strata.control.sequences` on a real PostgreSQL 15: after it ran, even a crash (an
immediate stop: no shutdown checkpoint writes the sequence pages) restarts every sequence
where it was, so only the WAL it wrote can have carried the values - what a new compute
built by the pageserver from the WAL sees after a clean endpoint stop."""

from __future__ import annotations

from collections.abc import Callable

from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.control.sequences import log_current_values


def test_values_survive_a_crash_after_logging(pg_factory: Callable[..., PgServer]) -> None:
    pg = pg_factory("pg")
    pg.initdb()
    pg.start(STRATA_WAL_SETTINGS)
    pg.sql("create database other")
    pg.sql("create table t (id serial, b bigint generated always as identity)")
    pg.sql("insert into t default values")
    pg.sql('create sequence "Odd name" increment by -1')
    pg.sql("""select nextval('"Odd name"')""")
    pg.sql("create sequence fresh")  # never used: nextval still starts at 1
    pg.sql("create unlogged sequence u")  # skipped: reset at every start anyway
    pg.sql("create sequence s2", dbname="other")
    pg.sql("select nextval('s2') from generate_series(1, 5)", dbname="other")

    assert log_current_values(pg.connect) == 5  # not the unlogged one
    pg.sql("create table flush ()")  # a synchronous commit flushes the WAL before it
    pg.stop("immediate")
    pg.start(STRATA_WAL_SETTINGS)
    assert pg.sql("insert into t default values returning id, b") == [(2, 2)]
    assert pg.sql("""select nextval('"Odd name"')""") == [(-2,)]
    assert pg.sql("select nextval('fresh')") == [(1,)]
    assert pg.sql("select nextval('s2')", dbname="other") == [(6,)]


def test_a_held_catalog_lock_does_not_hold_up_the_stop(
        pg_factory: Callable[..., PgServer]) -> None:
    """Another session holds pg_database locked: the databases query is cancelled after
    the budget (a log line, nothing logged) instead of waiting for good."""
    pg = pg_factory("pg")
    pg.initdb()
    pg.start(STRATA_WAL_SETTINGS)
    with pg.connect(autocommit=False) as holder:
        holder.execute("lock table pg_database in access exclusive mode")
        assert log_current_values(pg.connect, budget_s=1.0) == 0
    assert pg.sql("select 1") == [(1,)]


def test_without_logging_a_crash_jumps(pg_factory: Callable[..., PgServer]) -> None:
    """The control: without it, the same crash skips values (PostgreSQL logs 32 ahead),
    so the test above shows what the function did."""
    pg = pg_factory("pg")
    pg.initdb()
    pg.start(STRATA_WAL_SETTINGS)
    pg.sql("create sequence s")
    pg.sql("select nextval('s')")
    pg.stop("immediate")
    pg.start(STRATA_WAL_SETTINGS)
    assert pg.sql("select nextval('s')") == [(34,)]

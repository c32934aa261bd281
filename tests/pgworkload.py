"""A reusable PostgreSQL 15 workload that writes WAL of (nearly) every kind Strata must ingest.

`run_workload(server)` runs, on a started `PgServer`, the issue's workload: CREATE DATABASE with
both strategies, toasted rows, every index type, sequences, HOT and non-HOT updates, deletes,
VACUUM, VACUUM FULL, CLUSTER, TRUNCATE (also inside one transaction with the CREATE), two-phase
commit, multixacts, large objects, unlogged tables, subtransactions, DROP TABLE, a CHECKPOINT
and pg_switch_wal(). It takes a few seconds.

The server must have been started with `WORKLOAD_SETTINGS` merged into its settings (two-phase
commit needs max_prepared_transactions > 0). Import it from a test as `from pgworkload import
run_workload, WORKLOAD_SETTINGS` (pytest puts `tests/` on sys.path through the root conftest).
"""

from __future__ import annotations

from strata.compute.pgserver import PgServer

# Settings the workload needs on top of the caller's (e.g. STRATA_WAL_SETTINGS).
WORKLOAD_SETTINGS: dict[str, object] = {
    "max_prepared_transactions": 5,
    # Keep every segment since initdb so that tests can decode all of the workload's WAL.
    "wal_keep_size": "1GB",
}

_SETUP = [
    # Heap with toasted values, HOT and non-HOT updates, deletes.
    "create table items (id int primary key, k int, payload text, big text)",
    "alter table items alter column big set storage external",
    "insert into items select g, g % 97, md5(g::text), "
    "  case when g % 50 = 0 then repeat(md5(g::text), 400) end from generate_series(1, 3000) g",
    "update items set payload = payload || 'x' where id % 7 = 0",      # HOT (no indexed column)
    "update items set k = k + 1000 where id % 11 = 0",                 # non-HOT once k is indexed
    "delete from items where id % 13 = 0",
    # Every index type.
    "create index items_k_btree on items using btree (k)",
    "create index items_k_hash on items using hash (k)",
    "create table docs (id serial primary key, tags text[], span int4range, pt point, body text)",
    "insert into docs (tags, span, pt, body) select array[md5(g::text), (g % 10)::text], "
    "  int4range(g, g + 10), point(g % 100, g / 100), md5(g::text) "
    "  from generate_series(1, 1500) g",
    "create index docs_tags_gin on docs using gin (tags)",
    "create index docs_span_gist on docs using gist (span)",
    "create index docs_pt_spgist on docs using spgist (pt)",
    "create index items_id_brin on items using brin (id)",
    "update items set k = k + 1 where id % 17 = 0",
    "insert into docs (tags, span, pt, body) select array['new', g::text], int4range(g, g + 3), "
    "  point(g, g), 'x' from generate_series(1, 300) g",
    # Sequences.
    "create sequence seq1",
    "select nextval('seq1') from generate_series(1, 50)",
    # Maintenance.
    "vacuum items",
    "vacuum full docs",
    "cluster items using items_pkey",
    "vacuum freeze items",
    # TRUNCATE, also in the creating transaction.
    "create table trunc_me as select g from generate_series(1, 500) g",
    "truncate trunc_me",
    "begin; create table t_in_xact (a int); insert into t_in_xact select generate_series(1, 100);"
    " truncate t_in_xact; insert into t_in_xact values (1); commit",
    # Unlogged table.
    "create unlogged table ul (a int primary key, b text)",
    "insert into ul select g, md5(g::text) from generate_series(1, 200) g",
    # Subtransactions.
    "begin; insert into trunc_me values (1); savepoint s1; insert into trunc_me values (2);"
    " rollback to s1; savepoint s2; insert into trunc_me values (3); release s2; commit",
    # Large objects.
    "select lo_from_bytea(0, convert_to(repeat('large object ', 2000), 'UTF8'))",
    # Two-phase commit (both outcomes).
    "begin; insert into trunc_me values (10); prepare transaction 'p1'",
    "commit prepared 'p1'",
    "begin; insert into trunc_me values (11); prepare transaction 'p2'",
    "rollback prepared 'p2'",
    # CREATE DATABASE with both strategies, then drop one.
    "create database db_wal strategy wal_log",
    "create database db_copy strategy file_copy",
    "drop database db_copy",
    # DROP TABLE.
    "create table dropme (a int)",
    "insert into dropme select generate_series(1, 100)",
    "drop table dropme",
]


def _multixact(server: PgServer) -> None:
    """Two sessions hold FOR KEY SHARE locks on the same rows: PostgreSQL creates a multixact."""
    with server.connect(autocommit=False) as c1, server.connect(autocommit=False) as c2:
        c1.execute("select id from items where id <= 20 for key share")
        c2.execute("select id from items where id <= 20 for key share")
        c1.commit()
        c2.commit()


def run_workload(server: PgServer) -> None:
    """Run the whole workload on a started server; ends with a CHECKPOINT and a WAL switch."""
    assert server.is_running(), server.datadir
    with server.connect() as conn:
        for statement in _SETUP:
            conn.execute(statement)
    _multixact(server)
    server.sql("create table more (a int)", dbname="db_wal")
    server.sql("insert into more select generate_series(1, 100)", dbname="db_wal")
    server.sql("checkpoint")
    server.sql("update items set k = k + 1 where id < 100")  # FPWs after the checkpoint
    server.sql("select pg_switch_wal()")
    server.sql("insert into items values (100000, 1, 'after switch', null)")

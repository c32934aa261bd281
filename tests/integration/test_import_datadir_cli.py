"""`strata tenant create --import-datadir`: a stock PostgreSQL 15 data directory, used and
cleanly shut down, becomes a tenant's `main` branch; an endpoint on it answers as the stock
server did. Real processes: the pageserver, three safekeepers, stock PostgreSQL 15."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from strata.compute.pgserver import PgServer

STRATA = str(Path(sys.executable).parent / "strata")

# Compared between the stock server and the imported endpoint.
QUERIES = [
    "select count(*), sum(abalance), sum(bid) from pgbench_accounts",
    "select count(*), sum(bbalance) from pgbench_branches",
    "select md5(string_agg(t::text, ',' order by id)) from t",
    "select count(*) from pg_class",
    "select datname from pg_database where datname <> 'strata' order by datname",
]


def _strata(repo: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([STRATA, "--repo-dir", str(repo), *args], capture_output=True,
                          text=True, timeout=600, check=False)
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    else:
        assert proc.returncode == 1, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def repo(test_dir: Path) -> Iterator[Path]:
    root = test_dir / "env"
    try:
        yield root
    finally:
        if (root / "state.json").exists():
            subprocess.run([STRATA, "--repo-dir", str(root), "stop", "--immediate"],
                           capture_output=True, timeout=120, check=False)


def _answers(conn: psycopg.Connection[Any]) -> list[Any]:
    return [conn.execute(q).fetchall() for q in QUERIES]


def _tenants(repo: Path) -> set[str]:
    return {t["name"] for t in json.loads(_strata(repo, "tenant", "list", "--json").stdout)}


@pytest.mark.timeout(900)
def test_import_a_used_stock_datadir(repo: Path, pg_factory: Callable[..., PgServer]) -> None:
    """pgbench -i -s 1 and a table with updates and deletes on a stock server, stopped
    cleanly, imported: the endpoint answers the same, takes writes, and the application
    role works. A crashed or running data directory, a file and a missing path are refused
    with one line each, and no tenant is created."""
    stock = pg_factory("stock")
    stock.initdb()
    stock.start()
    stock.sql("create table t (id int primary key, v text)")
    stock.sql("insert into t select g, repeat('x', g % 50) from generate_series(1, 5000) g")
    stock.sql("update t set v = 'updated' where id % 7 = 0")
    stock.sql("delete from t where id % 11 = 0")
    stock.sql("create database other")
    pgbench = subprocess.run(["pgbench", "-i", "-s", "1", "-q", stock.connstr()],
                             capture_output=True, text=True, timeout=300, check=False)
    assert pgbench.returncode == 0, pgbench.stderr
    stock.sql("update pgbench_accounts set abalance = aid % 100 where aid % 3 = 0")
    stock.sql("checkpoint")
    stock.sql("insert into t values (6000, 'after the checkpoint')")  # WAL before shutdown
    with stock.connect() as conn:
        expected = _answers(conn)
    sysid = stock.sql("select system_identifier from pg_control_system()")[0][0]

    _strata(repo, "init")
    _strata(repo, "start")

    # Running: refused (not shut down), nothing created.
    running = _strata(repo, "tenant", "create", "--name", "imp", "--import-datadir",
                      str(stock.datadir), ok=False)
    assert "was not shut down cleanly" in running.stderr, running.stderr
    assert "pg_ctl stop -m fast" in running.stderr
    missing = _strata(repo, "tenant", "create", "--name", "imp", "--import-datadir",
                      str(stock.datadir / "nope"), ok=False)
    assert "is not a directory" in missing.stderr, missing.stderr
    not_pg = _strata(repo, "tenant", "create", "--name", "imp", "--import-datadir",
                     str(stock.datadir / "base"), ok=False)
    assert "not a PostgreSQL data directory" in not_pg.stderr, not_pg.stderr
    assert _tenants(repo) == {"default"}

    stock.stop("fast")
    created = _strata(repo, "tenant", "create", "--name", "imp", "--import-datadir",
                      str(stock.datadir))
    assert "importing" in created.stderr and "MB" in created.stderr, created.stderr
    assert _tenants(repo) == {"default", "imp"}
    _strata(repo, "endpoint", "create", "impep", "--branch", "main", "--tenant", "imp")
    _strata(repo, "endpoint", "start", "impep")
    ep = next(e for e in json.loads(_strata(repo, "endpoint", "list", "--json").stdout)
              if e["name"] == "impep")
    port = ep["address"].rsplit(":", 1)[1]
    with psycopg.connect(host=ep["socket_dir"], port=port, user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        assert _answers(conn) == expected
        assert conn.execute("select system_identifier from pg_control_system()"
                            ).fetchall()[0][0] == sysid
        conn.execute("insert into t values (7000, 'written on strata')")
        conn.execute("update pgbench_accounts set abalance = abalance + 1 where aid = 1")
    with psycopg.connect(str(ep["local_connstr"]), autocommit=True) as app:
        assert app.execute("select current_user").fetchall() == [("strata",)]
        app.execute("create table mine (a int)")
        app.execute("insert into mine values (42)")
    # The writes went through the safekeepers and the pageserver: a restart keeps them.
    _strata(repo, "endpoint", "stop", "impep")
    _strata(repo, "endpoint", "start", "impep", "--mode", "full")
    with psycopg.connect(host=ep["socket_dir"], port=port, user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        assert conn.execute("select v from t where id = 7000").fetchall() == \
            [("written on strata",)]
        assert conn.execute("select abalance from pgbench_accounts where aid = 1"
                            ).fetchall() == [(1,)]  # pgbench's 0, + 1 on strata
    with psycopg.connect(str(ep["local_connstr"]), autocommit=True) as app:
        assert app.execute("select a from mine").fetchall() == [(42,)]

    # A crashed server's data directory: refused, nothing created.
    crashed = pg_factory("crashed")
    crashed.initdb()
    crashed.start()
    crashed.sql("create table c (a int)")
    crashed.stop("immediate")
    refused = _strata(repo, "tenant", "create", "--name", "crash", "--import-datadir",
                      str(crashed.datadir), ok=False)
    assert "was not shut down cleanly" in refused.stderr, refused.stderr
    assert "pg_ctl stop -m fast" in refused.stderr
    assert "in production" in refused.stderr, refused.stderr
    assert [line for line in refused.stderr.splitlines() if "error" in line] == \
        [refused.stderr.splitlines()[-1]], refused.stderr
    assert _tenants(repo) == {"default", "imp"}

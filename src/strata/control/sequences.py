"""Keep sequence values across a clean endpoint stop and start.

PostgreSQL WAL-logs a sequence 32 values ahead (`SEQ_LOG_VALS`): the `XLOG_SEQ_LOG`
record carries `last_value` + 32, and the next 32 `nextval` calls change only the
buffer. Stock PostgreSQL writes the real page at its shutdown checkpoint, so a clean
restart continues at the last value + 1. That page write is not WAL-logged, so the
pageserver would only have the "32 ahead" image and every new compute would jump.

`log_current_values` runs just before a clean stop: per sequence, in a transaction of
its own, it takes the sequence's ACCESS EXCLUSIVE lock (`ALTER SEQUENCE ... OWNER TO`
its current owner: a no-op that locks; `LOCK TABLE` refuses sequences), which waits for
and then holds off concurrent `nextval` calls, reads `last_value, is_called` and writes
them back with `setval`. `setval` WAL-logs the tuple as it is (`log_cnt` 0), so the page
the pageserver serves at the shutdown checkpoint is the one stock PostgreSQL would read.
Values are never repeated: the value written is the one in the buffer under the lock, and
the next `nextval` logs 32 ahead again before it hands anything out.

Best effort by design: a sequence whose lock is not granted quickly is skipped (it jumps,
as after a crash, which PostgreSQL allows), and any error is one log line, never a failed
stop. Commits are asynchronous here (`synchronous_commit = off`): the shutdown checkpoint
that follows makes them durable with the rest of the WAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

LOCK_TIMEOUT_MS = 500
BUDGET_S = 10.0

DATABASES_SQL = ("select datname from pg_database where datallowconn and not datistemplate "
                 "order by datname")
# Permanent sequences only: unlogged ones are reset at every start anyway, temporary ones
# die with their session.
SEQUENCES_SQL = ("select c.oid::regclass::text, pg_get_userbyid(c.relowner) from pg_class c "
                 "where c.relkind = 'S' and c.relpersistence = 'p' order by c.oid")


def log_current_values(connect: Callable[[str], psycopg.Connection[Any]], *,
                       budget_s: float = BUDGET_S) -> int:
    """WAL-log the current value of every permanent sequence of every database that
    accepts connections. `connect(dbname)` opens a superuser connection in autocommit
    mode. Returns how many sequences were logged; stops early after `budget_s` (each
statement is cancelled after `budget_s` too)."""
    deadline = time.monotonic() + budget_s
    logged = 0

    def bounded(dbname: str) -> psycopg.Connection[Any]:
        # No statement may wait past the budget (a catalog lock held by another session
        # would otherwise hold up the stop for good).
        conn = connect(dbname)
        try:
            conn.execute(f"set statement_timeout = {max(1, int(budget_s * 1000))}")
        except BaseException:
            conn.close()
            raise
        return conn

    try:
        with bounded("postgres") as conn:
            databases = [row[0] for row in conn.execute(DATABASES_SQL).fetchall()]
        for dbname in databases:
            if time.monotonic() > deadline:
                log.warning("sequences: %.0f s budget spent; the rest may jump by up to 32 "
                            "at the next start", budget_s)
                break
            with bounded(dbname) as conn:
                logged += _log_database(conn, dbname, deadline)
    except psycopg.Error as e:
        log.warning("sequences: could not log current values (%s); they may jump by up "
                    "to 32 at the next start", str(e).strip().splitlines()[0])
    return logged


def _log_database(conn: psycopg.Connection[Any], dbname: str, deadline: float) -> int:
    conn.execute("set synchronous_commit = off")
    conn.execute(f"set lock_timeout = {LOCK_TIMEOUT_MS}")
    logged = 0
    for name, owner in conn.execute(SEQUENCES_SQL).fetchall():
        if time.monotonic() > deadline:
            break
        seq = sql.SQL(name)  # regclass text: already quoted and qualified as needed
        try:
            with conn.transaction():
                conn.execute(sql.SQL("alter sequence {} owner to {}").format(
                    seq, sql.Identifier(owner)))
                row = conn.execute(sql.SQL("select last_value, is_called from {}").format(
                    seq)).fetchone()
                assert row is not None, name
                conn.execute("select setval(%s::regclass, %s, %s)", (name, row[0], row[1]))
            logged += 1
        except (psycopg.errors.LockNotAvailable, psycopg.errors.UndefinedTable):
            log.info("sequences: %s in %s skipped (busy or dropped)", name, dbname)
    return logged

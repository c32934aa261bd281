"""Starting PostgreSQL 15 where a postmaster was just killed (kill -9), and what a failed
start reports. Real servers; the killed postmaster is our child, so it stays a zombie
(not reaped) for as long as the test wants: the case that made restarts fail with
"lock file ... already exists"."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from polling import wait_until
from strata.common.errors import UserError
from strata.compute.pgserver import PgServer
from strata.compute.postmaster_files import leftover_processes


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def test_start_after_kill9_of_an_unreaped_postmaster(
        pg_factory: Callable[..., PgServer]) -> None:
    """The postmaster is SIGKILLed alone (its children live on, it is a zombie): a new
    postmaster on the same data directory, port and socket starts, the old children are
    gone, and the committed row is there."""
    first = pg_factory("pg")
    first.initdb()
    first.start({"autovacuum": False})
    first.sql("create table t (v int)")
    first.sql("insert into t values (1)")
    old = first.pid
    assert old is not None
    children = set(leftover_processes(first.datadir)) - {old}
    assert children  # checkpointer, background writer, ...
    os.kill(old, signal.SIGKILL)
    try:
        # dead, and not reaped: we are its parent
        wait_until(lambda: _state(old) == "Z", 30, f"the killed postmaster {old} to be a "
                   "zombie", interval_s=0.01)
        second = pg_factory("pg2")
        second.datadir, second.port = first.datadir, first.port
        second.socket_dir, second.log_path = first.socket_dir, first.log_path
        second.start({"autovacuum": False})
        assert not children & set(leftover_processes(first.datadir))
        assert _state(old) == "Z"
        assert second.sql("select v from t") == [(1,)]
    finally:
        first.kill9()  # reaps the zombie


def test_failed_start_shows_the_fatal_line(pg_factory: Callable[..., PgServer]) -> None:
    server = pg_factory("pg")
    server.initdb()
    with pytest.raises(UserError) as failed:
        server.start({"shared_buffers": "lots"})
    message = str(failed.value)
    assert message.startswith("postgres exited with code 1 during start-up: FATAL: "
                              "configuration file"), message
    assert 'after: invalid value for parameter "shared_buffers": "lots"' in message
    assert "\n" not in message

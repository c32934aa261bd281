"""The development-mode WAL receiver runs in a child process of the pageserver
(walreceiver_proc.py): commits wait for it, a killed child is replaced, and a killed
pageserver takes its child with it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from fixtures_env import Env

from polling import wait_until
from strata.common.lsn import Lsn


def receiver_children(wal_root: Path) -> dict[int, int]:
    """pid -> parent pid of every walreceiver_proc process writing under `wal_root`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        if b"strata.pageserver.walreceiver_proc" in argv and \
                any(a.startswith(str(wal_root).encode()) for a in argv):
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def test_receiver_child_replaced_and_ends_with_pageserver(env: Env) -> None:
    env.allowed_log_errors.append(r"walreceiver child exited with status -9")
    client = env.client
    tenant, timeline = client.create_tenant()
    compute = env.start_compute(tenant, timeline)
    compute.sql("create table t (i int)")
    compute.sql("insert into t values (1)")  # a synchronous commit: the child replied
    ps_pid = env.pageserver.proc.pid if env.pageserver.proc else -1
    root = env.pageserver.workdir
    children = receiver_children(root)
    assert list(children.values()) == [ps_pid], children
    (old,) = children

    os.kill(old, signal.SIGKILL)
    wait_until(lambda: set(receiver_children(root)) - {old} != set(), 60,
               "a new receiver child")
    compute.sql("insert into t values (2)")  # waits for the new child's reply
    flushed = Lsn.parse(compute.sql("select pg_current_wal_flush_lsn()::text")[0][0])
    floor = flushed.page_start() if flushed.page_offset() <= 40 else flushed
    wait_until(lambda: client.timeline(tenant, timeline).last_record_lsn >= floor, 60,
               f"ingest up to {flushed}")

    env.pageserver.kill9()
    wait_until(lambda: not receiver_children(root), 60, "the receiver child to exit")

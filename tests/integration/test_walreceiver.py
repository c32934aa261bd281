"""The development-mode WAL receiver against a real PostgreSQL 15 that lists it as its
synchronous standby: commits wait for it, its log is byte-identical to pg_wal, and it
survives compute restarts and its own SIGKILL without a gap."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from polling import wait_until
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, Lsn, segment_file_name
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig, WrongSystem

APP_NAME = "strata_test_ps"
SLOT = "strata_ps"
SETTINGS = {**STRATA_WAL_SETTINGS, "synchronous_standby_names": APP_NAME,
            "synchronous_commit": "on", "wal_sender_timeout": "10s"}


class ReceiverThread:
    """A WalReceiver on its own event loop, so the test can use blocking psycopg."""

    def __init__(self, log_dir: Path, pg: PgServer, start_lsn: Lsn,
                 system_id: int | None = None) -> None:
        self.apply_lsn = Lsn(0)
        self.notified: list[Lsn] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.wal = WalLog.open_or_create(log_dir, start_lsn)
        config = WalReceiverConfig(host=pg.host, port=pg.port, slot_name=SLOT,
                                   application_name=APP_NAME, system_id=system_id,
                                   status_interval_s=0.5)

        async def make() -> WalReceiver:
            rx = WalReceiver(config, self.wal, apply_lsn=lambda: self.apply_lsn,
                             on_flush=self.notified.append)
            rx.start()
            return rx

        self.receiver: WalReceiver = self.run(make())

    def run(self, coro: Any, timeout_s: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def wait_for_flush(self, lsn: Lsn, timeout_s: float = 30) -> Lsn:
        return self.run(self.receiver.wait_for_flush(lsn, timeout_s), timeout_s + 5)  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.run(self.receiver.stop())
        self.wal.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def current_flush_lsn(pg: PgServer) -> Lsn:
    return Lsn.parse(pg.sql("select pg_current_wal_flush_lsn()::text")[0][0])


def read_pg_wal(pg: PgServer, start: Lsn, end: Lsn) -> bytes:
    """The bytes [start, end) straight from the compute's pg_wal segment files."""
    seg = DEFAULT_WAL_SEGMENT_SIZE
    out = []
    pos = start.value
    while pos < end.value:
        segno, offset = divmod(pos, seg)
        n = min(end.value - pos, seg - offset)
        with open(pg.datadir / "pg_wal" / segment_file_name(segno, 1, seg), "rb") as f:
            f.seek(offset)
            chunk = f.read(n)
        assert len(chunk) == n, (segno, offset, n, len(chunk))
        out.append(chunk)
        pos += n
    return b"".join(out)


def assert_log_matches_pg_wal(wal: WalLog, pg: PgServer, end: Lsn) -> None:
    ours = wal.read(wal.start_lsn, end)
    theirs = read_pg_wal(pg, wal.start_lsn, end)
    assert len(ours) == len(theirs) == end - wal.start_lsn
    assert ours == theirs


def commit_in_thread(pg: PgServer, sql: str) -> tuple[threading.Thread, list[Any]]:
    done: list[Any] = []

    def work() -> None:
        try:
            pg.sql(sql)
            done.append("ok")
        except Exception as err:  # noqa: BLE001 - reported by the test
            done.append(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, done


def waiting_for_sync_rep(pg: PgServer) -> bool:
    rows = pg.sql("select count(*) from pg_stat_activity where wait_event = 'SyncRep'")
    return int(rows[0][0]) > 0


@pytest.fixture
def compute(pg_factory: Callable[..., PgServer]) -> Iterator[tuple[PgServer, Lsn, int]]:
    """PG15 with the receiver as its synchronous standby, and a slot; yields the slot's
    restart_lsn and the system id."""
    pg = pg_factory("compute")
    pg.initdb()
    pg.start(SETTINGS)
    # Creating the slot assigns no xid, so it does not wait for the (absent) standby.
    row = pg.sql("select lsn::text from pg_create_physical_replication_slot(%s, true)",
                 SLOT)
    system_id = int(pg.sql("select system_identifier from pg_control_system()")[0][0])
    yield pg, Lsn.parse(row[0][0]), system_id


def test_commits_wait_for_the_receiver_and_its_log_equals_pg_wal(
        compute: tuple[PgServer, Lsn, int], test_dir: Path) -> None:
    pg, start, system_id = compute
    log_dir = test_dir / "wal_log"
    rx = ReceiverThread(log_dir, pg, start, system_id)
    try:
        rx.apply_lsn = start
        thread, done = commit_in_thread(pg, "create table t as select generate_series(1, 100) i")
        thread.join(30)
        assert done == ["ok"]
        rows = pg.sql("select application_name, sync_state, flush_lsn::text, replay_lsn::text "
                      "from pg_stat_replication")
        assert len(rows) == 1
        assert rows[0][:2] == (APP_NAME, "sync")
        assert Lsn.parse(rows[0][2]) <= rx.receiver.flush_lsn
        assert Lsn.parse(rows[0][3]) == start  # apply comes from our callback
        end = current_flush_lsn(pg)
        rx.wait_for_flush(end)
        assert rx.notified == sorted(rx.notified)
        assert rx.notified[-1] == rx.receiver.flush_lsn
        assert_log_matches_pg_wal(rx.wal, pg, end)
    finally:
        rx.stop()

    # Receiver stopped: a commit waits for synchronous replication ...
    thread, done = commit_in_thread(pg, "insert into t values (1000)")
    wait_until(lambda: waiting_for_sync_rep(pg), 20, "a backend waiting in SyncRep")
    thread.join(0.5)
    assert thread.is_alive() and done == []
    # ... and completes once the receiver is back; it resumes at its log's end.
    rx = ReceiverThread(log_dir, pg, Lsn(0), system_id)
    try:
        assert rx.wal.start_lsn == start
        thread.join(30)
        assert done == ["ok"]
        end = current_flush_lsn(pg)
        rx.wait_for_flush(end)
        assert_log_matches_pg_wal(rx.wal, pg, end)
    finally:
        rx.stop()


def test_receiver_follows_a_compute_restart(compute: tuple[PgServer, Lsn, int],
                                            test_dir: Path) -> None:
    pg, start, system_id = compute
    rx = ReceiverThread(test_dir / "wal_log", pg, start, system_id)
    try:
        pg.sql("create table t (i int)")
        wait_until(lambda: rx.receiver.connections == 1, 10, "first connection")
        # A fast stop waits for us to confirm the shutdown checkpoint.
        pg.stop("fast")
        pg.start(SETTINGS)
        thread, done = commit_in_thread(pg, "insert into t select generate_series(1, 1000)")
        thread.join(30)
        assert done == ["ok"]
        assert rx.receiver.connections >= 2
        end = current_flush_lsn(pg)
        rx.wait_for_flush(end)
        assert_log_matches_pg_wal(rx.wal, pg, end)  # one continuous range across the restart
        # A crash restart too.
        pg.stop("immediate")
        pg.start(SETTINGS)
        pg.sql("insert into t values (1)")
        end = current_flush_lsn(pg)
        rx.wait_for_flush(end)
        assert_log_matches_pg_wal(rx.wal, pg, end)
    finally:
        rx.stop()


RECEIVER_SCRIPT = """
import asyncio, sys
from pathlib import Path
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig

async def main() -> None:
    wal = WalLog.open(Path(sys.argv[1]))
    config = WalReceiverConfig(host="127.0.0.1", port=int(sys.argv[2]), slot_name=sys.argv[3],
                               application_name=sys.argv[4])
    await WalReceiver(config, wal).run()

asyncio.run(main())
"""


def test_killed_receiver_resumes_from_its_log_end(compute: tuple[PgServer, Lsn, int],
                                                  test_dir: Path) -> None:
    pg, start, system_id = compute
    log_dir = test_dir / "wal_log"
    WalLog.create(log_dir, start).close()
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_SCRIPT, str(log_dir), str(pg.port),
                             SLOT, APP_NAME], stdout=subprocess.DEVNULL,
                            stderr=open(test_dir / "receiver.log", "wb"))  # noqa: SIM115
    try:
        pg.sql("create table t (i int, pad text)")
        thread, done = commit_in_thread(
            pg, "insert into t select i, repeat('x', 200) from generate_series(1, 20000) i")

        def log_end() -> int:
            return sum(p.stat().st_size for p in log_dir.iterdir() if len(p.name) == 24)

        first_segment_bytes = start.segment_offset()
        wait_until(lambda: log_end() > first_segment_bytes + (1 << 20), 60,
                   "the receiver to write 1 MB")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert done == []  # mid-stream: the insert's commit was not yet acknowledged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    killed_at = WalLog.open(log_dir)
    end_after_kill = killed_at.end_lsn
    killed_at.close()
    assert end_after_kill > start + (1 << 20)
    rx = ReceiverThread(log_dir, pg, Lsn(0), system_id)
    try:
        thread.join(60)
        assert done == ["ok"]
        end = current_flush_lsn(pg)
        assert end > end_after_kill
        rx.wait_for_flush(end)
        assert rx.notified[0] > end_after_kill
        assert_log_matches_pg_wal(rx.wal, pg, end)
    finally:
        rx.stop()


def test_wrong_system_id_is_refused(compute: tuple[PgServer, Lsn, int], test_dir: Path) -> None:
    pg, start, system_id = compute
    wal = WalLog.create(test_dir / "wal_log", start)

    async def scenario() -> None:
        config = WalReceiverConfig(host=pg.host, port=pg.port, slot_name=SLOT,
                                   application_name=APP_NAME, system_id=system_id + 1)
        with pytest.raises(WrongSystem, match=str(system_id)):
            async with asyncio.timeout(20):
                await WalReceiver(config, wal).run()

    asyncio.run(scenario())
    assert wal.end_lsn == start
    wal.close()


def test_receiver_retries_until_its_slot_exists(pg_factory: Callable[..., PgServer],
                                                test_dir: Path) -> None:
    """A refused START_REPLICATION (no slot yet) is retried with backoff, not fatal."""
    pg = pg_factory("compute")
    pg.initdb()
    pg.start(SETTINGS)
    start = current_flush_lsn(pg)
    rx = ReceiverThread(test_dir / "wal_log", pg, start)
    try:
        wait_until(lambda: "does not exist" in (rx.receiver.last_error or ""), 20,
                   "the missing-slot error")
        assert rx.receiver.connections == 0
        pg.sql("select pg_create_physical_replication_slot(%s, true)", SLOT)
        wait_until(lambda: rx.receiver.connections == 1, 20, "streaming to start")
        pg.sql("create table t (i int)")  # a commit: needs our flush
        end = current_flush_lsn(pg)
        rx.wait_for_flush(end)
        assert_log_matches_pg_wal(rx.wal, pg, end)
    finally:
        rx.stop()

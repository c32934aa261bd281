"""The WAL path with 3 safekeepers end to end (architecture D6, D7): stock PostgreSQL 15
computes whose walproposer sidecar makes commits durable on a majority, a pageserver that
follows the safekeepers, computes started from sync's LSN.

Proves:
- a bank-transfer workload keeps the sum of balances and every acknowledged transfer while
  the safekeepers are restarted one by one (two of three always up), every client keeps
  committing through each restart, and the pageserver moves between safekeepers;
- kill -9 of the compute under load, five times, each time with the head of a record that
  spans pages on the safekeepers and its tail dropped (failpoint walproposer-drop-tail): a
  new compute starts every time, every acknowledged commit is there, and the timeline's WAL
  decodes as one chain (CRC and xl_prev) from its start to the commit LSN; the same in
  pull mode (the safekeepers replicate from the compute, ANY 2), without the cut (the
  sidecar streams nothing to cut);
- pull mode across two WAL segment switches (the safekeepers' segments are preallocated,
  the next one prepared ahead and renamed into place), then kill -9 of all three
  safekeepers at once: they find their WAL's end by decoding (every segment file is full
  size), the compute commits on, and every acknowledged transfer is there;
- two computes on one timeline: the older is stopped once it sees the newer term, only the
  newer commits, and no acknowledged commit is lost;
- two of three safekeepers down for a minute: commits wait, reads work, the compute is not
  stopped, and the waiting commits return once a majority is back;
- backpressure: with ingest slowed by a failpoint, acknowledged WAL stays within the write
  lag limit of what the pageserver ingested, and all WAL the compute wrote within that plus
  its transactions in flight;
- kill -9 of the pageserver with its WAL log's unsynced tail zeroed: it cuts the tail and
  streams it again from the safekeepers, and no acknowledged commit is lost;
- the `--sync` command line prints the same LSNs as the library (and fails with the
  safekeepers' answer for a timeline they lack); the sidecar command line commits through
  the quorum, and exits 3 after stopping its compute when a newer proposer appears.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fixtures_env import Cluster, LoopThread, RunningCompute

from polling import wait_until
from strata.common import failpoint
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import Compute
from strata.pageserver.sk_receiver import start_command
from strata.pg import wire
from strata.pg.pgclient import PgConnection
from strata.pg.walreader import WalStreamDecoder

ACCOUNTS = 50
INITIAL = 1000


@pytest.fixture
def cluster(test_dir: Path, loop: LoopThread) -> Iterator[Cluster]:
    c = Cluster.start(test_dir, loop)
    try:
        yield c
    finally:
        failpoint.disable_all()
        c.stop_all()
    unexpected = c.unexpected_log_errors()
    assert not unexpected, "\n".join(unexpected[:20])


# --- workload ---------------------------------------------------------------------------------
class Bank:
    """Transfers between accounts from several client threads; remembers what was acked."""

    def __init__(self, compute: Compute, clients: int, blob_bytes: int = 0) -> None:
        self.compute = compute
        self.clients = clients
        self.blob_bytes = blob_bytes
        self.acked: set[int] = set()
        self.progress = [0] * clients
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @staticmethod
    def create(compute: Compute) -> None:
        compute.sql("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        compute.sql("CREATE TABLE transfers (id bigint PRIMARY KEY, src int, dst int, "
                    "amount int, blob text)")
        compute.sql(f"INSERT INTO accounts SELECT g, {INITIAL} FROM "
                    f"generate_series(1, {ACCOUNTS}) g")

    def start(self, first_id: int) -> None:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i, first_id + i * 10_000_000),
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _client(self, index: int, next_id: int) -> None:
        import random
        rng = random.Random(next_id)
        try:
            conn = psycopg.connect(self.compute.connstr(), autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            self.errors.append(f"connect: {err}")
            return
        with conn:
            while not self._stop.is_set():
                src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
                amount = rng.randrange(1, 50)
                try:
                    with conn.transaction():
                        conn.execute("UPDATE accounts SET balance = balance + CASE WHEN id = %s "
                                     "THEN -%s::bigint ELSE %s::bigint END WHERE id IN (%s, %s)",
                                     (src, amount, amount, src, dst))
                        blob = (f"SELECT string_agg(md5(random()::text), '') FROM "
                                f"generate_series(1, {self.blob_bytes // 32})"
                                if self.blob_bytes else "SELECT NULL")
                        conn.execute(f"INSERT INTO transfers VALUES (%s, %s, %s, %s, ({blob}))",
                                     (next_id, src, dst, amount))
                except psycopg.errors.DeadlockDetected:
                    continue
                except psycopg.Error as err:
                    self.errors.append(f"client {index}: {err}")
                    return  # the compute is gone
                with self._lock:
                    self.acked.add(next_id)
                self.progress[index] += 1
                next_id += 1


def check_bank(compute: Compute, acked: set[int]) -> None:
    total = compute.sql("SELECT sum(balance), count(*) FROM accounts")[0]
    assert total == (ACCOUNTS * INITIAL, ACCOUNTS), total
    present = {row[0] for row in compute.sql("SELECT id FROM transfers")}
    missing = acked - present
    assert not missing, f"{len(missing)} acknowledged transfers lost, e.g. {sorted(missing)[:5]}"


def start_bank(cluster: Cluster, clients: int, blob_bytes: int = 0) -> tuple[
        TenantId, TimelineId, RunningCompute, Bank]:
    """A new tenant, a compute on it with the bank's tables, and `clients` clients
    transferring (ids from 1)."""
    tenant, timeline = cluster.create_tenant()
    rc = cluster.start_compute(tenant, timeline)
    Bank.create(rc.compute)
    bank = Bank(rc.compute, clients=clients, blob_bytes=blob_bytes)
    bank.start(first_id=1)
    return tenant, timeline, rc, bank


def stop_compute(rc: RunningCompute) -> None:
    rc.run.cancel()
    if rc.compute.is_running():
        rc.compute.kill9()


# --- tests ------------------------------------------------------------------------------------
def test_bank_transfers_survive_rolling_safekeeper_restarts(cluster: Cluster) -> None:
    tenant, timeline, rc, bank = start_bank(cluster, clients=4)
    try:
        for sk in cluster.safekeepers:
            before = list(bank.progress)
            sk.stop()
            # Two of three up: every client keeps committing while this one is down.
            wait_until(lambda b=before: all(p >= q + 3 for p, q in  # type: ignore[misc]
                                            zip(bank.progress, b, strict=True)),
                       30, f"progress of every client with safekeeper {sk.node_id} down")
            sk.start()
            before = list(bank.progress)
            wait_until(lambda b=before: all(p >= q + 3 for p, q in  # type: ignore[misc]
                                            zip(bank.progress, b, strict=True)),
                       30, f"progress after safekeeper {sk.node_id} restarted")
        assert not bank.errors, bank.errors
    finally:
        bank.stop()
    assert rc.fenced == [], rc.fenced
    check_bank(rc.compute, bank.acked)
    # Each safekeeper was down once, so the pageserver had to move to another at least once.
    followed = set(re.findall(r"streaming timeline \S+ from safekeeper (\d+)",
                              cluster.env.pageserver.log_text()))
    assert len(followed) >= 2, followed
    stop_compute(rc)
    # A new compute: every acknowledged transfer, balances intact.
    rc2 = cluster.start_compute(tenant, timeline)
    check_bank(rc2.compute, bank.acked)
    assert len(bank.acked) > 50, len(bank.acked)


def test_kill9_compute_under_load_with_partial_multipage_records(cluster: Cluster) -> None:
    kill9_rounds(cluster, 5)


def test_kill9_compute_under_load_in_pull_mode(cluster: Cluster) -> None:
    cluster.pull = True
    kill9_rounds(cluster, 5)


def test_pull_mode_two_segment_switches_then_kill9_all_safekeepers(cluster: Cluster) -> None:
    cluster.pull = True
    seg = 16 << 20
    tenant, timeline, rc, bank = start_bank(cluster, clients=3, blob_bytes=24_000)
    try:
        first = Lsn.parse(cluster.safekeepers[0].timeline_status(tenant, timeline)["flush_lsn"])
        wait_until(lambda: Lsn.parse(cluster.safekeepers[0].timeline_status(
            tenant, timeline)["flush_lsn"]).segno(seg) >= first.segno(seg) + 2, 180,
            "WAL across two segment boundaries")
        for sk in cluster.safekeepers:
            sk.kill9()
        acked_at_kill = len(bank.acked)
        for sk in cluster.safekeepers:
            sk.start()
        wait_until(lambda: len(bank.acked) >= acked_at_kill + 30, 60,
                   "commits after all safekeepers were killed and restarted")
    finally:
        bank.stop()
    assert not bank.errors, bank.errors
    for sk in cluster.safekeepers:
        directory = sk.workdir / "tenants" / str(tenant) / str(timeline)
        sizes = [p.stat().st_size for p in directory.iterdir() if len(p.name) == 24]
        assert len(sizes) >= 3 and set(sizes) == {seg}, (sk.node_id, sizes)
    assert rc.fenced == [], rc.fenced
    stop_compute(rc)
    rc2 = cluster.start_compute(tenant, timeline)
    check_bank(rc2.compute, bank.acked)


def kill9_rounds(cluster: Cluster, rounds: int) -> int:
    """Run the bank under load, cut a multi-page record (push mode: in pull mode the
    safekeepers read the compute's WAL themselves, and a kill leaves what they pulled of
    a record), kill -9 the compute, start a new one and check it, `rounds` times; then
    check the WAL chain. Returns transfers acked."""
    tenant, timeline = cluster.create_tenant()
    start_lsn = cluster.env.client.timeline(tenant, timeline).last_record_lsn
    rc = cluster.start_compute(tenant, timeline)
    Bank.create(rc.compute)
    acked: set[int] = set()
    for round_no in range(rounds):
        bank = Bank(rc.compute, clients=3, blob_bytes=12_000)
        bank.start(first_id=round_no * 100_000_000 + 1)
        wait_until(lambda b=bank: sum(b.progress) >= 15, 30,  # type: ignore[misc]
                   "transfers before the crash")
        if not cluster.pull:
            failpoint.enable("walproposer-drop-tail")
            wait_until(lambda: failpoint.hits("walproposer-drop-tail") > 0, 30,
                       "a record spanning pages to cut")
        rc.compute.kill9()
        bank.stop()
        failpoint.disable("walproposer-drop-tail")
        stop_compute(rc)
        acked |= bank.acked
        rc = cluster.start_compute(tenant, timeline)
        check_bank(rc.compute, acked)
    check_chain(cluster, tenant, timeline, start_lsn, rc.start.lsn)
    info = cluster.env.client.timeline(tenant, timeline)
    assert info.broken_reason is None and info.last_record_lsn >= rc.start.lsn, info
    return len(acked)


def check_chain(cluster: Cluster, tenant: TenantId, timeline: TimelineId, start: Lsn,
                end: Lsn) -> None:
    """The safekeepers' committed WAL [start, end) decodes as one chain of records."""
    sk = cluster.safekeepers[0]

    async def fetch() -> bytes:
        conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="strata",
                                          replication="true")
        out = bytearray()
        try:
            stream = await conn.start_copy_both(start_command(tenant, timeline, start))
            while len(out) < end - start:
                payload = await stream.read()
                assert payload is not None
                msg = wire.decode_replication(payload)
                if isinstance(msg, wire.XLogData):
                    assert msg.start_lsn == start.value + len(out)
                    out += msg.data
        finally:
            conn.abort()
        return bytes(out[:end - start])

    data = asyncio.run(asyncio.wait_for(fetch(), 60))
    decoder = WalStreamDecoder(start, 16 << 20, at_record_start=True)
    decoder.feed(data)
    last_end = start.value
    count = 0
    for record in decoder:
        last_end = record.end_lsn
        count += 1
    assert last_end == end.value, (Lsn(last_end), end, count)


def test_pageserver_kill9_with_a_torn_wal_log_tail(cluster: Cluster) -> None:
    """The pageserver does not fsync the WAL it takes from the safekeepers: after a crash
    it cuts its log back to disk_consistent_lsn and streams the rest again. Here the log's
    whole tail above disk_consistent_lsn is zeroed while it is down (what a machine crash
    may leave of unsynced bytes); every acknowledged commit is still there afterwards."""
    tenant, timeline, rc, bank = start_bank(cluster, clients=2)
    try:
        wait_until(lambda: sum(bank.progress) >= 30, 30, "transfers before the crash")
        ps = cluster.env.pageserver
        info = ps.client.timeline(tenant, timeline)
        ps.kill9()
        wal_dirs = [p.parent for p in ps.workdir.rglob("wal_log.meta")
                    if str(timeline) in str(p)]
        assert len(wal_dirs) == 1, wal_dirs
        seg = 16 << 20
        zeroed = 0
        for path in wal_dirs[0].iterdir():
            if len(path.name) != 24:
                continue
            base = int(path.name[8:16], 16) * 0x1_0000_0000 + int(path.name[16:], 16) * seg
            size = path.stat().st_size
            cut = max(info.disk_consistent_lsn.value - base, 0)
            if cut < size:
                with open(path, "r+b") as f:
                    f.seek(cut)
                    f.write(bytes(size - cut))
                zeroed += size - cut
        assert zeroed > 0, (info, sorted(p.name for p in wal_dirs[0].iterdir()))
        ps.start()
        wait_until(lambda: sum(bank.progress) >= 60, 30, "transfers after the restart")
    finally:
        bank.stop()
    assert not bank.errors, bank.errors
    assert "cutting the unsynced WAL log tail" in cluster.env.pageserver.log_text()
    stop_compute(rc)
    rc2 = cluster.start_compute(tenant, timeline)  # its basebackup waits for ingest
    check_bank(rc2.compute, bank.acked)
    info = cluster.env.client.timeline(tenant, timeline)
    assert info.broken_reason is None and info.last_record_lsn >= rc2.start.lsn, info


def test_two_computes_older_is_fenced(cluster: Cluster) -> None:
    tenant, timeline, old, bank = start_bank(cluster, clients=2)
    wait_until(lambda: sum(bank.progress) >= 20, 30, "transfers on the old compute")
    new = cluster.start_compute(tenant, timeline)  # sync takes a higher term
    wait_until(lambda: not old.compute.is_running(), 30, "the old compute to be stopped")
    bank.stop()
    assert old.fenced and "another proposer" in old.fenced[0], old.fenced
    # Every transfer the old compute acknowledged is on the new one, which commits on.
    check_bank(new.compute, bank.acked)
    new.compute.sql("INSERT INTO transfers VALUES (-1, 1, 2, 0, NULL)")
    assert new.fenced == [], new.fenced


def test_majority_lost_for_a_minute_commits_wait_then_complete(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    tenant, timeline = cluster.create_tenant()
    rc = cluster.start_compute(tenant, timeline)
    compute = rc.compute
    compute.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    compute.sql("INSERT INTO t VALUES (1, 'before')")
    for sk in cluster.safekeepers[:2]:
        sk.kill9()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(compute.sql, "INSERT INTO t VALUES (%s, 'during')", i)
                   for i in (2, 3)]
        # A minute without a majority: the commits wait, reads work, nothing is stopped.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, _ = concurrent.futures.wait(pending, timeout=5)
            assert not done, [f.result() for f in done]
            assert compute.sql("SELECT v FROM t WHERE id = 1") == [("before",)]
            assert compute.is_running() and rc.fenced == [], rc.fenced
        assert "commits wait until a majority is back" in caplog.text
        for sk in cluster.safekeepers[:2]:
            sk.start()
        for f in pending:
            f.result(60)  # returns once a majority has the commit again
    assert rc.fenced == [] and compute.is_running()
    compute.sql("INSERT INTO t VALUES (4, 'after')")
    assert compute.sql("SELECT id FROM t ORDER BY id") == [(1,), (2,), (3,), (4,)]
    # Every acknowledged commit is on the quorum: a new compute sees them.
    stop_compute(rc)
    rc2 = cluster.start_compute(tenant, timeline)
    assert rc2.compute.sql("SELECT count(*) FROM t") == [(4,)]


def test_backpressure_with_slow_ingest(test_dir: Path, loop: LoopThread,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_FAILPOINTS", "ingest-apply-record=sleep(0.002)")
    cluster = Cluster.start(test_dir, loop)
    limit = 512 << 10
    try:
        cluster.sidecar_settings = {
            "pageserver_http": ("127.0.0.1", cluster.env.pageserver.http_port),
            "max_write_lag_bytes": limit}
        tenant, timeline, rc, bank = start_bank(cluster, clients=4, blob_bytes=2000)
        worst = 0
        worst_written = 0  # all WAL the compute wrote, acknowledged or not
        deadline = time.monotonic() + 6
        try:
            while time.monotonic() < deadline:
                reported = rc.sidecar.reported_lsn
                written = Lsn.parse(str(rc.compute.sql("SELECT pg_current_wal_flush_lsn()")
                                        [0][0]))
                ingested = cluster.env.client.timeline(tenant, timeline).last_record_lsn
                worst = max(worst, reported - ingested)
                worst_written = max(worst_written, written - ingested)
                time.sleep(0.05)
        finally:
            bank.stop()
        assert worst <= limit, (worst, limit)
        # The compute's writes slowed to ingest's pace: beyond the limit only what the
        # four clients had in flight (a transaction of a few pages each).
        assert worst_written <= limit + (512 << 10), (worst_written, limit)
        assert rc.sidecar.held_back_s > 0.5, rc.sidecar.held_back_s
        assert not bank.errors and sum(bank.progress) > 20, (bank.errors, bank.progress)
    finally:
        cluster.stop_all()
    unexpected = cluster.unexpected_log_errors()
    assert not unexpected, "\n".join(unexpected[:20])


def test_sync_command_line(cluster: Cluster) -> None:
    tenant, timeline = cluster.create_tenant()
    sks = ",".join(f"{sk.node_id}@127.0.0.1:{sk.pg_port}" for sk in cluster.safekeepers)
    out = subprocess.run(
        [sys.executable, "-m", "strata.compute.walproposer", "--sync", "--tenant", str(tenant),
         "--timeline", str(timeline), "--safekeepers", sks,
         "--system-id", str(cluster.system_ids[timeline])],
        capture_output=True, timeout=60, check=True)
    printed = json.loads(out.stdout)
    info = cluster.env.client.timeline(tenant, timeline)
    assert printed == {"lsn": str(info.last_record_lsn), "prev_lsn": str(info.prev_record_lsn)}
    again = cluster.sync(tenant, timeline)
    assert (str(again.lsn), str(again.prev_lsn)) == (printed["lsn"], printed["prev_lsn"])
    # A timeline the safekeepers do not have: exit 1 with the safekeepers' answer.
    missing = subprocess.run(
        [sys.executable, "-m", "strata.compute.walproposer", "--sync", "--tenant", str(tenant),
         "--timeline", str(TimelineId.generate()), "--safekeepers", sks, "--timeout-s", "2",
         "--system-id", str(cluster.system_ids[timeline])], capture_output=True, timeout=60)
    assert missing.returncode == 1, missing
    assert b"did not finish in 2.0s" in missing.stderr, missing.stderr


def test_sidecar_command_line_commits_then_is_fenced(cluster: Cluster) -> None:
    tenant, timeline = cluster.create_tenant()
    start = cluster.sync(tenant, timeline)
    compute = cluster.start_postgres(tenant, timeline, start)
    argv = cluster.sidecar_argv(tenant, timeline, compute) + ["--quorum-warn-s", "3"]
    with open(cluster.test_dir / "sidecar.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
    try:
        compute.sql("CREATE TABLE t (i int)")
        compute.sql("INSERT INTO t VALUES (1)")  # returns once a majority has it
        later = cluster.sync(tenant, timeline)  # a newer proposer
        assert later.lsn > start.lsn
        assert proc.wait(20) == 3
        assert proc.stdout is not None
        assert "another proposer" in json.loads(proc.stdout.read() or b"{}")["fenced"]
        wait_until(lambda: not compute.is_running(), 10, "the fenced compute to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    # What it committed is where the next compute starts.
    rc = cluster.start_compute(tenant, timeline)
    assert rc.compute.sql("SELECT i FROM t") == [(1,)]


def test_sidecar_process_runs_as_endpoint_start_runs_it(cluster: Cluster) -> None:
    """`Cluster.start_compute_process` (what bench/safekeepers.py measures): the sidecar's
    supervisor and the walproposer it forks in a session of their own, not the test's
    (with autogroups, a sidecar in the test's or bench's session would share one CPU share
    with it and pgbench); commits go through the quorum in pull mode; SIGTERM stops the
    walproposer and PostgreSQL, as `strata endpoint stop` does."""
    cluster.pull = True
    tenant, timeline = cluster.create_tenant()
    sc = cluster.start_compute_process(tenant, timeline, pageserver_http=True)
    proc = sc.sidecar.proc
    assert proc is not None and sc.sidecar_exited() is None
    assert os.getsid(proc.pid) == proc.pid != os.getsid(0), (proc.pid, os.getsid(0))
    children = [int(pid) for pid in
                Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) == 1, children  # the forked walproposer, in the same session
    assert os.getsid(children[0]) == proc.pid
    assert "walproposer" in sc.sidecar.log_text()
    sc.compute.sql("CREATE TABLE t (i int)")
    sc.compute.sql("INSERT INTO t VALUES (1)")  # returns once a majority has it
    assert sc.compute.sql("SELECT application_name, sync_state FROM pg_stat_replication "
                          "WHERE application_name LIKE 'sk%' ORDER BY 1") == \
        [("sk1", "quorum"), ("sk2", "quorum"), ("sk3", "quorum")]
    assert sc.sidecar.stop() == 0
    wait_until(lambda: not sc.compute.is_running(), 10, "the sidecar's stop to stop PostgreSQL")
    assert not Path(f"/proc/{children[0]}").exists()
    assert sc.sidecar_exited() is not None
    # What it committed is where the next compute starts.
    rc = cluster.start_compute(tenant, timeline)
    assert rc.compute.sql("SELECT i FROM t") == [(1,)]

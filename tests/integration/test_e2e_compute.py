"""Issue 5 end to end: stock PostgreSQL 15 computes run on the pageserver process.

Each test creates a tenant over HTTP (initdb + import), starts computes from
basebackups (the pageserver is their synchronous standby, dev mode D7), and checks
what a new compute sees against what the old one had: pg_dump output, pgbench
balances, index-only scans against sequential scans, prepared transactions, unlogged
tables, the golden page check, branches at an LSN and at a timestamp, a SIGKILL of the
pageserver during ingest, and a session that turns wal_consistency_checking off.
"""

from __future__ import annotations

import difflib
import io
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fixtures_env import Env, PageserverProcess

from polling import wait_until
from strata.common.errors import CorruptionError, StrataError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute import golden
from strata.compute.pgserver import PgServer
from strata.pageserver.wal_log import WalLog
from strata.pg import records
from strata.pg.records.xact import XactCommit
from strata.pg.relfile import RelTag
from strata.pg.walreader import WalStreamDecoder
from strata.storage.repository import Repository

sys.path.insert(0, str(Path(__file__).parent.parent))
from pgworkload import run_workload  # noqa: E402

PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000  # 2000-01-01 (PostgreSQL's epoch) - 1970-01-01
_SETVAL = re.compile(r"^SELECT pg_catalog\.setval\('([^']+)', (\d+), (true|false)\);$")


# --- helpers ----------------------------------------------------------------------------------
def flush_lsn(server: PgServer) -> Lsn:
    return Lsn.parse(server.sql("select pg_current_wal_flush_lsn()::text")[0][0])


def wait_ingested(env: Env, tenant: TenantId, timeline: TimelineId, server: PgServer,
                  timeout_s: float = 60) -> Lsn:
    """Wait until the pageserver has ingested all the compute has flushed; returns the
    pageserver's last_record_lsn (a record end)."""
    target = flush_lsn(server)
    # A flush position just past a page header means the last record ended at the page start.
    floor = target.page_start() if target.page_offset() <= 40 else target
    wait_until(lambda: env.client.timeline(tenant, timeline).last_record_lsn >= floor,
               timeout_s, f"ingest up to {target}")
    return env.client.timeline(tenant, timeline).last_record_lsn


def commits_in_log(env: Env, tenant: TenantId, timeline: TimelineId) -> list[tuple[Lsn, int]]:
    """(end LSN, commit time in microseconds since the Unix epoch) of every commit record in
    the timeline's WAL log, read with our own decoder (the first segment of the log is
    sparse before its start, which pg_waldump refuses)."""
    directory = (env.pageserver.workdir / "tenants" / str(tenant) / "timelines" /
                 str(timeline) / "wal")
    wal = WalLog.open(directory)
    try:
        decoder = WalStreamDecoder(wal.start_lsn, wal.seg_size, at_record_start=True)
        decoder.feed(wal.read(wal.start_lsn, wal.end_lsn))
        out = []
        for record in decoder:
            decoded = records.decode(record)
            if isinstance(decoded, XactCommit):
                out.append((record.end, decoded.commit_time + PG_EPOCH_OFFSET_US))
        return out
    finally:
        wal.close()


def iso(unix_us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=unix_us)).isoformat()


def pg_dump(server: PgServer, dbname: str = "postgres") -> str:
    out = server.run_tool("pg_dump", "-h", server.host, "-p", str(server.port), "-U",
                          "postgres", "--no-sync", "--no-unlogged-table-data", dbname)
    # pg_dump 15.14+ frames the script with a random \\restrict key; it is not data.
    return "\n".join(line for line in out.stdout.decode().splitlines()
                     if not line.startswith(("\\restrict ", "\\unrestrict ")))


def split_sequences(dump: str) -> tuple[str, dict[str, int]]:
    """The dump without its setval lines, and the sequence values they set."""
    lines, values = [], {}
    for line in dump.splitlines():
        m = _SETVAL.match(line)
        if m:
            values[m.group(1)] = int(m.group(2))
        else:
            lines.append(line)
    return "\n".join(lines), values


def assert_same_dump(old: str, new: str) -> None:
    """Identical but for sequences, which may be ahead: their WAL image is logged ahead
    of the value, as after a PostgreSQL crash restart (architecture D2)."""
    old_body, old_seqs = split_sequences(old)
    new_body, new_seqs = split_sequences(new)
    if old_body != new_body:
        diff = difflib.unified_diff(old_body.splitlines(), new_body.splitlines(), "before",
                                    "after", lineterm="", n=2)
        raise AssertionError("pg_dump differs:\n" + "\n".join(list(diff)[:60]))
    assert old_seqs.keys() == new_seqs.keys()
    for name, value in old_seqs.items():
        assert value <= new_seqs[name] <= value + 32, (name, value, new_seqs[name])


def pgbench(server: PgServer, *args: str) -> str:
    out = server.run_tool("pgbench", "-h", server.host, "-p", str(server.port), "-U",
                          "postgres", *args, "postgres")
    return out.stdout.decode() + out.stderr.decode()


def assert_balances(server: PgServer) -> int:
    """pgbench's invariant: every delta is in history and in each balance column."""
    accounts, branches, tellers, history, n = server.sql(
        "select (select sum(abalance) from pgbench_accounts), "
        "(select sum(bbalance) from pgbench_branches), "
        "(select sum(tbalance) from pgbench_tellers), "
        "(select coalesce(sum(delta), 0) from pgbench_history), "
        "(select count(*) from pgbench_history)")[0]
    assert accounts == branches == tellers == history, (accounts, branches, tellers, history)
    return int(n)


EXTRA_SQL = [
    # GiST with many page splits (the left child's NSN/F_FOLLOW_RIGHT fix-up, D2).
    "create table boxes (id int, b box)",
    "create index boxes_gist on boxes using gist (b)",
    "insert into boxes select g, box(point(g % 300, g / 300), point(g % 300 + 1, g / 300 + 1))"
    " from generate_series(1, 20000) g",
    # TOAST with compressible and incompressible values.
    "create table toasty (id int primary key, t text)",
    "insert into toasty select g, repeat(md5(g::text), 300) from generate_series(1, 50) g",
    "insert into toasty select 100 + g, string_agg(md5(g::text || x::text), '') "
    "from generate_series(1, 5) g, generate_series(1, 200) x group by g",
]


def run_everything(server: PgServer) -> None:
    pgbench(server, "-i", "-s", "1", "-q")
    pgbench(server, "-c", "2", "-t", "100", "-n")
    run_workload(server)
    for statement in EXTRA_SQL:
        server.sql(statement)
    # CREATE DATABASE of a database with data, with both strategies (the workload's
    # file_copy database is dropped again).
    server.sql("create database src_db")
    server.sql("create table s (a int primary key, b text)", dbname="src_db")
    server.sql("insert into s select g, md5(g::text) from generate_series(1, 5000) g",
               dbname="src_db")
    server.sql("create database db_fc template src_db strategy file_copy")
    server.sql("create database db_wl template src_db strategy wal_log")
    server.sql("insert into s values (0, 'only in src_db')", dbname="src_db")


def dumps(server: PgServer) -> dict[str, str]:
    dbs = [r[0] for r in server.sql("select datname from pg_database where datallowconn "
                                    "order by 1")]
    return {db: pg_dump(server, db) for db in dbs}


# --- tests ------------------------------------------------------------------------------------
def test_workload_survives_a_new_compute_and_pages_are_golden(env: Env) -> None:
    """pgbench, DDL, every index type, GiST splits, TOAST, sequences, subtransactions, large
    objects and CREATE DATABASE (both strategies) written through compute 1 are exactly
    what compute 2 sees; every page of compute 2 equals the pageserver's page (golden)."""
    tenant, timeline = env.client.create_tenant()
    c1 = env.start_compute(tenant, timeline)
    run_everything(c1)
    before = dumps(c1)
    assert set(before) == {"postgres", "db_wal", "template1", "src_db", "db_fc", "db_wl"}
    c1.stop("fast")

    c2 = env.start_compute(tenant, timeline)
    after = dumps(c2)
    assert after.keys() == before.keys()
    for db in before:
        assert_same_dump(before[db], after[db])
    assert assert_balances(c2) == 200
    for db in ("db_fc", "db_wl"):
        assert c2.sql("select count(*), min(a) from s", dbname=db) == [(5000, 1)]
    # The compute is writable and its WAL is ingested.
    c2.sql("insert into items values (200000, 2, 'on compute 2', null)")
    wait_ingested(env, tenant, timeline, c2)
    check_golden(env, tenant, timeline, c2)


def check_golden(env: Env, tenant: TenantId, timeline: TimelineId, compute: PgServer) -> None:
    """Golden page check of a quiescent compute against the pageserver's pages, read from
    the pageserver's files after a clean stop (there is no page service yet)."""
    state: dict[str, object] = {}

    def page_source(spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        if "timeline" not in state:
            lsn = wait_ingested(env, tenant, timeline, compute)
            env.client.checkpoint(tenant, timeline)
            assert env.pageserver.stop() == 0, env.pageserver.log_tail()
            repo = Repository(env.pageserver.workdir)
            state.update(repo=repo, lsn=lsn,
                         timeline=repo.get_tenant(tenant).get_timeline(timeline))
        tl = state["timeline"]
        return tl.get_rel_page(RelTag(spc, db, rel, fork), blkno, state["lsn"])  # type: ignore[attr-defined, no-any-return]

    report = golden.golden_check(compute.datadir, compute.connect, page_source)
    if "repo" in state:
        state["repo"].close()  # type: ignore[attr-defined]
    print(report.summary())
    report.raise_if_failed()
    assert report.pages_checked > 1000, report.summary()


def test_branches_at_lsn_and_timestamp(env: Env) -> None:
    """A branch at a past LSN and one at a past timestamp see exactly the data of that
    moment; writes on a branch and on its parent stay apart; a branch of a branch works;
    a read-only compute at the past LSN sees the same."""
    tenant, main = env.client.create_tenant()
    c = env.start_compute(tenant, main)
    c.sql("create table t (id int primary key, v text)")
    c.sql("insert into t select g, 'one' from generate_series(1, 1000) g")
    lsn1 = wait_ingested(env, tenant, main, c)
    dump1 = pg_dump(c)
    c.sql("insert into t select g, 'two' from generate_series(1001, 2000) g")
    c.sql("update t set v = 'changed' where id <= 10")
    wait_ingested(env, tenant, main, c)
    dump2 = pg_dump(c)
    assert dump2 != dump1

    # The commit of the first batch, with its exact timestamp, from the pageserver's log.
    end1, time1 = [(end, ts) for end, ts in commits_in_log(env, tenant, main) if end <= lsn1][-1]
    assert env.client.lsn_by_timestamp(tenant, main, iso(time1)) == end1
    assert env.client.lsn_by_timestamp(tenant, main, iso(time1 - 1)) < end1
    b_lsn = env.client.branch(tenant, main, lsn=lsn1)
    b_ts = env.client.branch(tenant, main, timestamp=iso(time1))  # that commit is included
    assert b_lsn.ancestor_lsn == lsn1 and b_ts.ancestor_lsn == end1

    ro = env.start_compute(tenant, main, lsn=lsn1, read_only=True)
    assert pg_dump(ro) == dump1
    ro.stop("fast")
    cb = env.start_compute(tenant, b_lsn.timeline_id)
    assert_same_dump(dump1, pg_dump(cb))
    ct = env.start_compute(tenant, b_ts.timeline_id)
    assert_same_dump(dump1, pg_dump(ct))

    # Writes on the branch stay on it; writes on the parent stay there.
    cb.sql("insert into t values (-1, 'branch only')")
    c.sql("insert into t values (-2, 'main only')")
    assert cb.sql("select count(*), sum(id) from t") == [(1001, 500499)]
    assert c.sql("select count(*) from t where id < 0") == [(1,)]
    assert c.sql("select v from t where id < 0") == [("main only",)]
    assert ct.sql("select count(*) from t") == [(1000,)]

    # A branch of the branch, at its current end.
    b_lsn_end = wait_ingested(env, tenant, b_lsn.timeline_id, cb)
    bb = env.client.branch(tenant, b_lsn.timeline_id, lsn=b_lsn_end)
    cbb = env.start_compute(tenant, bb.timeline_id)
    assert cbb.sql("select v from t where id < 0") == [("branch only",)]
    assert cbb.sql("select count(*) from t") == [(1001,)]
    cbb.sql("insert into t values (-3, 'grandchild')")
    assert cb.sql("select count(*) from t where id = -3") == [(0,)]
    c.stop("fast")
    c_again = env.start_compute(tenant, main)
    assert c_again.sql("select count(*), min(id) from t") == [(2001, -2)]


def test_truncate_regrowth_vacuum_no_resurrection(env: Env) -> None:
    """TRUNCATE in the creating transaction, sparse regrowth, VACUUM truncation and
    regrowth: a new compute sees no resurrected rows, and index-only scans agree with
    sequential scans."""
    tenant, timeline = env.client.create_tenant()
    c1 = env.start_compute(tenant, timeline)
    with c1.connect(autocommit=False) as conn:
        conn.execute("create table r (id int, pad text)")
        conn.execute("insert into r select g, repeat('x', 200) from generate_series(1, 20000) g")
        conn.execute("truncate r")
        conn.commit()
    c1.sql("create index r_id on r (id)")
    c1.sql("insert into r select g, 'sparse' from generate_series(1, 20000, 997) g")
    c1.sql("create table v (id int primary key, pad text)")
    c1.sql("insert into v select g, repeat('y', 300) from generate_series(1, 10000) g")
    c1.sql("delete from v where id > 2000")
    c1.sql("vacuum v")  # truncates the heap's empty tail
    c1.sql("insert into v select g, 'regrown' from generate_series(2001, 2500) g")
    c1.sql("vacuum v")  # sets all-visible bits: index-only scans use them
    expected_r = c1.sql("select count(*), sum(id) from r")
    expected_v = c1.sql("select count(*), sum(id), count(*) filter (where pad = 'regrown') "
                        "from v")
    c1.stop("fast")

    c2 = env.start_compute(tenant, timeline)
    assert c2.sql("select count(*), sum(id) from r") == expected_r
    assert c2.sql("select count(*), sum(id), count(*) filter (where pad = 'regrown') "
                  "from v") == expected_v
    assert expected_r[0][0] == 21
    with c2.connect() as conn:
        conn.execute("set enable_seqscan = off; set enable_bitmapscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "explain select count(*), sum(id) from v where id > 0").fetchall())
        assert "Index Only Scan" in plan, plan
        ios = conn.execute("select count(*), sum(id) from v where id > 0").fetchall()
        conn.execute("set enable_seqscan = on; set enable_indexscan = off; "
                     "set enable_indexonlyscan = off")
        seq = conn.execute("select count(*), sum(id) from v where id > 0").fetchall()
    assert ios == seq == [(expected_v[0][0], expected_v[0][1])]


def test_prepared_transaction_and_unlogged_table(env: Env) -> None:
    """A transaction prepared before X is still prepared on a compute started at X and can
    be committed there; unlogged tables come back empty and usable."""
    tenant, timeline = env.client.create_tenant()
    c1 = env.start_compute(tenant, timeline)
    c1.sql("create table p (id int)")
    c1.sql("create unlogged table ul (a int primary key, b text)")
    c1.sql("insert into ul select g, md5(g::text) from generate_series(1, 500) g")
    with c1.connect(autocommit=False) as conn:
        conn.execute("insert into p values (42)")
        conn.execute("prepare transaction 'px'")
    c1.stop("fast")

    c2 = env.start_compute(tenant, timeline)
    assert c2.sql("select gid from pg_prepared_xacts") == [("px",)]
    assert c2.sql("select count(*) from p") == [(0,)]
    c2.sql("commit prepared 'px'")
    assert c2.sql("select id from p") == [(42,)]
    assert c2.sql("select count(*) from ul") == [(0,)]
    c2.sql("insert into ul values (1, 'again')")
    assert c2.sql("select b from ul where a = 1") == [("again",)]
    c2.stop("fast")
    c3 = env.start_compute(tenant, timeline)
    assert c3.sql("select id from p") == [(42,)]
    assert c3.sql("select gid from pg_prepared_xacts") == []


def test_pageserver_kill9_during_ingest(env: Env) -> None:
    """SIGKILL of the pageserver while pgbench commits through it; after a restart it
    reconnects to the compute by itself, and a new compute has every committed
    transaction (balances add up, pg_dump equal)."""
    tenant, timeline = env.client.create_tenant(config={"checkpoint_distance": 1 << 20})
    c1 = env.start_compute(tenant, timeline)
    pgbench(c1, "-i", "-s", "1", "-q")
    errors: list[BaseException] = []

    def bench() -> None:
        try:
            pgbench(c1, "-c", "2", "-T", "6", "-n")
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    thread = threading.Thread(target=bench)
    thread.start()
    time.sleep(2)
    env.pageserver.kill9()
    time.sleep(0.5)
    env.pageserver.start()
    thread.join(60)
    assert not thread.is_alive()
    assert not errors, errors
    n = assert_balances(c1)
    assert n > 0
    before = pg_dump(c1)
    c1.stop("fast")
    c2 = env.start_compute(tenant, timeline)
    assert_same_dump(before, pg_dump(c2))
    assert assert_balances(c2) == n
    info = env.client.timeline(tenant, timeline)
    assert info.disk_consistent_lsn > info.initdb_lsn  # layers were flushed along the way
    check_golden(env, tenant, timeline, c2)


def test_consistency_checking_off_breaks_the_timeline(env: Env) -> None:
    """A session that turns wal_consistency_checking off and writes: the timeline is marked
    broken with the record's LSN, and basebackup and compute_start refuse."""
    env.allowed_log_errors.append(r"marked broken: the Heap \S+ record at [0-9A-F]+/")
    tenant, timeline = env.client.create_tenant()
    c1 = env.start_compute(tenant, timeline)
    c1.sql("create table w (id int)")
    c1.sql("checkpoint")
    with c1.connect() as conn:
        conn.execute("set wal_consistency_checking = ''")
        for i in range(5):  # the first insert after the checkpoint has a full-page image
            conn.execute("insert into w values (%s)", (i,))
    wait_until(lambda: env.client.timeline(tenant, timeline).state == "Broken", 30,
               "the timeline to be marked broken")
    info = env.client.timeline(tenant, timeline)
    assert info.broken_reason is not None
    assert re.search(r"[0-9A-F]+/[0-9A-F]+", info.broken_reason), info.broken_reason
    assert "Heap" in info.broken_reason, info.broken_reason
    with pytest.raises(StrataError, match="broken"):
        env.client.basebackup(tenant, timeline, io.BytesIO())
    with pytest.raises(CorruptionError, match="broken"):
        env.client.compute_start(tenant, timeline)
def test_http_errors_are_json_and_a_second_pageserver_is_refused(env: Env) -> None:
    """Bad ids and bodies get a 4xx with a JSON message naming the problem (never a 500),
    and a second pageserver on the same directory refuses to start."""
    client = env.client
    tenant, timeline = client.create_tenant()

    def status_of(method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{env.pageserver.http_port}{path}",
                                     data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            return err.code, json.loads(text)["error"]

    other = TenantId.generate()
    tl = f"/v1/tenant/{tenant}/timeline"
    cases = [
        ("GET", "/v1/tenant/not-hex/timeline", None, 400, "invalid TenantId"),
        ("GET", f"/v1/tenant/{other}/timeline", None, 404, str(other)),
        ("GET", f"{tl}/{TimelineId.generate()}", None, 404, "not in tenant"),
        ("POST", tl, b"{not json", 400, "not valid JSON"),
        ("POST", tl, b"[1]", 400, "JSON object"),
        ("POST", tl, b"{}", 400, "ancestor_timeline_id"),
        ("POST", tl, json.dumps({"ancestor_timeline_id": str(timeline),
                                 "ancestor_lsn": "nonsense"}).encode(), 400, "invalid LSN"),
        ("POST", tl, json.dumps({"ancestor_timeline_id": str(timeline),
                                 "ancestor_lsn": "FF/0"}).encode(), 400, "beyond its last"),
        ("GET", f"{tl}/{timeline}/get_lsn_by_timestamp?timestamp=yesterday", None, 400,
         "invalid timestamp"),
        ("GET", f"{tl}/{timeline}/get_lsn_by_timestamp?timestamp=2000-01-01T00:00:00", None,
         404, "no commit"),
        ("POST", f"{tl}/{timeline}/wal_receiver",
         json.dumps({"host": "127.0.0.1", "port": 1, "slot": "Bad-Slot",
                     "application_name": "x"}).encode(), 400, "slot name"),
        ("POST", f"{tl}/{timeline}/wal_receiver",
         json.dumps({"host": "127.0.0.1", "port": "1", "slot": "s",
                     "application_name": "x"}).encode(), 400, "'port' must be a int"),
    ]
    for method, path, body, status, fragment in cases:
        got_status, message = status_of(method, path, body)
        assert (got_status, fragment in message) == (status, True), (path, got_status, message)
    assert client.timeline(tenant, timeline).state == "Active"

    second = PageserverProcess(env.pageserver.workdir, env.test_dir / "second.log")
    with pytest.raises(AssertionError, match="another pageserver is running"):
        second.start(timeout_s=30)

"""A stock PostgreSQL 15 compute starts from Strata's basebackup, as a primary and a hot standby.

Proves, against real PostgreSQL 15 processes:
* a freshly initdb'ed data directory imported into a timeline gives a basebackup whose
  relation files, SLRU segments and relation maps are byte-for-byte the original's;
* a compute on it starts "shut down" at X with no recovery, takes writes, and
  pg_waldump reads one unbroken prev-chain from the synthesized checkpoint at X;
  the walproposer's slot is the only slot, with restart_lsn X;
* a read-only backup starts as a hot standby: reads work, writes are refused (also after
  ingest, with a prepared transaction);
* after import + a workload on a separate PostgreSQL + ingest of its WAL, a compute at the
  end LSN has the same pg_dump, the prepared transaction still prepared (and it can be
  committed), the unlogged table empty; a compute at an LSN between two phases has
  exactly the first phase's data;
* our data page checksum equals PostgreSQL's on every page of an initdb --data-checksums.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import Compute, ComputeConfig
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.basebackup import BasebackupLsns, write_basebackup
from strata.pageserver.import_datadir import import_new_timeline
from strata.pageserver.ingest import WalIngest
from strata.pg.checksum import with_checksum
from strata.pg.page import is_new
from strata.pg.relfile import parse_path
from strata.pg.walreader import read_wal_files
from strata.storage.repository import Repository
from strata.storage.timeline import Timeline

# Commits must not wait for a WAL receiver: none runs in these tests.
PRIMARY = ComputeConfig(receiver_name=None)
WALDUMP_LINE = re.compile(r"lsn: (\S+), prev (\S+), desc: (\S+)")


def new_timeline(test_dir: Path, datadir: Path) -> Timeline:
    repo = Repository(test_dir / "pageserver")
    tenant = repo.create_tenant(TenantId(TenantId.generate().raw))
    return import_new_timeline(tenant, TimelineId(TimelineId.generate().raw), datadir)


def basebackup(timeline: Timeline, lsn: Lsn, **kwargs: object) -> tuple[BasebackupLsns, bytes]:
    out = io.BytesIO()
    lsns = write_basebackup(timeline, lsn, out, **kwargs)  # type: ignore[arg-type]
    return lsns, out.getvalue()


def start_compute(test_dir: Path, name: str, tar: bytes,
                  config: ComputeConfig = PRIMARY) -> Compute:
    compute = Compute.from_basebackup(io.BytesIO(tar), test_dir / name, config,
                                      log_path=test_dir / f"{name}.log")
    try:
        compute.start()
    except BaseException:
        compute.kill9()
        raise
    return compute


def relation_and_slru_files(datadir: Path) -> dict[str, bytes]:
    """Relation segment files, pg_filenode.map files and SLRU segments, by relative path."""
    out = {}
    for path in sorted(datadir.rglob("*")):
        rel = path.relative_to(datadir).as_posix()
        if not path.is_file():
            continue
        if parse_path(rel) is not None or path.name == "pg_filenode.map" or \
                rel.startswith(("pg_xact/", "pg_multixact/")):
            out[rel] = path.read_bytes()
    return out


def test_compute_starts_on_imported_initdb(test_dir: Path,
                                            pg_factory: Callable[..., PgServer]) -> None:
    """Primary: identical files, clean start at X, writes, valid WAL chain, one slot at X."""
    source = pg_factory("source")
    source.initdb()
    timeline = new_timeline(test_dir, source.datadir)
    x = timeline.last_record_lsn
    t0 = time.monotonic()
    (record_lsn, end_lsn), tar = basebackup(timeline, x)
    elapsed = time.monotonic() - t0
    print(f"basebackup of a fresh initdb: {len(tar) / 1e6:.1f} MB in {elapsed:.2f}s")
    assert record_lsn == x  # X is mid-page after initdb's checkpoint
    assert end_lsn == (x + 114).align(8)

    compute = Compute.from_basebackup(io.BytesIO(tar), test_dir / "compute", PRIMARY,
                                      log_path=test_dir / "compute.log")
    original = relation_and_slru_files(source.datadir)
    restored = relation_and_slru_files(compute.datadir)
    assert sorted(restored) == sorted(original)
    for path, data in original.items():
        assert restored[path] == data, path
    assert not (compute.datadir / "postmaster.pid").exists()

    compute.start()
    log_text = (test_dir / "compute.log").read_text()
    assert "database system was shut down at" in log_text
    assert "redo starts" not in log_text and "automatic recovery" not in log_text
    compute.sql("create table t (a int primary key, b text)")
    compute.sql("insert into t select g, 'row ' || g from generate_series(1, 1000) g")
    assert compute.sql("select count(*), sum(a) from t") == [(1000, 500500)]
    slots = compute.sql("select slot_name, slot_type, restart_lsn::text, active "
                        "from pg_replication_slots")
    assert slots == [("strata_walproposer", "physical", str(x), False)]
    compute.stop()

    dump = compute.server.run_tool("pg_waldump", "-p", compute.datadir / "pg_wal",
                                   "-s", str(record_lsn), check=False)
    records = [(Lsn.parse(lsn), Lsn.parse(prev), desc)
               for lsn, prev, desc in WALDUMP_LINE.findall(dump.stdout.decode())]
    assert records[0][0] == record_lsn
    assert records[0][2] == "CHECKPOINT_SHUTDOWN", records[0]
    for (prev_lsn, _, _), (_, prev, _) in zip(records, records[1:], strict=False):
        assert prev == prev_lsn
    assert records[1][0] == end_lsn  # PostgreSQL continued right after our record
    assert len(records) > 10
    assert records[-1][2] == "CHECKPOINT_SHUTDOWN"  # the clean stop, at the end of WAL
    assert "wanted 24, got 0" in dump.stderr.decode()  # the normal end of WAL

    # The same data directory restarts after a crash (recovery from X).
    compute.start()
    compute.server.stop("immediate")
    compute.start()
    assert compute.sql("select count(*) from t") == [(1000,)]
    compute.stop()


def test_read_only_compute_is_a_hot_standby(test_dir: Path,
                                            pg_factory: Callable[..., PgServer]) -> None:
    """Read-only: standby.signal, no slot; queries work, writes are refused."""
    source = pg_factory("source")
    source.initdb()
    timeline = new_timeline(test_dir, source.datadir)
    _, tar = basebackup(timeline, timeline.last_record_lsn, read_only=True)
    compute = start_compute(test_dir, "standby", tar, ComputeConfig(read_only=True))
    try:
        assert compute.sql("select pg_is_in_recovery()") == [(True,)]
        assert compute.sql("select count(*) from pg_class where relname = 'pg_class'") == [(1,)]
        assert compute.sql("select count(*) from pg_replication_slots") == [(0,)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            compute.sql("create table nope (a int)")
    finally:
        compute.stop()


def pg_dump(server: PgServer | Compute, dbname: str = "postgres") -> str:
    srv = server.server if isinstance(server, Compute) else server
    out = srv.run_tool("pg_dump", "-h", srv.host, "-p", str(srv.port), "-U", "postgres",
                       "--no-unlogged-table-data", dbname)
    # \restrict lines carry a random key per run.
    return "".join(line for line in out.stdout.decode().splitlines(keepends=True)
                   if not line.startswith(("\\restrict", "\\unrestrict")))


def test_compute_after_ingest_matches_the_source(test_dir: Path,
                                                 pg_factory: Callable[..., PgServer]) -> None:
    """Import + workload + ingest; computes at the end LSN and at a mid LSN."""
    source = pg_factory("source")
    source.initdb()
    timeline = new_timeline(test_dir, source.datadir)
    x0 = timeline.last_record_lsn
    source.start({**STRATA_WAL_SETTINGS, "max_prepared_transactions": 5,
                  "wal_keep_size": "1GB", "autovacuum": False})
    # Phase 1.
    source.sql("create table phase1 (a int primary key, b text)")
    source.sql("insert into phase1 select g, md5(g::text) from generate_series(1, 5000) g")
    source.sql("create index phase1_b on phase1 (b)")
    mid = Lsn.parse(source.sql("select pg_current_wal_insert_lsn()::text")[0][0])
    # Phase 2.
    source.sql("create database other")
    source.sql("create table t2 as select g a, g * 2 b from generate_series(1, 3000) g",
               dbname="other")
    source.sql("update phase1 set b = 'changed' where a % 10 = 0")
    source.sql("delete from phase1 where a > 4500")
    source.sql("create unlogged table scratch (a int primary key)")
    source.sql("insert into scratch select generate_series(1, 100)")
    source.sql("create table prep (a int)")
    with source.connect(autocommit=False) as conn:
        conn.execute("insert into prep values (42)")
        prepared_xid = int(conn.execute("select txid_current()").fetchone()[0])  # type: ignore[index]
        conn.execute("prepare transaction 'gid1'")
    source.sql("vacuum phase1")
    source.sql("checkpoint")
    end = Lsn.parse(source.sql("select pg_current_wal_insert_lsn()::text")[0][0])
    want_dump = {db: pg_dump(source, db) for db in ("postgres", "other")}
    assert "COPY public.phase1" in want_dump["postgres"]
    assert "COPY public.t2" in want_dump["other"]
    source.stop()

    ingest = WalIngest(timeline)
    t0 = time.monotonic()
    for record in read_wal_files(source.datadir / "pg_wal", start=x0, end=end):
        ingest.ingest(record)
    print(f"ingested {ingest.stats.records} records in {time.monotonic() - t0:.2f}s")
    assert timeline.last_record_lsn == end

    t0 = time.monotonic()
    (record_lsn, _), tar = basebackup(timeline, end)
    elapsed = time.monotonic() - t0
    print(f"basebackup after workload: {len(tar) / 1e6:.1f} MB in {elapsed:.2f}s "
          f"({len(tar) / 1e6 / elapsed:.1f} MB/s)")
    assert record_lsn >= end
    compute = start_compute(test_dir, "compute", tar)
    try:
        assert "database system was shut down at" in (test_dir / "compute.log").read_text()
        for db, want in want_dump.items():
            assert pg_dump(compute, db) == want, db
        assert compute.sql("select gid from pg_prepared_xacts") == [("gid1",)]
        assert compute.sql("select count(*) from scratch") == [(0,)]
        compute.sql("insert into scratch values (1)")
        assert compute.sql("select count(*) from prep") == [(0,)]
        compute.sql("commit prepared 'gid1'")
        assert compute.sql("select a from prep") == [(42,)]
        assert compute.sql("select count(*), count(*) filter (where b = 'changed') "
                           "from phase1") == [(4500, 450)]
    finally:
        compute.stop()

    # A read-only endpoint at the same LSN: a hot standby with a prepared transaction.
    _, tar = basebackup(timeline, end, read_only=True)
    standby = start_compute(test_dir, "standby", tar, ComputeConfig(read_only=True))
    try:
        assert standby.sql("select count(*) from phase1") == [(4500,)]
        # A standby lists no prepared transactions (they are not valid until promotion),
        # but it holds the state file and treats the transaction as in progress.
        assert [p.name for p in (standby.datadir / "pg_twophase").iterdir()] == [
            f"{prepared_xid:08X}"]
        assert standby.sql("select count(*) from prep") == [(0,)]
        assert standby.sql("select count(*) from t2", dbname="other") == [(3000,)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            standby.sql("insert into phase1 values (9999, 'x')")
    finally:
        standby.stop()

    _, tar = basebackup(timeline, mid)
    early = start_compute(test_dir, "early", tar)
    try:
        assert early.sql("select count(*), count(*) filter (where b = 'changed') "
                         "from phase1") == [(5000, 0)]
        assert early.sql("select count(*) from pg_database where datname = 'other'") == [(0,)]
        assert early.sql("select to_regclass('prep') is null") == [(True,)]
        assert early.sql("select count(*) from pg_prepared_xacts") == [(0,)]
        early.sql("insert into phase1 values (5001, 'new')")  # takes writes at the old LSN
    finally:
        early.stop()


def test_page_checksum_matches_postgres(test_dir: Path,
                                        pg_factory: Callable[..., PgServer]) -> None:
    """Our pg_checksum_page gives the pd_checksum PostgreSQL wrote, on every page of global/
    and template1 after initdb --data-checksums. The basebackup sets it when pg_control
    has checksums on; import refuses such clusters today, so the files are checked here."""
    source = pg_factory("source")
    source.initdb("--data-checksums")
    checked = 0
    # global/ and template1 (base/1): about a thousand pages, at ~1 ms each.
    paths = [*(source.datadir / "global").iterdir(), *(source.datadir / "base" / "1").iterdir()]
    for path in sorted(paths):
        rel = parse_path(path.relative_to(source.datadir).as_posix())
        if rel is None or not path.is_file():
            continue
        data = path.read_bytes()
        for i in range(len(data) // 8192):
            page = data[i * 8192:(i + 1) * 8192]
            if is_new(page):
                continue
            blkno = rel.segno * 131072 + i
            assert with_checksum(page, blkno) == page, (path, blkno)
            checked += 1
    assert checked > 500, checked

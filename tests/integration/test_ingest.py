"""Import + WAL ingest against a real PostgreSQL 15 (architecture D2, D6; docs/storage.md).

A freshly initdb'ed data directory is copied (never started) and imported into a new
timeline; PostgreSQL then runs the shared workload plus extras (GiST page splits, VACUUM
truncation and regrowth, create+truncate in one transaction, both CREATE DATABASE
strategies, a transaction left prepared), CHECKPOINTs and goes quiet. Every WAL record
since initdb goes through `WalIngest`; then the timeline at the final LSN must reproduce
the data directory: every relation page (golden check with PostgreSQL's masks), the
relation sizes, pg_xact, the relation maps, the prepared transaction's state file and the
checkpoint counters. A second test turns wal_consistency_checking off in one session and
proves that ingest refuses the first record without an image, naming it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pgworkload import WORKLOAD_SETTINGS, run_workload
from strata.common.errors import UserError
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.compute import golden
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.datadir import list_databases
from strata.pageserver.import_datadir import import_new_timeline, read_initdb_point
from strata.pageserver.ingest import WalIngest
from strata.pg.checkpoint import CheckPoint
from strata.pg.constants import BLCKSZ, RELSEG_SIZE, ForkNumber
from strata.pg.controlfile import ControlFileData
from strata.pg.crc import crc32c
from strata.pg.relfile import RelTag, parse_path, relation_path
from strata.pg.slru import SlruKind, clog_get_status, clog_page, page_in_segment, segment_of_page
from strata.pg.walreader import read_wal_files
from strata.storage import timeline as timeline_module
from strata.storage.key import (
    checkpoint_key,
    relmap_key,
    slru_block_key,
    slru_segment_size_key,
    twophase_key,
)
from strata.storage.repository import Repository
from strata.storage.timeline import Timeline, TimelineBroken

SLRU_BOUND = 8  # timeline.SLRU_IMAGE_DELTAS in the reproduction test

EXTRAS = [
    # GiST built empty, then filled: PAGE_SPLIT and PAGE_UPDATE with a left child.
    "create table spans (id int, r int4range)",
    "create index spans_r_gist on spans using gist (r)",
    "insert into spans select g, int4range(g, g + g % 17) from generate_series(1, 8000) g",
    # VACUUM truncation of heap and VM, then regrowth past the old end.
    "create table tail (id int, pad text)",
    "insert into tail select g, repeat('t', 200) from generate_series(1, 3000) g",
    "vacuum tail",
    "delete from tail where id > 400",
    "vacuum tail",
    "insert into tail select g, repeat('u', 300) from generate_series(5000, 6000) g",
    "vacuum tail",
    "update tail set pad = 'changed' where id % 10 = 0",
    # Create, fill and truncate in one transaction, then sparse regrowth.
    "begin; create table bct (a int, b text); insert into bct select g, md5(g::text) "
    " from generate_series(1, 5000) g; truncate bct; commit",
    "insert into bct select g, 'again' from generate_series(1, 50) g",
    # Both CREATE DATABASE strategies, kept (the workload drops its file_copy one).
    "create database g_wal strategy wal_log",
    "create database g_copy strategy file_copy",
    # Subtransactions that commit and abort.
    "begin; create table subx (a int); savepoint a; insert into subx values (1);"
    " release a; savepoint b; insert into subx values (2); rollback to b; commit",
]


def _timeline(test_dir: Path, bootstrap: Path) -> Timeline:
    repo = Repository(test_dir / "pageserver")
    tenant = repo.create_tenant()
    return import_new_timeline(tenant, TimelineId(TimelineId.generate().raw), bootstrap)


def _copy_bootstrap(server: PgServer, test_dir: Path) -> Path:
    bootstrap = test_dir / "bootstrap"
    shutil.copytree(server.datadir, bootstrap)
    return bootstrap


def _ingest_all(timeline: Timeline, server: PgServer, start: Lsn,
                end: Lsn) -> tuple[WalIngest, str]:
    """Decode every record from `start` that begins before `end`, then ingest them; timed
    apart. The server may append records after `end` while this runs (the bgwriter's
    running-xacts snapshot every 15 s): those are not part of the state being checked."""
    t0 = time.monotonic()
    records = [r for r in read_wal_files(server.datadir / "pg_wal", start=start)
               if r.lsn < end.value]
    t1 = time.monotonic()
    ingest = WalIngest(timeline)
    for record in records:
        ingest.ingest(record)
    t2 = time.monotonic()
    wal_mb = sum(r.tot_len for r in records) / 1e6
    rate = (f"{len(records)} records, {wal_mb:.1f} MB of record bytes: decode "
            f"{t1 - t0:.2f}s, ingest {t2 - t1:.2f}s = {wal_mb / (t2 - t1):.1f} MB/s, "
            f"{len(records) / (t2 - t1):.0f} records/s (decode + ingest "
            f"{wal_mb / (t2 - t0):.1f} MB/s)")
    return ingest, rate


def _files(datadir: Path) -> dict[RelTag, int]:
    """Block counts of every relation fork in the data directory (all segments)."""
    sizes: dict[RelTag, int] = {}
    for sub in ["global", *(f"base/{d}" for d in os.listdir(datadir / "base"))]:
        for entry in os.listdir(datadir / sub):
            loc = parse_path(f"{sub}/{entry}")
            if loc is None:
                continue
            rel = RelTag(loc.spcnode, loc.dbnode, loc.relnode, int(loc.fork))
            blocks = (datadir / sub / entry).stat().st_size // BLCKSZ
            sizes[rel] = max(sizes.get(rel, 0), loc.segno * RELSEG_SIZE + blocks)
    return sizes


def _read_block(datadir: Path, rel: RelTag, blkno: int) -> bytes:
    segno, index = divmod(blkno, RELSEG_SIZE)
    path = datadir / relation_path(rel.spcnode, rel.dbnode, rel.relnode,
                                   ForkNumber(rel.forknum), segno)
    with open(path, "rb") as f:
        f.seek(index * BLCKSZ)
        return f.read(BLCKSZ)


def _unlogged_relnodes(server: PgServer) -> set[tuple[int, int]]:
    """(dbnode, relnode) of unlogged relations in every connectable database."""
    found: set[tuple[int, int]] = set()
    for (dbname, dboid) in server.sql("select datname, oid from pg_database "
                                      "where datallowconn"):
        for (relnode,) in server.sql("select pg_relation_filenode(oid) from pg_class "
                                     "where relpersistence = 'u'", dbname=dbname):
            if relnode is not None:
                found.add((int(dboid), int(relnode)))
    return found


def test_import_and_ingest_reproduce_the_data_directory(
        pg_factory: Callable[..., PgServer], test_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Import + ingest of every record since initdb gives exactly PostgreSQL's pages,
    sizes, pg_xact, relmaps, two-phase state and counters at the final LSN. SLRU delta
    chains are bounded at `SLRU_BOUND` deltas here, so the workload's few dozen commits
    also store pg_xact images ingest built from them."""
    monkeypatch.setattr(timeline_module, "SLRU_IMAGE_DELTAS", SLRU_BOUND)
    server = pg_factory("pg")
    server.initdb()
    bootstrap = _copy_bootstrap(server, test_dir)
    point = read_initdb_point(bootstrap)
    timeline = _timeline(test_dir, bootstrap)
    assert timeline.last_record_lsn == point.end_lsn
    assert timeline.prev_record_lsn == point.checkpoint_lsn

    server.start({**STRATA_WAL_SETTINGS, **WORKLOAD_SETTINGS, "autovacuum": False})
    run_workload(server)
    with server.connect() as conn:
        for statement in EXTRAS:
            conn.execute(statement)
    prepared_xid = _prepare(server)

    ingested: list[tuple[WalIngest, str, Lsn]] = []

    def page_source(spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        if not ingested:
            end = Lsn.parse(server.sql("select pg_current_wal_insert_lsn()::text")[0][0])
            ingest, rate = _ingest_all(timeline, server, point.end_lsn, end)
            assert timeline.last_record_lsn == end, (timeline.last_record_lsn, end)
            ingested.append((ingest, rate, end))
        return timeline.get_rel_page(RelTag(spc, db, rel, fork), blkno, ingested[0][2])

    report = golden.golden_check(server.datadir, server.connect, page_source)
    ingest, rate, end = ingested[0]
    stats = ingest.stats
    print(f"\ningest: {rate}; {stats}; {report.summary()}")
    # Every kind of change the workload makes was seen (the test covers what it claims).
    assert stats.vm_clears > 0 and stats.clog_patches > 0 and stats.gist_fixups > 0, stats
    assert stats.truncates > 0 and stats.vm_tail_clears > 0 and stats.dropped_forks > 0, stats
    assert stats.databases_copied == 2 and stats.multixacts > 0 and stats.prepares == 3, stats
    assert report.pages_checked > 1000, report.pages_checked
    assert report.ok, report.summary(40)
    kinds = {rel.kind for rel in report.relations}
    assert {"heap", "toast", "btree", "hash", "gin", "gist", "spgist", "brin"} <= kinds, kinds
    assert {rel.database for rel in report.relations} >= {"postgres", "g_wal", "g_copy"}

    _check_checkpoint(timeline, server, end)  # before anything below writes WAL
    _check_sizes(timeline, server.datadir, end, _unlogged_relnodes(server))
    _check_relmaps(timeline, server.datadir, end)
    _check_twophase(timeline, server, prepared_xid, end)
    _check_pg_xact(timeline, server, end)
    _check_multixact(timeline, server.datadir, end)

    # Written to layer files and loaded again by a new Repository: the same pages.
    timeline.flush()
    reopened = Repository(test_dir / "pageserver")
    tenant = reopened.get_tenant(timeline.tenant_id)
    again = tenant.get_timeline(timeline.timeline_id)
    assert again.last_record_lsn == end and again.disk_consistent_lsn == end
    assert WalIngest(again).checkpoint == ingest.checkpoint

    def reloaded(spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        return again.get_rel_page(RelTag(spc, db, rel, fork), blkno, end)

    after = golden.check_pages(server.datadir, report.relations, reloaded)
    assert after.ok and after.pages_checked == report.pages_checked, after.summary()


def _prepare(server: PgServer) -> int:
    with server.connect(autocommit=False) as conn:
        conn.execute("insert into bct values (-1, 'prepared')")
        row = conn.execute("select txid_current()").fetchone()
        assert row is not None
        conn.execute("prepare transaction 'g_left_prepared'")
        conn.commit()
    return int(row[0]) & 0xFFFFFFFF


def _check_sizes(timeline: Timeline, datadir: Path, lsn: Lsn,
                 unlogged: set[tuple[int, int]]) -> None:
    """Every main/VM/init fork's size equals its file's, except for trailing zero blocks
    PostgreSQL extended without WAL; FSM forks and unlogged main forks are not WAL-logged."""
    checked = 0
    for rel, file_blocks in sorted(_files(datadir).items()):
        if rel.forknum == ForkNumber.FSM:
            continue
        if (rel.dbnode, rel.relnode) in unlogged and rel.forknum != ForkNumber.INIT:
            continue
        if not timeline.rel_exists(rel, lsn):
            # Dropped: md.c truncates the main fork and unlinks it after a checkpoint.
            assert file_blocks == 0, f"{rel} has a {file_blocks}-block file but no fork"
            continue
        size = timeline.rel_size(rel, lsn)
        assert size <= file_blocks, (rel, size, file_blocks)
        for blkno in range(size, file_blocks):
            assert _read_block(datadir, rel, blkno) == bytes(BLCKSZ), \
                f"{rel}: block {blkno} past the timeline's size {size} is not all zeros"
        checked += 1
    assert checked > 500, checked
    stored = {rel for db in list_databases(timeline, lsn)
              for rel in timeline.list_rels(*db, lsn)} | timeline.list_rels(1664, 0, lsn)
    files = set(_files(datadir))
    extra = {rel for rel in stored - files if rel.forknum != ForkNumber.FSM}
    assert not extra, f"forks in the timeline with no file: {sorted(extra)[:10]}"


def _check_pg_xact(timeline: Timeline, server: PgServer, lsn: Lsn) -> None:
    """The status of every xid PostgreSQL has assigned equals the data directory's, with
    the pages' delta chains bounded (ingest turned some commits' deltas into images)."""
    assert timeline.slru_images_written > 0
    next_xid = int(server.sql("select txid_current()")[0][0]) & 0xFFFFFFFF
    server.sql("checkpoint")  # flush the pg_xact buffers (touches no relation page)
    pages = {clog_page(xid) for xid in range(3, next_xid)}
    for page in sorted(pages):
        segno, blkno = segment_of_page(page), page_in_segment(page)
        key = slru_block_key(SlruKind.CLOG, segno, blkno)
        ours = timeline.get(key, lsn)
        assert timeline.delta_chain(key, lsn) <= SLRU_BOUND, page
        path = server.datadir / "pg_xact" / f"{segno:04X}"
        theirs = path.read_bytes()[blkno * BLCKSZ:(blkno + 1) * BLCKSZ]
        first, last = page * 32768, min((page + 1) * 32768, next_xid)
        for xid in range(max(first, 3), last):  # txid_current's own xid is after `lsn`
            assert clog_get_status(ours, xid) == clog_get_status(theirs, xid), xid
        size = timeline.get(slru_segment_size_key(SlruKind.CLOG, segno), lsn)
        assert int.from_bytes(size, "little") * BLCKSZ >= (blkno + 1) * BLCKSZ


def _check_multixact(timeline: Timeline, datadir: Path, lsn: Lsn) -> None:
    """pg_multixact offsets and members pages equal the data directory's (after the
    CHECKPOINT in _check_pg_xact flushed them)."""
    for kind, sub in ((SlruKind.MULTIXACT_OFFSETS, "offsets"),
                      (SlruKind.MULTIXACT_MEMBERS, "members")):
        data = (datadir / "pg_multixact" / sub / "0000").read_bytes()
        size = timeline.get(slru_segment_size_key(kind, 0), lsn)
        assert int.from_bytes(size, "little") == len(data) // BLCKSZ, (kind, len(data))
        for blkno in range(len(data) // BLCKSZ):
            ours = timeline.get(slru_block_key(kind, 0, blkno), lsn)
            assert ours == data[blkno * BLCKSZ:(blkno + 1) * BLCKSZ], (kind, blkno)


def _check_relmaps(timeline: Timeline, datadir: Path, lsn: Lsn) -> None:
    assert timeline.get(relmap_key(1664, 0), lsn) == \
        (datadir / "global" / "pg_filenode.map").read_bytes()
    dbs = list_databases(timeline, lsn)
    on_disk = {(1663, int(d)) for d in os.listdir(datadir / "base") if d.isdigit()}
    assert dbs == on_disk, (dbs, on_disk)
    for spc, db in dbs:
        assert timeline.get(relmap_key(spc, db), lsn) == \
            (datadir / "base" / str(db) / "pg_filenode.map").read_bytes(), db


def _check_twophase(timeline: Timeline, server: PgServer, xid: int, lsn: Lsn) -> None:
    """After a CHECKPOINT PostgreSQL writes pg_twophase/<xid>: ours is it minus the CRC."""
    state = (server.datadir / "pg_twophase" / f"{xid:08X}").read_bytes()
    ours = timeline.get(twophase_key(xid), lsn)
    assert ours == state[:-4]
    assert crc32c(ours).to_bytes(4, "little") == state[-4:]
    # The workload's committed and rolled-back prepared transactions are gone.
    from strata.storage.key import twophase_range

    assert [k.xid() for k, _ in timeline.scan(twophase_range(), lsn)] == [xid]


def _check_checkpoint(timeline: Timeline, server: PgServer, lsn: Lsn) -> None:
    """The stored counters are at least pg_control's (the last checkpoint's) values."""
    control = ControlFileData.from_bytes((server.datadir / "global" / "pg_control")
                                         .read_bytes())
    theirs = control.checkpoint_copy
    ours = CheckPoint.from_bytes(timeline.get(checkpoint_key(), lsn))
    assert ours.next_xid >= theirs.next_xid, (ours, theirs)
    assert ours.next_oid >= theirs.next_oid, (ours, theirs)
    assert ours.next_multi >= theirs.next_multi >= 2, (ours, theirs)
    assert ours.next_multi_offset >= theirs.next_multi_offset, (ours, theirs)
    assert ours.oldest_xid == theirs.oldest_xid, (ours, theirs)


def test_block_without_image_breaks_the_timeline(
        pg_factory: Callable[..., PgServer], test_dir: Path) -> None:
    """A session with wal_consistency_checking off writes records without images: ingest
    marks the timeline broken naming the LSN and resource manager; reads then fail."""
    server = pg_factory("pg")
    server.initdb()
    bootstrap = _copy_bootstrap(server, test_dir)
    point = read_initdb_point(bootstrap)
    timeline = _timeline(test_dir, bootstrap)
    server.start(STRATA_WAL_SETTINGS)
    server.sql("create table t (a int)")
    server.sql("insert into t values (1)")
    # A checkpoint first, so that the next change is not a full-page write anyway.
    server.sql("checkpoint")
    server.sql("insert into t values (2)")
    good_end = Lsn.parse(server.sql("select pg_current_wal_insert_lsn()::text")[0][0])
    with server.connect() as conn:
        conn.execute("set wal_consistency_checking = ''")
        conn.execute("insert into t values (3)")
    ingest = WalIngest(timeline)
    records = read_wal_files(server.datadir / "pg_wal", start=point.end_lsn)
    bad = None
    with pytest.raises(TimelineBroken) as excinfo:
        for record in records:
            bad = record
            ingest.ingest(record)
    assert bad is not None and bad.lsn >= good_end.value, (bad, good_end)
    assert bad.rmgr_name == "Heap", bad
    message = str(excinfo.value)
    assert str(Lsn(bad.lsn)) in message and "Heap" in message, message
    assert timeline.last_record_lsn.value == bad.lsn, (timeline.last_record_lsn, bad)
    with pytest.raises(TimelineBroken) as read_err:
        timeline.get_rel_page(RelTag(1664, 0, 1262, 0), 0, timeline.last_record_lsn)
    assert str(Lsn(bad.lsn)) in str(read_err.value) and "Heap" in str(read_err.value)
    with pytest.raises(TimelineBroken):
        ingest.ingest(bad)


def test_import_refuses_a_crashed_data_directory(
        pg_factory: Callable[..., PgServer]) -> None:
    """A data directory that was not shut down cleanly has pages older than its WAL."""
    server = pg_factory("pg")
    server.initdb()
    server.start(STRATA_WAL_SETTINGS)
    server.sql("create table t (a int)")
    server.stop("immediate")
    with pytest.raises(UserError, match="not shut down cleanly"):
        read_initdb_point(server.datadir)

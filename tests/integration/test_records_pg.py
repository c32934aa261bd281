"""Record decoders against real PostgreSQL 15 WAL, checked against pg_waldump and pg_controldata.

One server runs the shared workload plus extras it lacks (a transaction left prepared, commits
and aborts with subtransactions and dropped relations, logical messages, a restore point, vacuum
truncation, locks and updates on frozen pages, COPY, a parameter change). Every record of a
decoded resource manager must decode, and the decoded fields must match pg_waldump's description
of the record at the same LSN.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pgworkload import WORKLOAD_SETTINGS, run_workload
from strata.common.lsn import Lsn
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pg.constants import FORK_SUFFIX, ForkNumber, RmgrId
from strata.pg.records import (
    ClogZeroPage,
    DbaseCreateFileCopy,
    DbaseCreateWalLog,
    DbaseDrop,
    HeapDelete,
    HeapInsert,
    HeapLock,
    HeapMultiInsert,
    HeapUpdate,
    HeapVisible,
    LogicalMessage,
    MultiXactCreate,
    MultiXactZeroMemPage,
    MultiXactZeroOffPage,
    RelFileNode,
    RelmapUpdate,
    RunningXacts,
    SmgrCreate,
    SmgrTruncate,
    XactAbort,
    XactAssignment,
    XactCommit,
    XactPrepare,
    XlogCheckpoint,
    XlogNextOid,
    XlogParameterChange,
    XlogRestorePoint,
    decode,
    record_type_name,
)
from strata.pg.records.multixact import MULTIXACT_STATUS_NAMES
from strata.pg.visibilitymap import VISIBILITYMAP_ALL_FROZEN, VISIBILITYMAP_VALID_BITS
from strata.pg.walreader import DecodedRecord, read_wal_files

DECODED_RMGRS = {RmgrId.XLOG, RmgrId.TRANSACTION, RmgrId.STORAGE, RmgrId.CLOG,
                 RmgrId.DATABASE, RmgrId.MULTIXACT, RmgrId.RELMAP, RmgrId.STANDBY,
                 RmgrId.HEAP2, RmgrId.HEAP, RmgrId.LOGICALMSG}

_LINE = re.compile(r"^rmgr: (\S+)\s+len \(rec/tot\):\s*\d+/\s*\d+, tx:\s*(\d+), "
                   r"lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F]+/[0-9A-F]+, desc: (.*)$")
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def _extras(pg: PgServer) -> None:
    """Records the shared workload does not write (or not with the interesting flags)."""
    statements = [
        # A commit with subtransactions and dropped relations.
        "create table dropped_in_sub (a int)",
        "create table target (a int)",
        "begin; drop table dropped_in_sub; savepoint s1; insert into target values (1);"
        " release s1; savepoint s2; insert into target values (2); rollback to s2;"
        " savepoint s3; insert into target values (3); commit",
        # An abort that drops the relation it created.
        "begin; create table aborted_rel (a int primary key); rollback",
        # Two-phase: one rolled back with a new relation, one left prepared with subxacts.
        "begin; create table prep_rel (a int); prepare transaction 'p_abort'",
        "rollback prepared 'p_abort'",
        # Frozen pages: lock (clears ALL_FROZEN only), update and delete (clear both bits).
        # Three pages, the first two full; a wider row version of id 2 does not fit on
        # page 0 and goes to the (all-visible) last page: both pages' bits are cleared.
        "create table frozen (id int, v text)",
        "insert into frozen select g, 'v' from generate_series(1, 600) g",
        "vacuum freeze frozen",
        "begin; select * from frozen where id = 1 for update; commit",
        "begin; select * from frozen where id = 300 for no key update; commit",
        "update frozen set v = repeat('w', 200) where id = 2",
        "delete from frozen where id = 299",
        # Vacuum truncation (SMGR TRUNCATE) and VISIBLE records.
        "create table shrink (a int)",
        "insert into shrink select generate_series(1, 20000)",
        "delete from shrink where a > 100",
        "vacuum shrink",
        # Logical messages and a restore point.
        "select pg_logical_emit_message(true, 'strata-tx', 'hello')",
        "select pg_logical_emit_message(false, 'strata-nontx', '\\x00ff10'::bytea)",
        "select pg_create_restore_point('strata_rp')",
    ]
    with pg.connect() as conn:
        for statement in statements:
            conn.execute(statement)
        # COPY writes MULTI_INSERT; the first page is all-visible after the freeze.
        conn.execute("create table copied (a int, b text)")
        conn.execute("insert into copied values (0, 'x')")
        conn.execute("vacuum freeze copied")
        with conn.cursor().copy("copy copied from stdin") as copy:
            for i in range(1, 2000):
                copy.write_row((i, "row"))
        # Last, because while it is prepared VACUUM cannot mark pages all-visible.
        conn.execute("begin; insert into target values (10); savepoint a;"
                     " insert into target values (11); release a; savepoint b;"
                     " insert into target values (12); release b; prepare transaction 'p_keep'")


def _relpath(rel: RelFileNode, forknum: int = 0) -> str:
    """relpathperm as pg_waldump prints it (relpath.c)."""
    spc, db, relnode = rel
    suffix = FORK_SUFFIX[ForkNumber(forknum)]
    if spc == 1664:
        return f"global/{relnode}{suffix}"
    if spc == 1663:
        return f"base/{db}/{relnode}{suffix}"
    return f"pg_tblspc/{spc}/PG_15_202209061/{db}/{relnode}{suffix}"


def _numbers_after(desc: str, label: str) -> list[int]:
    """The integers after `label` up to the next ';' (pg_waldump lists xids that way)."""
    m = re.search(re.escape(label) + r"([^;]*)", desc)
    return [int(x) for x in m.group(1).split()] if m else []


def _words_after(desc: str, label: str) -> list[str]:
    m = re.search(re.escape(label) + r"([^;]*)", desc)
    return m.group(1).split() if m else []


def _flags(desc: str) -> int:
    m = re.search(r"flags:? 0x([0-9A-Fa-f]+)", desc)
    assert m, desc
    return int(m.group(1), 16)


def _timestamp_ok(ts: int, desc: str) -> bool:
    """Compare a TimestampTz with pg_waldump's text when pg_waldump printed UTC."""
    m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (UTC|GMT)", desc)
    if m is None:
        return True  # another zone: the text cannot be compared without tz data
    ours = _PG_EPOCH + dt.timedelta(microseconds=ts)
    theirs = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
    return ours == theirs


def _waldump(pg: PgServer, start: Lsn) -> dict[int, tuple[str, int, str]]:
    """LSN -> (rmgr, xid, desc) for every record from `start` to the end of the WAL."""
    out = pg.run_tool("pg_waldump", "-p", pg.datadir / "pg_wal", "-s", str(start),
                      check=False)
    records: dict[int, tuple[str, int, str]] = {}
    for line in out.stdout.decode().splitlines():
        m = _LINE.match(line)
        assert m, line
        desc = m.group(4).split(", blkref #")[0]
        records[Lsn.parse(m.group(3)).value] = (m.group(1), int(m.group(2)), desc)
    # pg_waldump stops at the end of the WAL with an error; anything else is a failure.
    assert b"invalid record length" in out.stderr or b"end of WAL" in out.stderr, out.stderr
    return records


Check = Callable[[DecodedRecord, object, str], str | None]


def _check_commit(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, XactCommit | XactAbort)
    if d.is_prepared:
        head = desc.split(None, 2)
        if int(head[1].rstrip(":")) != d.xid:
            return f"prepared xid {d.xid}"
    elif d.xid != rec.xid:
        return f"xid {d.xid} != xl_xid {rec.xid}"
    if list(d.subxacts) != _numbers_after(desc, "; subxacts:"):
        return f"subxacts {d.subxacts}"
    if [_relpath(r) for r in d.dropped_rels] != _words_after(desc, "; rels:"):
        return f"rels {d.dropped_rels}"
    stats = [f"{kind}/{db}/{obj}" for kind, db, obj in d.dropped_stats]
    if stats != _words_after(desc, "; dropped stats:"):
        return f"dropped stats {d.dropped_stats}"
    when = d.commit_time if isinstance(d, XactCommit) else d.abort_time
    if not _timestamp_ok(when, desc):
        return f"time {when}"
    return None


def _check_prepare(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, XactPrepare)
    if d.xid != rec.xid:
        return f"xid {d.xid} != xl_xid {rec.xid}"
    if f"gid {d.gid}:" not in desc:
        return f"gid {d.gid}"
    if list(d.subxacts) != _numbers_after(desc, "; subxacts:"):
        return f"subxacts {d.subxacts}"
    if [_relpath(r) for r in d.commit_rels] != _words_after(desc, "; rels(commit):"):
        return f"commit rels {d.commit_rels}"
    if [_relpath(r) for r in d.abort_rels] != _words_after(desc, "; rels(abort):"):
        return f"abort rels {d.abort_rels}"
    return None if _timestamp_ok(d.prepared_at, desc) else f"prepared_at {d.prepared_at}"


def _check_assignment(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, XactAssignment)
    return None if list(d.subxacts) == _numbers_after(desc, "subxacts:") else str(d)


def _check_smgr(rec: DecodedRecord, d: object, desc: str) -> str | None:
    if isinstance(d, SmgrCreate):
        return None if desc == f"CREATE {_relpath(d.rel, d.forknum)}" else str(d)
    assert isinstance(d, SmgrTruncate)
    want = f"TRUNCATE {_relpath(d.rel)} to {d.blkno} blocks flags {d.flags}"
    return None if desc == want else str(d)


def _check_dbase(rec: DecodedRecord, d: object, desc: str) -> str | None:
    if isinstance(d, DbaseCreateFileCopy):
        want = (f"CREATE_FILE_COPY copy dir {d.src_tablespace_id}/{d.src_db_id} to "
                f"{d.tablespace_id}/{d.db_id}")
    elif isinstance(d, DbaseCreateWalLog):
        want = f"CREATE_WAL_LOG create dir {d.tablespace_id}/{d.db_id}"
    else:
        assert isinstance(d, DbaseDrop)
        want = "DROP dir" + "".join(f" {ts}/{d.db_id}" for ts in d.tablespace_ids)
    return None if desc == want else f"{d} (want {want!r})"


def _check_relmap(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, RelmapUpdate)
    want = f"UPDATE database {d.dbid} tablespace {d.tsid} size {d.nbytes}"
    return None if desc == want else str(d)


def _check_clog(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, ClogZeroPage)
    return None if desc == f"ZEROPAGE page {d.pageno}" else str(d)


def _check_multixact(rec: DecodedRecord, d: object, desc: str) -> str | None:
    if isinstance(d, MultiXactZeroOffPage | MultiXactZeroMemPage):
        return None if desc.split()[1] == str(d.pageno) else str(d)
    assert isinstance(d, MultiXactCreate)
    members = " ".join(f"{xid} ({MULTIXACT_STATUS_NAMES[s]})" for xid, s in d.members)
    want = f"CREATE_ID {d.mid} offset {d.moff} nmembers {d.nmembers}: {members}"
    return None if desc.rstrip() == want else f"{d} (want {want!r})"


def _check_running(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, RunningXacts)
    want = (f"RUNNING_XACTS nextXid {d.next_xid} latestCompletedXid {d.latest_completed_xid} "
            f"oldestRunningXid {d.oldest_running_xid}")
    if d.xcnt:
        want += f"; {d.xcnt} xacts:" + "".join(f" {x}" for x in d.xids)
    # PostgreSQL 15's pg_waldump does not print the subxids (checked in the test instead).
    if d.subxid_overflow:
        want += "; subxid overflowed"
    return None if desc == want else f"{d} (want {want!r})"


def _check_xlog(rec: DecodedRecord, d: object, desc: str) -> str | None:
    if isinstance(d, XlogCheckpoint):
        c = d.checkpoint
        want = (f"redo {c.redo}; tli {c.this_timeline_id}; prev tli {c.prev_timeline_id}; "
                f"fpw {'true' if c.full_page_writes else 'false'}; "
                f"xid {c.next_xid_epoch}:{c.next_xid_32}; oid {c.next_oid}; "
                f"multi {c.next_multi}; offset {c.next_multi_offset}; "
                f"oldest xid {c.oldest_xid} in DB {c.oldest_xid_db}; "
                f"oldest multi {c.oldest_multi} in DB {c.oldest_multi_db}; "
                f"oldest/newest commit timestamp xid: {c.oldest_commit_ts_xid}/"
                f"{c.newest_commit_ts_xid}; oldest running xid {c.oldest_active_xid}; "
                f"{'shutdown' if d.shutdown else 'online'}")
        return None if desc.split(" ", 1)[1] == want else f"{d} (want {want!r})"
    if isinstance(d, XlogNextOid):
        return None if desc == f"NEXTOID {d.next_oid}" else str(d)
    if isinstance(d, XlogRestorePoint):
        return None if desc == f"RESTORE_POINT {d.name}" else str(d)
    if isinstance(d, XlogParameterChange):
        want = (f"PARAMETER_CHANGE max_connections={d.max_connections} "
                f"max_worker_processes={d.max_worker_processes} "
                f"max_wal_senders={d.max_wal_senders} "
                f"max_prepared_xacts={d.max_prepared_xacts} "
                f"max_locks_per_xact={d.max_locks_per_xact}")
        return None if desc.startswith(want) else f"{d} (want {want!r})"
    return None


def _block_ids(rec: DecodedRecord) -> dict[int, tuple[RelFileNode, int]]:
    return {b.block_id: ((b.spcnode, b.dbnode, b.relnode), b.blkno) for b in rec.blocks}


def _check_heap(rec: DecodedRecord, d: object, desc: str) -> str | None:
    """Flags as pg_waldump prints them, and the VM bits cleared on the right heap block."""
    assert isinstance(d, HeapInsert | HeapMultiInsert | HeapDelete | HeapUpdate | HeapLock
                      | HeapVisible)
    if d.flags != _flags(desc):
        return f"flags {d.flags:#x}"
    if isinstance(d, HeapVisible):
        blocks = _block_ids(rec)
        return None if (d.vm_block, d.heap_block) == (blocks[0], blocks[1]) else str(d)
    blocks = _block_ids(rec)
    want: list[tuple[RelFileNode, int]] = []
    bits = VISIBILITYMAP_VALID_BITS
    if isinstance(d, HeapUpdate):
        if d.flags & 2:
            want.append(blocks[0])
        if d.flags & 1 and blocks.get(1, blocks[0]) not in want:
            want.append(blocks.get(1, blocks[0]))
    elif isinstance(d, HeapLock):
        bits = VISIBILITYMAP_ALL_FROZEN
        if d.flags & 1:
            want.append(blocks[0])
    elif d.flags & 1:
        want.append(blocks[0])
    got = [] if d.vm_clear is None else list(d.vm_clear.heap_blocks)
    if got != want or (d.vm_clear is not None and d.vm_clear.flags != bits):
        return f"vm_clear {d.vm_clear} != {want} bits {bits}"
    return None


def _check_logicalmsg(rec: DecodedRecord, d: object, desc: str) -> str | None:
    assert isinstance(d, LogicalMessage)
    kind = "transactional" if d.transactional else "non-transactional"
    want = (f"MESSAGE {kind}, prefix \"{d.prefix}\"; payload ({len(d.message)} bytes): "
            + " ".join(f"{b:02X}" for b in d.message))
    return None if desc.rstrip() == want else f"{d} (want {want!r})"


CHECKS: dict[type, Check] = {
    XactCommit: _check_commit, XactAbort: _check_commit, XactPrepare: _check_prepare,
    XactAssignment: _check_assignment, SmgrCreate: _check_smgr, SmgrTruncate: _check_smgr,
    DbaseCreateFileCopy: _check_dbase, DbaseCreateWalLog: _check_dbase, DbaseDrop: _check_dbase,
    RelmapUpdate: _check_relmap, ClogZeroPage: _check_clog,
    MultiXactZeroOffPage: _check_multixact, MultiXactZeroMemPage: _check_multixact,
    MultiXactCreate: _check_multixact, RunningXacts: _check_running,
    XlogCheckpoint: _check_xlog, XlogNextOid: _check_xlog, XlogRestorePoint: _check_xlog,
    XlogParameterChange: _check_xlog, HeapInsert: _check_heap, HeapMultiInsert: _check_heap,
    HeapDelete: _check_heap, HeapUpdate: _check_heap, HeapLock: _check_heap,
    HeapVisible: _check_heap, LogicalMessage: _check_logicalmsg,
}


def _controldata(pg: PgServer) -> dict[str, str]:
    out = pg.run_tool("pg_controldata", "-D", pg.datadir).stdout.decode()
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in out.splitlines())}


def test_records_match_pg_waldump(pg_factory: Callable[..., PgServer]) -> None:
    """Every record of the decoded resource managers in a varied WAL decodes, and the decoded
    xids, subxacts, relations, block numbers, members, flags and checkpoint fields equal
    pg_waldump's and pg_controldata's; a prepared transaction's state data plus its CRC is the
    pg_twophase file PostgreSQL writes."""
    pg = pg_factory("pg")
    pg.initdb()
    # No autovacuum: it would change which pages are all-visible behind the test's back.
    settings = {**STRATA_WAL_SETTINGS, **WORKLOAD_SETTINGS, "autovacuum": "off"}
    pg.start(settings)
    start = Lsn.parse(pg.sql("select pg_current_wal_insert_lsn()::text")[0][0])
    run_workload(pg)
    _extras(pg)
    pg.sql("checkpoint")  # writes pg_twophase/<xid> for the transaction left prepared
    [(keep_xid,)] = pg.sql("select transaction::text::bigint from pg_prepared_xacts "
                           "where gid = 'p_keep'")
    twophase_file = (pg.datadir / "pg_twophase" / f"{keep_xid:08X}").read_bytes()
    control = _controldata(pg)
    pg.sql("commit prepared 'p_keep'")
    # A restart with other limits writes PARAMETER_CHANGE (and a shutdown checkpoint).
    pg.stop("fast")
    pg.start({**settings, "max_connections": 57, "max_prepared_transactions": 7})
    pg.stop("fast")

    dump = _waldump(pg, start)
    records = list(read_wal_files(Path(pg.datadir / "pg_wal"), start=start))
    assert [r.lsn for r in records] == sorted(dump), "reader and pg_waldump disagree on records"

    seen: Counter[str] = Counter()
    problems: list[str] = []
    prepared: dict[int, XactPrepare] = {}
    for rec in records:
        if rec.rmid not in DECODED_RMGRS:
            continue
        name = record_type_name(rec.rmid, rec.info)
        decoded = decode(rec)  # raises on any record that does not decode
        seen[name] += 1
        if decoded is None:
            continue
        if isinstance(decoded, XactPrepare):
            prepared[decoded.xid] = decoded
        check = CHECKS.get(type(decoded))
        if check is None:
            continue
        rmgr, _xid, desc = dump[rec.lsn]
        problem = check(rec, decoded, desc)
        if problem is not None:
            problems.append(f"{Lsn(rec.lsn)} {name}: {problem}\n    pg_waldump: {desc}")
    assert not problems, "\n".join(problems[:20])

    # The record types this WAL must contain, so that the checks above were not vacuous.
    for name in ["Transaction COMMIT", "Transaction ABORT", "Transaction PREPARE",
                 "Transaction COMMIT_PREPARED", "Transaction ABORT_PREPARED",
                 "Storage CREATE", "Storage TRUNCATE", "Database CREATE_FILE_COPY",
                 "Database CREATE_WAL_LOG", "Database DROP", "RelMap UPDATE",
                 "MultiXact CREATE_ID", "Standby RUNNING_XACTS", "XLOG CHECKPOINT_ONLINE",
                 "XLOG CHECKPOINT_SHUTDOWN", "XLOG NEXTOID", "XLOG SWITCH",
                 "XLOG PARAMETER_CHANGE", "XLOG RESTORE_POINT", "LogicalMessage MESSAGE",
                 "Heap INSERT", "Heap UPDATE", "Heap HOT_UPDATE", "Heap DELETE", "Heap LOCK",
                 "Heap2 VISIBLE", "Heap2 MULTI_INSERT"]:
        assert seen[name] > 0, (name, sorted(seen))

    # The state data of the transaction left prepared is the file PostgreSQL wrote.
    assert prepared[keep_xid].state_file() == twophase_file
    assert prepared[keep_xid].gid == "p_keep"
    assert len(prepared[keep_xid].subxacts) == 2, prepared[keep_xid]
    # Running-xacts snapshots list its subxacts (all of them once it is prepared: the
    # CHECKPOINT above logs one; one logged earlier may see only the first).
    snapshots = [d for d in map(decode, records)
                 if isinstance(d, RunningXacts) and keep_xid in d.xids]
    assert any(snap.subxids == prepared[keep_xid].subxacts for snap in snapshots), snapshots
    for snap in snapshots:
        assert set(snap.subxids) <= set(prepared[keep_xid].subxacts), snap

    # The latest checkpoint before COMMIT PREPARED, as pg_controldata printed it.
    at = Lsn.parse(control["Latest checkpoint location"]).value
    ckpt = decode(next(r for r in records if r.lsn == at))
    assert isinstance(ckpt, XlogCheckpoint), ckpt
    c = ckpt.checkpoint
    assert str(c.redo) == control["Latest checkpoint's REDO location"]
    assert f"{c.next_xid_epoch}:{c.next_xid_32}" == control["Latest checkpoint's NextXID"]
    assert str(c.next_oid) == control["Latest checkpoint's NextOID"]
    assert str(c.next_multi) == control["Latest checkpoint's NextMultiXactId"]
    assert str(c.next_multi_offset) == control["Latest checkpoint's NextMultiOffset"]
    assert str(c.oldest_xid) == control["Latest checkpoint's oldestXID"]
    assert str(c.oldest_active_xid) == control["Latest checkpoint's oldestActiveXID"]
    assert str(c.this_timeline_id) == control["Latest checkpoint's TimeLineID"]

    # The heap records on frozen pages cleared what PostgreSQL's redo clears.
    locks = [decode(r) for r in records if record_type_name(r.rmid, r.info) == "Heap LOCK"]
    assert any(isinstance(d, HeapLock) and d.vm_clear is not None
               and d.vm_clear.flags == VISIBILITYMAP_ALL_FROZEN for d in locks)
    updates = [decode(r) for r in records if record_type_name(r.rmid, r.info) == "Heap UPDATE"]
    assert any(isinstance(d, HeapUpdate) and d.vm_clear is not None
               and len(d.vm_clear.heap_blocks) == 2 for d in updates)
    deletes = [decode(r) for r in records if record_type_name(r.rmid, r.info) == "Heap DELETE"]
    assert any(isinstance(d, HeapDelete) and d.vm_clear is not None
               and d.vm_clear.flags == VISIBILITYMAP_VALID_BITS for d in deletes)
    inserts = [decode(r) for r in records
               if record_type_name(r.rmid, r.info).startswith("Heap2 MULTI_INSERT")]
    assert any(isinstance(d, HeapMultiInsert) and d.vm_clear is not None for d in inserts)

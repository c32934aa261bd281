"""Record decoders on main data captured from a real PostgreSQL 15.18 (wal_consistency_checking
=all, zstd), each checked against what pg_waldump printed for the same record (in comments)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from strata.common.lsn import Lsn
from strata.pg.constants import RmgrId
from strata.pg.records import (
    DbaseCreateFileCopy,
    DbaseDrop,
    HeapLock,
    HeapUpdate,
    HeapVisible,
    LogicalMessage,
    MultiXactCreate,
    RunningXacts,
    SmgrCreate,
    SmgrTruncate,
    VmClear,
    XactAbort,
    XactCommit,
    XactPrepare,
    XlogCheckpoint,
    XlogParameterChange,
    XlogRestorePoint,
    decode_record,
)
from strata.pg.visibilitymap import VISIBILITYMAP_ALL_FROZEN, VISIBILITYMAP_VALID_BITS


def pg_time(text: str) -> int:
    """A TimestampTz (µs since 2000-01-01 UTC) from pg_waldump's UTC text."""
    when = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    return (when - dt.datetime(2000, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Block:
    block_id: int
    spcnode: int
    dbnode: int
    relnode: int
    forknum: int
    blkno: int


SMGR_CREATE = bytes.fromhex(  # 0/13B21D0, rmid 2, xl_info 0x11, xl_xid 606
    "7f060000010000004f34000000000000")
HEAP2_VISIBLE = bytes.fromhex(  # 0/1474710, rmid 9, xl_info 0x40, xl_xid 0
    "aa02000003")
RUNNING_XACTS = bytes.fromhex(  # 0/14F98C8, rmid 8, xl_info 0x10, xl_xid 716
    "0100000000000000001ce83acd020000cc020000cb020000cc020000")
CHECKPOINT_ONLINE = bytes.fromhex(  # 0/14F9900, rmid 0, xl_info 0x10, xl_xid 716
    "c8984f010000000001000000010000000100000000000000cd02000000000000e04e000001000000"
    "00000000cc0200000100000001000000010000000000000074ad066b000000000000000000000000"
    "cc02000000000000")
CREATE_FILE_COPY = bytes.fromhex(  # 0/14F9978, rmid 4, xl_info 0x1, xl_xid 716
    "040000007f060000010000007f060000")
PARAMETER_CHANGE = bytes.fromhex(  # 0/1500790, rmid 0, xl_info 0x60, xl_xid 0
    "64000000080000000500000005000000400000000100000000000000")
SMGR_TRUNCATE = bytes.fromhex(  # 0/3640A10, rmid 2, xl_info 0x21, xl_xid 746
    "000000007f060000050000006940000007000000")
PREPARE = bytes.fromhex(  # 0/366B1B8, rmid 1, xl_info 0x10, xl_xid 754
    "3445f957dc000000f2020000050000002ca51d69150403000a000000000000000000000000000000"
    "00000000000000000000000000040300000000000000000000000000000000007031000000000000"
    "14000000017f0000f2020000000000000000000000000501070000000000000014000000017f0000"
    "05000000654000000000000000000001030000007f55000038000000020000000100000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "65400000000000000000000000000000")
COMMIT_PREPARED = bytes.fromhex(  # 0/366B2B0, rmid 1, xl_info 0xb0, xl_xid 0
    "7fa51d691504030050000000f2020000")
ABORT_PREPARED = bytes.fromhex(  # 0/366B490, rmid 1, xl_info 0xc0, xl_xid 0
    "09a61d691504030050000000f3020000")
DBASE_DROP = bytes.fromhex(  # 0/37A47C0, rmid 4, xl_info 0x21, xl_xid 758
    "75400000010000007f060000")
HEAP_LOCK = bytes.fromhex(  # 0/37BED50, rmid 10, xl_info 0x62, xl_xid 762
    "fa02000001000a01")
MULTIXACT_CREATE = bytes.fromhex(  # 0/37D0360, rmid 6, xl_info 0x20, xl_xid 763
    "010000000100000002000000fa02000000000000fb02000000000000")
HEAP_UPDATE = bytes.fromhex(  # 0/37F98F0, rmid 10, xl_info 0x22, xl_xid 766
    "fe02000001000003000000006600")
COMMIT = bytes.fromhex(  # 0/40223D0, rmid 1, xl_info 0x81, xl_xid 770
    "86f72769150403004f010000050000007f0600000300000003030000050300000603000001000000"
    "7f060000050000007c4000000100000002000000050000007c400000180000005000000005000000"
    "555002167f5500004f000000050000008bd2aa9c00000000500000000500000015ea28fd7f550000"
    "4f0000000500000007c879bd020000000700000005000000d7be7b8b140000000600000005000000"
    "51709abc0000000007000000050000008638aeb4000000000602000005000000000a31d77f550000"
    "07000000050000005fc9ab6b000000000600000005000000a2d64070000000000700000005000000"
    "bf9a4efd000000000600000005000000d781f9a80000000007000000050000006c722c5e00000000"
    "060000000500000040313924000000000700000005000000944f803a000000000600000005000000"
    "a0ee791400000000070000000500000044c1c78500000000060000000500000055c79fd800000000"
    "37000000050000001576efcb00000000360000000500000007c879bd00000000fb79044705000000"
    "300a000014021100fb79044705000000300a000014021100fe000000050000007c40000000000000"
    "fb79044705000000300a000014021100")
ABORT = bytes.fromhex(  # 0/4039C10, rmid 1, xl_info 0xa1, xl_xid 775
    "be1828691504030044010000020000007f06000005000000854000007f0600000500000082400000"
    "02000000020000000500000082400000020000000500000085400000")
LOGICAL_MESSAGE = bytes.fromhex(  # 0/67D8400, rmid 21, xl_info 0x0, xl_xid 787
    "05000000015500000a0000000000000005000000000000007374726174612d74780068656c6c6f")
RESTORE_POINT = bytes.fromhex(  # 0/67D84B8, rmid 0, xl_info 0x70, xl_xid 0
    "67c14b69150403007374726174615f7270000447fc7f0000783749507f550000009d73757f550000"
    "588980757f550000808680757f550000708880757f55000000800447fc7f0000")


def test_commit_with_subxacts_rels_stats_invals() -> None:
    # COMMIT 2026-11-25 09:42:15.183238 UTC; rels: base/5/16508; subxacts: 771 773 774;
    # dropped stats: 2/5/16508; inval msgs: catcache 80 ... (24 messages)
    d = decode_record(RmgrId.TRANSACTION, 0x81, COMMIT, xl_xid=770, lsn=0x40223D0)
    assert isinstance(d, XactCommit)
    assert (d.xid, d.is_prepared) == (770, False)
    assert d.commit_time == pg_time("2026-11-25 09:42:15.183238")
    assert d.subxacts == (771, 773, 774)
    assert d.dropped_rels == ((1663, 5, 16508),)
    assert d.dropped_stats == ((2, 5, 16508),)
    assert (d.db_id, d.ts_id) == (5, 1663)
    assert len(d.invals) == 24 * 16


def test_abort_with_rels() -> None:
    # ABORT 2026-11-25 09:42:15.191742 UTC; rels: base/5/16517 base/5/16514;
    # dropped stats: 2/5/16514 2/5/16517
    d = decode_record(RmgrId.TRANSACTION, 0xA1, ABORT, xl_xid=775)
    assert isinstance(d, XactAbort)
    assert (d.xid, d.abort_time) == (775, pg_time("2026-11-25 09:42:15.191742"))
    assert d.dropped_rels == ((1663, 5, 16517), (1663, 5, 16514))
    assert d.dropped_stats == ((2, 5, 16514), (2, 5, 16517))
    assert d.subxacts == ()


def test_prepare_and_its_outcomes() -> None:
    # PREPARE gid p1: 2026-11-25 09:42:14.506796 UTC
    p = decode_record(RmgrId.TRANSACTION, 0x10, PREPARE, xl_xid=754)
    assert isinstance(p, XactPrepare)
    assert (p.xid, p.gid, p.database, p.owner) == (754, "p1", 5, 10)
    assert p.prepared_at == pg_time("2026-11-25 09:42:14.506796")
    assert (p.subxacts, p.commit_rels, p.abort_rels, p.origin) == ((), (), (), None)
    assert p.state_data == PREPARE
    # COMMIT_PREPARED 754: 2026-11-25 09:42:14.506879 UTC
    c = decode_record(RmgrId.TRANSACTION, 0xB0, COMMIT_PREPARED, xl_xid=0)
    assert isinstance(c, XactCommit)
    assert (c.xid, c.is_prepared, c.db_id, c.ts_id) == (754, True, None, None)
    assert c.commit_time == pg_time("2026-11-25 09:42:14.506879")
    # ABORT_PREPARED 755: 2026-11-25 09:42:14.507017 UTC
    a = decode_record(RmgrId.TRANSACTION, 0xC0, ABORT_PREPARED, xl_xid=0)
    assert isinstance(a, XactAbort)
    assert (a.xid, a.is_prepared) == (755, True)
    assert a.abort_time == pg_time("2026-11-25 09:42:14.507017")


def test_running_xacts_and_checkpoint() -> None:
    # RUNNING_XACTS nextXid 717 latestCompletedXid 715 oldestRunningXid 716; 1 xacts: 716
    r = decode_record(RmgrId.STANDBY, 0x10, RUNNING_XACTS)
    assert r == RunningXacts(xcnt=1, subxcnt=0, subxid_overflow=False, next_xid=717,
                             oldest_running_xid=716, latest_completed_xid=715, xids=(716,),
                             subxids=())
    # CHECKPOINT_ONLINE redo 0/14F98C8; tli 1; prev tli 1; fpw true; xid 0:717; oid 20192;
    # multi 1; offset 0; oldest xid 716 in DB 1; oldest multi 1 in DB 1;
    # oldest/newest commit timestamp xid: 0/0; oldest running xid 716; online
    d = decode_record(RmgrId.XLOG, 0x10, CHECKPOINT_ONLINE)
    assert isinstance(d, XlogCheckpoint) and not d.shutdown
    c = d.checkpoint
    assert c.redo == Lsn.parse("0/14F98C8")
    assert (c.this_timeline_id, c.prev_timeline_id, c.full_page_writes) == (1, 1, True)
    assert (c.next_xid, c.next_oid, c.next_multi, c.next_multi_offset) == (717, 20192, 1, 0)
    assert (c.oldest_xid, c.oldest_xid_db, c.oldest_multi, c.oldest_multi_db) == (716, 1, 1, 1)
    assert (c.oldest_commit_ts_xid, c.newest_commit_ts_xid, c.oldest_active_xid) == (0, 0, 716)


def test_storage_database_multixact() -> None:
    # CREATE base/1/13391
    assert decode_record(RmgrId.STORAGE, 0x11, SMGR_CREATE) == SmgrCreate((1663, 1, 13391), 0)
    # TRUNCATE base/5/16489 to 0 blocks flags 7
    assert decode_record(RmgrId.STORAGE, 0x21, SMGR_TRUNCATE) == \
        SmgrTruncate(rel=(1663, 5, 16489), blkno=0, flags=7)
    # CREATE_FILE_COPY copy dir 1663/1 to 1663/4
    assert decode_record(RmgrId.DATABASE, 0x01, CREATE_FILE_COPY) == \
        DbaseCreateFileCopy(db_id=4, tablespace_id=1663, src_db_id=1, src_tablespace_id=1663)
    # DROP dir 1663/16501
    assert decode_record(RmgrId.DATABASE, 0x21, DBASE_DROP) == DbaseDrop(16501, (1663,))
    # CREATE_ID 1 offset 1 nmembers 2: 762 (keysh) 763 (keysh)
    assert decode_record(RmgrId.MULTIXACT, 0x20, MULTIXACT_CREATE) == \
        MultiXactCreate(mid=1, moff=1, members=((762, 0), (763, 0)))


def test_xlog_and_logical_message() -> None:
    # PARAMETER_CHANGE max_connections=100 max_worker_processes=8 max_wal_senders=5
    # max_prepared_xacts=5 max_locks_per_xact=64 wal_level=replica wal_log_hints=off
    # track_commit_timestamp=off
    assert decode_record(RmgrId.XLOG, 0x60, PARAMETER_CHANGE) == XlogParameterChange(
        100, 8, 5, 5, 64, 1, False, False)
    # RESTORE_POINT strata_rp (the bytes after the name's NUL are uninitialized)
    rp = decode_record(RmgrId.XLOG, 0x70, RESTORE_POINT)
    assert isinstance(rp, XlogRestorePoint) and rp.name == "strata_rp"
    # MESSAGE transactional, prefix "strata-tx"; payload (5 bytes): 68 65 6C 6C 6F
    assert decode_record(RmgrId.LOGICALMSG, 0x00, LOGICAL_MESSAGE) == \
        LogicalMessage(db_id=5, transactional=True, prefix="strata-tx", message=b"hello")


def test_heap_vm_clears() -> None:
    # UPDATE off 1 xmax 766 flags 0x03 ; new off 102 xmax 0,
    # blkref #0: rel 1663/5/16476 blk 25, blkref #1: rel 1663/5/16476 blk 0
    rel = (1663, 5, 16476)
    blocks = [Block(0, *rel, 0, 25), Block(1, *rel, 0, 0)]
    u = decode_record(RmgrId.HEAP, 0x22, HEAP_UPDATE, blocks)
    assert isinstance(u, HeapUpdate)
    assert (u.old_offnum, u.old_xmax, u.new_offnum, u.flags, u.hot) == (1, 766, 102, 3, False)
    assert u.vm_clear == VmClear(((rel, 25), (rel, 0)), VISIBILITYMAP_VALID_BITS)
    # LOCK off 1: xid 762: flags 0x01 LOCK_ONLY KEYSHR_LOCK, blkref #0: rel 1663/5/16476 blk 0
    lock = decode_record(RmgrId.HEAP, 0x62, HEAP_LOCK, [Block(0, *rel, 0, 0)])
    assert isinstance(lock, HeapLock)
    assert (lock.xmax, lock.offnum, lock.flags) == (762, 1, 1)
    assert lock.vm_clear == VmClear(((rel, 0),), VISIBILITYMAP_ALL_FROZEN)
    # VISIBLE cutoff xid 682 flags 0x03, blkref #0: rel 1663/1/2619 fork vm blk 0,
    # blkref #1: rel 1663/1/2619 blk 0
    cat = (1663, 1, 2619)
    v = decode_record(RmgrId.HEAP2, 0x40, HEAP2_VISIBLE,
                      [Block(0, *cat, 2, 0), Block(1, *cat, 0, 0)])
    assert v == HeapVisible(cutoff_xid=682, flags=3, vm_block=(cat, 0), heap_block=(cat, 0))

"""XLOG, Standby and LogicalMessage decoders, the dispatcher, and robustness against any bytes
(pg_control.h, standbydefs.h, message.h layouts)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.pg.checkpoint import CheckPoint
from strata.pg.constants import RmgrId
from strata.pg.records import (
    LogicalMessage,
    RunningXacts,
    XlogBackupEnd,
    XlogCheckpoint,
    XlogEndOfRecovery,
    XlogFpi,
    XlogFpwChange,
    XlogNextOid,
    XlogOverwriteContrecord,
    XlogParameterChange,
    XlogRestorePoint,
    XlogSwitch,
    decode_record,
    record_type_name,
)

XLOG = RmgrId.XLOG
CKPT = CheckPoint(redo=Lsn(0x1_6B37_40), this_timeline_id=1, prev_timeline_id=1,
                  full_page_writes=True, next_xid=(2 << 32) | 800, next_oid=24576,
                  next_multi=3, next_multi_offset=5, oldest_xid=716, oldest_xid_db=1,
                  oldest_multi=1, oldest_multi_db=1, time=1_700_000_000,
                  oldest_commit_ts_xid=0, newest_commit_ts_xid=0, oldest_active_xid=800)


def test_checkpoints() -> None:
    for info, shutdown in ((0x00, True), (0x10, False)):
        d = decode_record(XLOG, info, CKPT.to_bytes())
        assert d == XlogCheckpoint(shutdown=shutdown, checkpoint=CKPT)
    with pytest.raises(CorruptionError, match="CHECKPOINT_ONLINE record.*CheckPoint needs 88"):
        decode_record(XLOG, 0x10, CKPT.to_bytes()[:87])


def test_small_xlog_records() -> None:
    assert decode_record(XLOG, 0x30, struct.pack("<I", 24576)) == XlogNextOid(24576)
    assert decode_record(XLOG, 0x40, b"") == XlogSwitch()
    assert decode_record(XLOG, 0xB0, b"", []) == XlogFpi(for_hint=False)
    assert decode_record(XLOG, 0xA0, b"", []) == XlogFpi(for_hint=True)
    assert decode_record(XLOG, 0x50, struct.pack("<Q", 0x2000028)) == XlogBackupEnd(0x2000028)
    assert decode_record(XLOG, 0x80, b"\x01") == XlogFpwChange(full_page_writes=True)
    assert decode_record(XLOG, 0x90, struct.pack("<qII", 77, 2, 1)) == \
        XlogEndOfRecovery(end_time=77, this_timeline_id=2, prev_timeline_id=1)
    assert decode_record(XLOG, 0xD0, struct.pack("<Qq", 0x3000000, 5)) == \
        XlogOverwriteContrecord(overwritten_lsn=0x3000000, time=5)


def test_parameter_change_and_restore_point() -> None:
    # sizeof(xl_parameter_change) is 28: six ints, two bools, two bytes of tail padding.
    data = struct.pack("<iiiiii??2x", 100, 8, 10, 5, 64, 1, False, True)
    assert decode_record(XLOG, 0x60, data) == XlogParameterChange(
        max_connections=100, max_worker_processes=8, max_wal_senders=10, max_prepared_xacts=5,
        max_locks_per_xact=64, wal_level=1, wal_log_hints=False, track_commit_timestamp=True)
    name = b"before_upgrade".ljust(64, b"\0")
    assert decode_record(XLOG, 0x70, struct.pack("<q", 123) + name) == \
        XlogRestorePoint(time=123, name="before_upgrade")
    with pytest.raises(CorruptionError, match="xl_restore_point"):
        decode_record(XLOG, 0x70, struct.pack("<q", 123) + name[:-1])


def test_unknown_xlog_info() -> None:
    for info in (0xC0, 0xE0, 0xF0):
        with pytest.raises(CorruptionError, match=f"unknown XLOG info code {info:#04x}"):
            decode_record(XLOG, info, b"")


def test_running_xacts() -> None:
    data = struct.pack("<ii?3xIII", 2, 1, False, 900, 880, 899) + struct.pack("<3I", 880, 890,
                                                                               891)
    d = decode_record(RmgrId.STANDBY, 0x10, data)
    assert d == RunningXacts(xcnt=2, subxcnt=1, subxid_overflow=False, next_xid=900,
                             oldest_running_xid=880, latest_completed_xid=899,
                             xids=(880, 890), subxids=(891,))
    with pytest.raises(CorruptionError, match="xids needs 12 bytes"):
        decode_record(RmgrId.STANDBY, 0x10, data[:-1])
    assert decode_record(RmgrId.STANDBY, 0x00, b"anything") is None  # LOCK
    assert decode_record(RmgrId.STANDBY, 0x20, b"") is None  # INVALIDATIONS
    with pytest.raises(CorruptionError, match="unknown Standby info code 0x30"):
        decode_record(RmgrId.STANDBY, 0x30, b"")


def test_logical_message() -> None:
    data = struct.pack("<I?3xQQ", 5, True, 4, 3) + b"pfx\0" + b"\x00\xff\x10"
    d = decode_record(RmgrId.LOGICALMSG, 0x00, data)
    assert d == LogicalMessage(db_id=5, transactional=True, prefix="pfx",
                               message=b"\x00\xff\x10")
    with pytest.raises(CorruptionError, match="message needs 3 bytes"):
        decode_record(RmgrId.LOGICALMSG, 0x00, data[:-1])
    bad = struct.pack("<I?3xQQ", 5, True, 4, 0) + b"pfxx"
    with pytest.raises(CorruptionError, match="not NUL-terminated"):
        decode_record(RmgrId.LOGICALMSG, 0x00, bad)


def test_dispatcher_ignores_other_rmgrs_and_low_info_bits() -> None:
    for rmid in (RmgrId.BTREE, RmgrId.GIN, RmgrId.TABLESPACE, RmgrId.COMMIT_TS,
                 RmgrId.REPLORIGIN, RmgrId.GENERIC, 99):
        assert decode_record(rmid, 0x10, b"\xff", []) is None
    # XLR_CHECK_CONSISTENCY and XLR_SPECIAL_REL_UPDATE live in the low bits of xl_info.
    assert decode_record(XLOG, 0x30 | 0x02 | 0x01, struct.pack("<I", 7)) == XlogNextOid(7)
    assert record_type_name(RmgrId.HEAP, 0x80) == "Heap INSERT+INIT"
    assert record_type_name(RmgrId.BTREE, 0x10) == "Btree 0x10"
    assert record_type_name(RmgrId.TRANSACTION, 0x80 | 0x30) == "Transaction COMMIT_PREPARED"


DECODED = [RmgrId.XLOG, RmgrId.TRANSACTION, RmgrId.STORAGE, RmgrId.CLOG, RmgrId.DATABASE,
           RmgrId.MULTIXACT, RmgrId.RELMAP, RmgrId.STANDBY, RmgrId.HEAP2, RmgrId.HEAP,
           RmgrId.LOGICALMSG]


@dataclass(frozen=True)
class Block:
    block_id: int
    blkno: int
    spcnode: int = 1663
    dbnode: int = 5
    relnode: int = 16384
    forknum: int = 0


@settings(max_examples=300, deadline=None)
@given(rmid=st.sampled_from(DECODED), info=st.integers(0, 255), data=st.binary(max_size=120),
       nblocks=st.integers(0, 2))
def test_any_bytes_decode_or_raise_corruption(rmid: int, info: int, data: bytes,
                                              nblocks: int) -> None:
    """Whatever the bytes, a decoder returns or raises CorruptionError, nothing else."""
    blocks = [Block(i, 10 + i) for i in range(nblocks)]
    try:
        decode_record(rmid, info, data, blocks, xl_xid=5, lsn=0x1000)
    except CorruptionError as err:
        assert "record at 0/1000" in str(err)

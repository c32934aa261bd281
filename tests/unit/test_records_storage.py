"""Storage, Database, RelMap, CLOG and MultiXact decoders on bytes laid out as the
PostgreSQL 15 structs (storage_xlog.h, dbcommands_xlog.h, relmapper.h, clog.c, multixact.h)."""

from __future__ import annotations

import struct

import pytest

from strata.common.errors import CorruptionError
from strata.pg.constants import RmgrId
from strata.pg.records import (
    ClogTruncate,
    ClogZeroPage,
    DbaseCreateFileCopy,
    DbaseCreateWalLog,
    DbaseDrop,
    MultiXactCreate,
    MultiXactTruncate,
    MultiXactZeroMemPage,
    MultiXactZeroOffPage,
    RelmapUpdate,
    SmgrCreate,
    SmgrTruncate,
    decode_record,
)
from strata.pg.records import multixact as mx


def test_smgr_create_and_truncate() -> None:
    d = decode_record(RmgrId.STORAGE, 0x10, struct.pack("<IIIi", 1663, 5, 16384, 3))
    assert d == SmgrCreate(rel=(1663, 5, 16384), forknum=3)
    t = decode_record(RmgrId.STORAGE, 0x20, struct.pack("<IIIIi", 10, 1663, 5, 16384, 7))
    assert t == SmgrTruncate(rel=(1663, 5, 16384), blkno=10, flags=7)
    assert isinstance(t, SmgrTruncate)
    assert t.truncates_heap and t.truncates_vm and t.truncates_fsm
    vm_only = decode_record(RmgrId.STORAGE, 0x20, struct.pack("<IIIIi", 0, 1663, 5, 1, 2))
    assert isinstance(vm_only, SmgrTruncate)
    assert (vm_only.truncates_heap, vm_only.truncates_vm, vm_only.truncates_fsm) == (
        False, True, False)


def test_smgr_rejects_bad_input() -> None:
    with pytest.raises(CorruptionError, match="Storage CREATE record.*xl_smgr_create"):
        decode_record(RmgrId.STORAGE, 0x10, bytes(15))
    with pytest.raises(CorruptionError, match="fork number 4"):
        decode_record(RmgrId.STORAGE, 0x10, struct.pack("<IIIi", 1663, 5, 1, 4))
    with pytest.raises(CorruptionError, match="unknown bits"):
        decode_record(RmgrId.STORAGE, 0x20, struct.pack("<IIIIi", 0, 1663, 5, 1, 8))
    with pytest.raises(CorruptionError, match="unknown Storage info code 0x30"):
        decode_record(RmgrId.STORAGE, 0x30, b"")


def test_database_records() -> None:
    d = decode_record(RmgrId.DATABASE, 0x00, struct.pack("<IIII", 16500, 1663, 1, 1663))
    assert d == DbaseCreateFileCopy(db_id=16500, tablespace_id=1663, src_db_id=1,
                                    src_tablespace_id=1663)
    w = decode_record(RmgrId.DATABASE, 0x10, struct.pack("<II", 16501, 1663))
    assert w == DbaseCreateWalLog(db_id=16501, tablespace_id=1663)
    drop = decode_record(RmgrId.DATABASE, 0x20, struct.pack("<Ii2I", 16500, 2, 1663, 16400))
    assert drop == DbaseDrop(db_id=16500, tablespace_ids=(1663, 16400))
    with pytest.raises(CorruptionError, match="ntablespaces"):
        decode_record(RmgrId.DATABASE, 0x20, struct.pack("<Ii2I", 16500, 3, 1663, 16400))
    with pytest.raises(CorruptionError, match="unknown Database info code 0x30"):
        decode_record(RmgrId.DATABASE, 0x30, b"")


def test_relmap_update() -> None:
    content = bytes(range(256)) * 2
    d = decode_record(RmgrId.RELMAP, 0x00, struct.pack("<IIi", 5, 1663, 512) + content)
    assert d == RelmapUpdate(dbid=5, tsid=1663, data=content)
    assert isinstance(d, RelmapUpdate) and d.nbytes == 512
    with pytest.raises(CorruptionError, match="relmap data needs 512 bytes"):
        decode_record(RmgrId.RELMAP, 0x00, struct.pack("<IIi", 5, 1663, 512) + content[:-1])
    with pytest.raises(CorruptionError, match="nbytes is 100"):
        decode_record(RmgrId.RELMAP, 0x00, struct.pack("<IIi", 5, 1663, 100) + content)


def test_clog_records() -> None:
    assert decode_record(RmgrId.CLOG, 0x00, struct.pack("<i", 3)) == ClogZeroPage(pageno=3)
    t = decode_record(RmgrId.CLOG, 0x10, struct.pack("<iII", 2, 70000, 5))
    assert t == ClogTruncate(pageno=2, oldest_xact=70000, oldest_xact_db=5)
    with pytest.raises(CorruptionError, match="negative"):
        decode_record(RmgrId.CLOG, 0x00, struct.pack("<i", -1))
    with pytest.raises(CorruptionError, match="CLOG TRUNCATE record at 0/10"):
        decode_record(RmgrId.CLOG, 0x10, struct.pack("<ii", 2, 1), lsn=0x10)


def test_multixact_records() -> None:
    assert decode_record(RmgrId.MULTIXACT, 0x00, struct.pack("<i", 1)) == \
        MultiXactZeroOffPage(pageno=1)
    assert decode_record(RmgrId.MULTIXACT, 0x10, struct.pack("<i", 2)) == \
        MultiXactZeroMemPage(pageno=2)
    members = [(760, mx.MULTIXACT_STATUS_FOR_KEY_SHARE), (761, mx.MULTIXACT_STATUS_UPDATE)]
    data = struct.pack("<IIi", 9, 17, 2) + b"".join(struct.pack("<Ii", *m) for m in members)
    d = decode_record(RmgrId.MULTIXACT, 0x20, data)
    assert d == MultiXactCreate(mid=9, moff=17, members=tuple(members))
    assert isinstance(d, MultiXactCreate) and d.nmembers == 2
    t = decode_record(RmgrId.MULTIXACT, 0x30, struct.pack("<IIIII", 5, 1, 100, 0, 400))
    assert t == MultiXactTruncate(oldest_multi_db=5, start_trunc_off=1, end_trunc_off=100,
                                  start_trunc_memb=0, end_trunc_memb=400)
    with pytest.raises(CorruptionError, match="members needs 16 bytes"):
        decode_record(RmgrId.MULTIXACT, 0x20, data[:-1])
    bad_status = struct.pack("<IIi", 9, 17, 1) + struct.pack("<Ii", 760, 6)
    with pytest.raises(CorruptionError, match="unknown status 6"):
        decode_record(RmgrId.MULTIXACT, 0x20, bad_status)
    with pytest.raises(CorruptionError, match="nmembers is -2"):
        decode_record(RmgrId.MULTIXACT, 0x20, struct.pack("<IIi", 9, 17, -2))
    with pytest.raises(CorruptionError, match="unknown MultiXact info code 0x40"):
        decode_record(RmgrId.MULTIXACT, 0x40, b"")

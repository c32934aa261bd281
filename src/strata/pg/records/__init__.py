"""Decode the main data of WAL records into typed descriptions of what the pageserver
must apply itself (the changes PostgreSQL makes without a block image, D2).

`decode_record(rmid, info, main_data, blocks)` returns a dataclass from one of the
per-resource-manager modules, or None for records the pageserver needs nothing from
beyond their block images (btree, gin, ..., heap prune, standby locks). The dataclasses
are not frozen: ingest makes one per record, and a frozen dataclass's `__init__` (an
`object.__setattr__` call per field) costs about three times a plain one's; nothing
changes them after decoding.
A record of a handled resource manager with an unknown info code, or whose main
data does not fit its PostgreSQL 15 layout, raises `CorruptionError` naming the
resource manager, record type and LSN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from strata.pg.constants import XLR_RMGR_INFO_MASK, RmgrId
from strata.pg.records import (
    clog,
    dbase,
    heap,
    logicalmsg,
    multixact,
    relmap,
    smgr,
    standby,
    xact,
    xlog,
)
from strata.pg.records._cursor import BlockLike, Cursor, RelFileNode
from strata.pg.records.clog import ClogTruncate, ClogZeroPage
from strata.pg.records.dbase import DbaseCreateFileCopy, DbaseCreateWalLog, DbaseDrop
from strata.pg.records.heap import (
    HeapDelete,
    HeapInsert,
    HeapLock,
    HeapMultiInsert,
    HeapUpdate,
    HeapVisible,
    VmClear,
)
from strata.pg.records.logicalmsg import LogicalMessage
from strata.pg.records.multixact import (
    MultiXactCreate,
    MultiXactTruncate,
    MultiXactZeroMemPage,
    MultiXactZeroOffPage,
)
from strata.pg.records.names import record_type_name
from strata.pg.records.relmap import RelmapUpdate
from strata.pg.records.smgr import SmgrCreate, SmgrTruncate
from strata.pg.records.standby import RunningXacts
from strata.pg.records.xact import (
    XactAbort,
    XactAssignment,
    XactCommit,
    XactInvalidations,
    XactOrigin,
    XactPrepare,
)
from strata.pg.records.xlog import (
    XlogBackupEnd,
    XlogCheckpoint,
    XlogEndOfRecovery,
    XlogFpi,
    XlogFpwChange,
    XlogNextOid,
    XlogNoop,
    XlogOverwriteContrecord,
    XlogParameterChange,
    XlogRecord,
    XlogRestorePoint,
    XlogSwitch,
)

__all__ = [
    "BlockLike", "ClogTruncate", "ClogZeroPage", "DbaseCreateFileCopy", "DbaseCreateWalLog",
    "DbaseDrop", "DecodedRecordLike", "HeapDelete", "HeapInsert", "HeapLock",
    "HeapMultiInsert", "HeapUpdate", "HeapVisible", "LogicalMessage", "MultiXactCreate",
    "MultiXactTruncate", "MultiXactZeroMemPage", "MultiXactZeroOffPage", "Record",
    "RelFileNode", "RelmapUpdate", "RunningXacts", "SmgrCreate", "SmgrTruncate", "VmClear",
    "XactAbort", "XactAssignment", "XactCommit", "XactInvalidations", "XactOrigin",
    "XactPrepare", "XlogBackupEnd", "XlogCheckpoint", "XlogEndOfRecovery", "XlogFpi",
    "XlogFpwChange", "XlogNextOid", "XlogNoop", "XlogOverwriteContrecord",
    "XlogParameterChange", "XlogRestorePoint", "XlogSwitch", "decode", "decode_record",
    "record_type_name",
]

Record = (
    XlogRecord
    | XactCommit | XactAbort | XactPrepare | XactAssignment | XactInvalidations
    | SmgrCreate | SmgrTruncate
    | ClogZeroPage | ClogTruncate
    | DbaseCreateFileCopy | DbaseCreateWalLog | DbaseDrop
    | MultiXactZeroOffPage | MultiXactZeroMemPage | MultiXactCreate | MultiXactTruncate
    | RelmapUpdate | RunningXacts
    | HeapInsert | HeapMultiInsert | HeapDelete | HeapUpdate | HeapLock | HeapVisible
    | LogicalMessage
)

_Decoder = Callable[[Cursor, int, Sequence[BlockLike], int], "Record | None"]

_DECODERS: dict[int, _Decoder] = {
    RmgrId.XLOG: lambda cur, info, blocks, xid: xlog.decode(cur, info),
    RmgrId.TRANSACTION: lambda cur, info, blocks, xid: xact.decode(cur, info, xid),
    RmgrId.STORAGE: lambda cur, info, blocks, xid: smgr.decode(cur, info),
    RmgrId.CLOG: lambda cur, info, blocks, xid: clog.decode(cur, info),
    RmgrId.DATABASE: lambda cur, info, blocks, xid: dbase.decode(cur, info),
    RmgrId.MULTIXACT: lambda cur, info, blocks, xid: multixact.decode(cur, info),
    RmgrId.RELMAP: lambda cur, info, blocks, xid: relmap.decode(cur, info),
    RmgrId.STANDBY: lambda cur, info, blocks, xid: standby.decode(cur, info),
    RmgrId.HEAP2: lambda cur, info, blocks, xid: heap.decode_heap2(cur, info, blocks),
    RmgrId.HEAP: lambda cur, info, blocks, xid: heap.decode_heap(cur, info, blocks),
    RmgrId.LOGICALMSG: lambda cur, info, blocks, xid: logicalmsg.decode(cur, info),
}


def decode_record(rmid: int, info: int, main_data: bytes,
                  blocks: Sequence[BlockLike] = (), *, xl_xid: int = 0,
                  lsn: int | None = None) -> Record | None:
    """Decode one record's main data; None if the pageserver needs nothing from it.

    `info` is the record's xl_info (the low, non-rmgr bits are ignored); `xl_xid` its
    xl_xid, which COMMIT and ABORT report as their top-level xid; `lsn` only goes
    into error messages. Raises `CorruptionError` for a record that does not decode.
    """
    decoder = _DECODERS.get(rmid)
    if decoder is None:
        return None
    cur = Cursor(bytes(main_data), rmid, info, lsn)
    return decoder(cur, info & XLR_RMGR_INFO_MASK, blocks, xl_xid)


class DecodedRecordLike(Protocol):
    """What `decode` reads from `strata.pg.walreader.DecodedRecord`."""

    @property
    def rmid(self) -> int: ...
    @property
    def info(self) -> int: ...
    @property
    def xid(self) -> int: ...
    @property
    def lsn(self) -> int: ...
    @property
    def main_data(self) -> bytes: ...
    @property
    def blocks(self) -> Sequence[BlockLike]: ...


def decode(record: DecodedRecordLike) -> Record | None:
    """`decode_record` for a record from `strata.pg.walreader`."""
    return decode_record(record.rmid, record.info, record.main_data, record.blocks,
                         xl_xid=record.xid, lsn=record.lsn)

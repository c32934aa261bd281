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
    "XlogParameterChange", "XlogRestorePoint", "XlogSwitch", "decode", "decode_effects",
    "decode_record",
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

_Decoder = Callable[[Cursor, int], "Record | None"]

# The resource managers other than heap, heap2 and transaction (which `_decode` tests
# first: most records are theirs, and their decoders take the blocks or the xid too).
_DECODERS: dict[int, _Decoder] = {
    RmgrId.XLOG: xlog.decode,
    RmgrId.STORAGE: smgr.decode,
    RmgrId.CLOG: clog.decode,
    RmgrId.DATABASE: dbase.decode,
    RmgrId.MULTIXACT: multixact.decode,
    RmgrId.RELMAP: relmap.decode,
    RmgrId.STANDBY: standby.decode,
    RmgrId.LOGICALMSG: logicalmsg.decode,
}
_HEAP = int(RmgrId.HEAP)
_HEAP2 = int(RmgrId.HEAP2)
_TRANSACTION = int(RmgrId.TRANSACTION)
_DECODED = frozenset((_HEAP, _HEAP2, _TRANSACTION, *_DECODERS))


def decode_record(rmid: int, info: int, main_data: bytes,
                  blocks: Sequence[BlockLike] = (), *, xl_xid: int = 0,
                  lsn: int | None = None) -> Record | None:
    """Decode one record's main data; None if the pageserver needs nothing from it.

    `info` is the record's xl_info (the low, non-rmgr bits are ignored); `xl_xid` its
    xl_xid, which COMMIT and ABORT report as their top-level xid; `lsn` only goes
    into error messages. Raises `CorruptionError` for a record that does not decode.
    """
    return _decode(rmid, info, main_data, blocks, xl_xid, lsn)


def _decode(rmid: int, info: int, main_data: bytes, blocks: Sequence[BlockLike], xl_xid: int,
            lsn: int | None) -> Record | None:
    if rmid not in _DECODED:
        return None  # btree, gin, ...: their block images are all there is
    cur = Cursor(bytes(main_data), rmid, info, lsn)
    rm_info = info & XLR_RMGR_INFO_MASK
    # Once per record ingested: the common resource managers are called directly, the
    # rest through `_DECODERS`.
    if rmid == _HEAP:
        return heap.decode_heap(cur, rm_info, blocks)
    if rmid == _TRANSACTION:
        return xact.decode(cur, rm_info, xl_xid)
    if rmid == _HEAP2:
        return heap.decode_heap2(cur, rm_info, blocks)
    return _DECODERS[rmid](cur, rm_info)


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
    return _decode(record.rmid, record.info, record.main_data, record.blocks, record.xid,
                   record.lsn)


def decode_effects(record: DecodedRecordLike) -> Record | None:
    """`decode(record)`, or None without decoding for a Heap or Heap2 record that changes
    nothing beyond its block images (`heap.images_only`: no VM bits cleared): what
    ingest applies, without a dataclass for most of its records. Raises
    `CorruptionError` exactly when `decode` does."""
    rmid = record.rmid
    if rmid == _HEAP or rmid == _HEAP2:
        if heap.images_only(rmid == _HEAP2, record.info, record.main_data):
            return None
    return decode(record)

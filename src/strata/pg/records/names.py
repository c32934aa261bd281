"""Names of WAL record types as pg_waldump prints them (`Heap UPDATE+INIT`), for messages."""

from __future__ import annotations

from strata.pg.constants import RMGR_NAMES, XLR_RMGR_INFO_MASK, RmgrId
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

# Record type names as pg_waldump prints them, for error messages.
_TYPE_NAMES: dict[int, tuple[int, dict[int, str]]] = {
    RmgrId.XLOG: (0xF0, xlog.XLOG_NAMES),
    RmgrId.TRANSACTION: (xact.XLOG_XACT_OPMASK, xact.XACT_NAMES),
    RmgrId.STORAGE: (0xF0, smgr.SMGR_NAMES),
    RmgrId.CLOG: (0xF0, clog.CLOG_NAMES),
    RmgrId.DATABASE: (0xF0, dbase.DBASE_NAMES),
    RmgrId.MULTIXACT: (0xF0, multixact.MULTIXACT_NAMES),
    RmgrId.RELMAP: (0xF0, relmap.RELMAP_NAMES),
    RmgrId.STANDBY: (0xF0, standby.STANDBY_NAMES),
    RmgrId.HEAP2: (heap.XLOG_HEAP_OPMASK, heap.HEAP2_NAMES),
    RmgrId.HEAP: (heap.XLOG_HEAP_OPMASK, heap.HEAP_NAMES),
    RmgrId.LOGICALMSG: (0xF0, logicalmsg.LOGICALMSG_NAMES),
}

def record_type_name(rmid: int, info: int) -> str:
    """`Transaction COMMIT`, `Heap UPDATE+INIT`, `Btree 0x10`: for messages and tests."""
    try:
        rmgr = RMGR_NAMES[RmgrId(rmid)]
    except ValueError:
        return f"rmgr {rmid} info {info & XLR_RMGR_INFO_MASK:#04x}"
    known = _TYPE_NAMES.get(rmid)
    if known is None:
        return f"{rmgr} {info & XLR_RMGR_INFO_MASK:#04x}"
    mask, names = known
    name = names.get(info & mask, f"UNKNOWN {info & XLR_RMGR_INFO_MASK:#04x}")
    if rmid in (RmgrId.HEAP, RmgrId.HEAP2) and info & heap.XLOG_HEAP_INIT_PAGE:
        name += "+INIT"
    return f"{rmgr} {name}"

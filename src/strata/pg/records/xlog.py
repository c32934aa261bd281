"""Decode XLOG resource manager records (rmid 0): checkpoints, OID and WAL bookkeeping.

Layouts from PostgreSQL 15 `catalog/pg_control.h` (info codes, `CheckPoint`,
`xl_parameter_change`, `xl_restore_point`, `xl_end_of_recovery`,
`xl_overwrite_contrecord`) and the writers in `access/transam/xlog.c`
(NEXTOID: an Oid; BACKUP_END: the backup's start LSN; FPW_CHANGE: a bool).
FPI and FPI_FOR_HINT carry only block references.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.checkpoint import SIZE_OF_CHECKPOINT, CheckPoint
from strata.pg.constants import (
    XLOG_BACKUP_END,
    XLOG_CHECKPOINT_ONLINE,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_END_OF_RECOVERY,
    XLOG_FPI,
    XLOG_FPI_FOR_HINT,
    XLOG_FPW_CHANGE,
    XLOG_NEXTOID,
    XLOG_NOOP,
    XLOG_OVERWRITE_CONTRECORD,
    XLOG_PARAMETER_CHANGE,
    XLOG_RESTORE_POINT,
    XLOG_SWITCH,
)
from strata.pg.records._cursor import Cursor

XLOG_NAMES = {
    XLOG_CHECKPOINT_SHUTDOWN: "CHECKPOINT_SHUTDOWN", XLOG_CHECKPOINT_ONLINE: "CHECKPOINT_ONLINE",
    XLOG_NOOP: "NOOP", XLOG_NEXTOID: "NEXTOID", XLOG_SWITCH: "SWITCH",
    XLOG_BACKUP_END: "BACKUP_END", XLOG_PARAMETER_CHANGE: "PARAMETER_CHANGE",
    XLOG_RESTORE_POINT: "RESTORE_POINT", XLOG_FPW_CHANGE: "FPW_CHANGE",
    XLOG_END_OF_RECOVERY: "END_OF_RECOVERY", XLOG_FPI_FOR_HINT: "FPI_FOR_HINT",
    XLOG_FPI: "FPI", XLOG_OVERWRITE_CONTRECORD: "OVERWRITE_CONTRECORD",
}

# wal_level values (xlog.h)
WAL_LEVEL_MINIMAL = 0
WAL_LEVEL_REPLICA = 1
WAL_LEVEL_LOGICAL = 2

MAXFNAMELEN = 64
# MaxConnections, max_worker_processes, max_wal_senders, max_prepared_xacts,
# max_locks_per_xact, wal_level (ints), wal_log_hints, track_commit_timestamp (bools);
# sizeof is 28 with tail padding, the reader needs the 26 bytes that carry fields.
_PARAMETER_CHANGE = struct.Struct("<iiiiii??")
_END_OF_RECOVERY = struct.Struct("<qII")  # end_time, ThisTimeLineID, PrevTimeLineID
_RESTORE_POINT = struct.Struct(f"<q{MAXFNAMELEN}s")  # rp_time, rp_name
_OVERWRITE_CONTRECORD = struct.Struct("<Qq")  # overwritten_lsn, overwrite_time


@dataclass(slots=True)
class XlogCheckpoint:
    """CHECKPOINT_SHUTDOWN (`shutdown`) or CHECKPOINT_ONLINE."""

    shutdown: bool
    checkpoint: CheckPoint


@dataclass(slots=True)
class XlogNextOid:
    """OIDs up to `next_oid` may have been handed out (GetNewObjectId logs ahead)."""

    next_oid: int


@dataclass(slots=True)
class XlogSwitch:
    """The rest of the WAL segment is unused; the next record starts in the next one."""


@dataclass(slots=True)
class XlogNoop:
    """A record with no effect (its data is arbitrary)."""


@dataclass(slots=True)
class XlogFpi:
    """FPI (log_newpage) or FPI_FOR_HINT (`for_hint`): only block images."""

    for_hint: bool


@dataclass(slots=True)
class XlogBackupEnd:
    """End of an online backup that started at `start_lsn`."""

    start_lsn: int


@dataclass(slots=True)
class XlogParameterChange:
    """Settings that a standby must match (xl_parameter_change)."""

    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    wal_level: int
    wal_log_hints: bool
    track_commit_timestamp: bool


@dataclass(slots=True)
class XlogRestorePoint:
    """pg_create_restore_point(`name`) at TimestampTz `time`."""

    time: int
    name: str


@dataclass(slots=True)
class XlogFpwChange:
    full_page_writes: bool


@dataclass(slots=True)
class XlogEndOfRecovery:
    end_time: int
    this_timeline_id: int
    prev_timeline_id: int


@dataclass(slots=True)
class XlogOverwriteContrecord:
    """A partial record at `overwritten_lsn` was abandoned at TimestampTz `time`."""

    overwritten_lsn: int
    time: int


XlogRecord = (XlogCheckpoint | XlogNextOid | XlogSwitch | XlogNoop | XlogFpi | XlogBackupEnd
              | XlogParameterChange | XlogRestorePoint | XlogFpwChange | XlogEndOfRecovery
              | XlogOverwriteContrecord)


def _checkpoint(cur: Cursor, shutdown: bool) -> XlogCheckpoint:
    raw = cur.raw(SIZE_OF_CHECKPOINT, "CheckPoint")
    return XlogCheckpoint(shutdown=shutdown, checkpoint=CheckPoint.from_bytes(raw))


def _restore_point(cur: Cursor) -> XlogRestorePoint:
    rp_time, raw_name = cur.unpack(_RESTORE_POINT, "xl_restore_point")
    name_bytes = bytes(raw_name).split(b"\0", 1)[0]
    try:
        name = name_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise cur.error(f"restore point name {name_bytes!r} is not UTF-8") from err
    return XlogRestorePoint(time=rp_time, name=name)


def decode(cur: Cursor, info: int) -> XlogRecord:
    op = info & 0xF0
    if op in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_CHECKPOINT_ONLINE):
        return _checkpoint(cur, shutdown=op == XLOG_CHECKPOINT_SHUTDOWN)
    if op == XLOG_NEXTOID:
        return XlogNextOid(next_oid=cur.u32("nextOid"))
    if op == XLOG_SWITCH:
        return XlogSwitch()
    if op == XLOG_NOOP:
        return XlogNoop()
    if op in (XLOG_FPI, XLOG_FPI_FOR_HINT):
        return XlogFpi(for_hint=op == XLOG_FPI_FOR_HINT)
    if op == XLOG_BACKUP_END:
        return XlogBackupEnd(start_lsn=cur.u64("startpoint"))
    if op == XLOG_PARAMETER_CHANGE:
        return XlogParameterChange(*cur.unpack(_PARAMETER_CHANGE, "xl_parameter_change"))
    if op == XLOG_RESTORE_POINT:
        return _restore_point(cur)
    if op == XLOG_FPW_CHANGE:
        return XlogFpwChange(full_page_writes=cur.raw(1, "fullPageWrites") != b"\0")
    if op == XLOG_END_OF_RECOVERY:
        return XlogEndOfRecovery(*cur.unpack(_END_OF_RECOVERY, "xl_end_of_recovery"))
    if op == XLOG_OVERWRITE_CONTRECORD:
        return XlogOverwriteContrecord(
            *cur.unpack(_OVERWRITE_CONTRECORD, "xl_overwrite_contrecord"))
    raise cur.error(f"unknown XLOG info code {info:#04x}")

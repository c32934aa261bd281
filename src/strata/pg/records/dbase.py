"""Decode Database resource manager records (rmid 4): database create and drop.

Layouts from PostgreSQL 15 `commands/dbcommands_xlog.h`:
`xl_dbase_create_file_copy_rec` {Oid db_id, tablespace_id, src_db_id, src_tablespace_id},
`xl_dbase_create_wal_log_rec` {Oid db_id, tablespace_id},
`xl_dbase_drop_rec` {Oid db_id; int ntablespaces; Oid tablespace_ids[]}.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor

XLOG_DBASE_CREATE_FILE_COPY = 0x00
XLOG_DBASE_CREATE_WAL_LOG = 0x10
XLOG_DBASE_DROP = 0x20

DBASE_NAMES = {XLOG_DBASE_CREATE_FILE_COPY: "CREATE_FILE_COPY",
               XLOG_DBASE_CREATE_WAL_LOG: "CREATE_WAL_LOG", XLOG_DBASE_DROP: "DROP"}

_FILE_COPY = struct.Struct("<IIII")
_WAL_LOG = struct.Struct("<II")


@dataclass(slots=True)
class DbaseCreateFileCopy:
    """Copy the whole directory of `src_db_id` in `src_tablespace_id` to the new DB."""

    db_id: int
    tablespace_id: int
    src_db_id: int
    src_tablespace_id: int


@dataclass(slots=True)
class DbaseCreateWalLog:
    """Create the directory of `db_id` in `tablespace_id`; its pages follow in WAL."""

    db_id: int
    tablespace_id: int


@dataclass(slots=True)
class DbaseDrop:
    """Remove the directories of `db_id` in each of `tablespace_ids`."""

    db_id: int
    tablespace_ids: tuple[int, ...]


def decode(cur: Cursor, info: int) -> DbaseCreateFileCopy | DbaseCreateWalLog | DbaseDrop:
    op = info & 0xF0
    if op == XLOG_DBASE_CREATE_FILE_COPY:
        return DbaseCreateFileCopy(*cur.unpack(_FILE_COPY, "xl_dbase_create_file_copy_rec"))
    if op == XLOG_DBASE_CREATE_WAL_LOG:
        return DbaseCreateWalLog(*cur.unpack(_WAL_LOG, "xl_dbase_create_wal_log_rec"))
    if op == XLOG_DBASE_DROP:
        db_id = cur.u32("db_id")
        n = cur.count("ntablespaces", 4)
        return DbaseDrop(db_id=db_id, tablespace_ids=cur.array("I", n, "tablespace_ids"))
    raise cur.error(f"unknown Database info code {info:#04x}")

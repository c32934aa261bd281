"""Decode RelMap resource manager records (rmid 7): a new relation map file.

Layout from PostgreSQL 15 `utils/relmapper.h`: `xl_relmap_update` {Oid dbid;
Oid tsid; int32 nbytes; char data[nbytes]}. `data` is the whole
`pg_filenode.map` (a 512-byte `RelMapFile`, relmapper.c); dbid 0 is the shared
map in `global/`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor

XLOG_RELMAP_UPDATE = 0x00
RELMAP_NAMES = {XLOG_RELMAP_UPDATE: "UPDATE"}
RELMAPPER_FILESIZE = 512

_HEADER = struct.Struct("<IIi")


@dataclass(slots=True)
class RelmapUpdate:
    """Write `data` as the pg_filenode.map of database `dbid` in tablespace `tsid`."""

    dbid: int
    tsid: int
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def decode(cur: Cursor, info: int) -> RelmapUpdate:
    if info & 0xF0 != XLOG_RELMAP_UPDATE:
        raise cur.error(f"unknown RelMap info code {info:#04x}")
    dbid, tsid, nbytes = cur.unpack(_HEADER, "xl_relmap_update")
    if nbytes != RELMAPPER_FILESIZE:
        raise cur.error(f"relmap nbytes is {nbytes}, expected {RELMAPPER_FILESIZE}")
    return RelmapUpdate(dbid=dbid, tsid=tsid, data=cur.raw(nbytes, "relmap data"))

"""Decode Storage resource manager records (rmid 2): fork creation and truncation.

Layouts from PostgreSQL 15 `catalog/storage_xlog.h`:
`xl_smgr_create` {RelFileNode rnode; ForkNumber forkNum} (16 bytes) and
`xl_smgr_truncate` {BlockNumber blkno; RelFileNode rnode; int flags} (20 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor, RelFileNode

XLOG_SMGR_CREATE = 0x10
XLOG_SMGR_TRUNCATE = 0x20

SMGR_TRUNCATE_HEAP = 0x0001
SMGR_TRUNCATE_VM = 0x0002
SMGR_TRUNCATE_FSM = 0x0004
SMGR_TRUNCATE_ALL = SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM | SMGR_TRUNCATE_FSM

SMGR_NAMES = {XLOG_SMGR_CREATE: "CREATE", XLOG_SMGR_TRUNCATE: "TRUNCATE"}

_CREATE = struct.Struct("<IIIi")
_TRUNCATE = struct.Struct("<IIIIi")


@dataclass(slots=True)
class SmgrCreate:
    """Create an empty fork `forknum` of `rel`."""

    rel: RelFileNode
    forknum: int


@dataclass(slots=True)
class SmgrTruncate:
    """Truncate the forks named by `flags` of `rel`; the main fork to `blkno` blocks.

    The VM and FSM are cut to cover `blkno` heap blocks (smgr_redo in storage.c).
    """

    rel: RelFileNode
    blkno: int
    flags: int

    @property
    def truncates_heap(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_HEAP)

    @property
    def truncates_vm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_VM)

    @property
    def truncates_fsm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_FSM)


def decode(cur: Cursor, info: int) -> SmgrCreate | SmgrTruncate:
    op = info & 0xF0
    if op == XLOG_SMGR_CREATE:
        spc, db, rel, forknum = cur.unpack(_CREATE, "xl_smgr_create")
        if not 0 <= forknum <= 3:
            raise cur.error(f"fork number {forknum} is not one of 0..3")
        return SmgrCreate(rel=(spc, db, rel), forknum=forknum)
    if op == XLOG_SMGR_TRUNCATE:
        blkno, spc, db, rel, flags = cur.unpack(_TRUNCATE, "xl_smgr_truncate")
        if flags & ~SMGR_TRUNCATE_ALL:
            raise cur.error(f"truncate flags {flags:#x} has unknown bits")
        return SmgrTruncate(rel=(spc, db, rel), blkno=blkno, flags=flags)
    raise cur.error(f"unknown Storage info code {info:#04x}")

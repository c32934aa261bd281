"""Decode MultiXact resource manager records (rmid 6): multixact creation, SLRU pages.

Layouts from PostgreSQL 15 `access/multixact.h`: ZERO_OFF_PAGE / ZERO_MEM_PAGE
carry an `int pageno`; `xl_multixact_create` is {MultiXactId mid;
MultiXactOffset moff; int32 nmembers; MultiXactMember members[]} with a member
{TransactionId xid; MultiXactStatus status (a C enum, 4 bytes)};
`xl_multixact_truncate` is {Oid oldestMultiDB; MultiXactId startTruncOff,
endTruncOff; MultiXactOffset startTruncMemb, endTruncMemb}.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor

XLOG_MULTIXACT_ZERO_OFF_PAGE = 0x00
XLOG_MULTIXACT_ZERO_MEM_PAGE = 0x10
XLOG_MULTIXACT_CREATE_ID = 0x20
XLOG_MULTIXACT_TRUNCATE_ID = 0x30
MULTIXACT_NAMES = {XLOG_MULTIXACT_ZERO_OFF_PAGE: "ZERO_OFF_PAGE",
                   XLOG_MULTIXACT_ZERO_MEM_PAGE: "ZERO_MEM_PAGE",
                   XLOG_MULTIXACT_CREATE_ID: "CREATE_ID",
                   XLOG_MULTIXACT_TRUNCATE_ID: "TRUNCATE_ID"}

# MultiXactStatus (multixact.h)
MULTIXACT_STATUS_FOR_KEY_SHARE = 0
MULTIXACT_STATUS_FOR_SHARE = 1
MULTIXACT_STATUS_FOR_NO_KEY_UPDATE = 2
MULTIXACT_STATUS_FOR_UPDATE = 3
MULTIXACT_STATUS_NO_KEY_UPDATE = 4
MULTIXACT_STATUS_UPDATE = 5
# pg_waldump's words for them (mxstatus_to_string in mxactdesc.c)
MULTIXACT_STATUS_NAMES = {0: "keysh", 1: "sh", 2: "fornokeyupd", 3: "forupd",
                          4: "nokeyupd", 5: "upd"}

_CREATE = struct.Struct("<IIi")
_TRUNCATE = struct.Struct("<IIIII")
SIZE_OF_MEMBER = 8


@dataclass(slots=True)
class MultiXactZeroOffPage:
    """Initialize pg_multixact/offsets page `pageno` to zeros."""

    pageno: int


@dataclass(slots=True)
class MultiXactZeroMemPage:
    """Initialize pg_multixact/members page `pageno` to zeros."""

    pageno: int


@dataclass(slots=True)
class MultiXactCreate:
    """Multixact `mid` has `members` ((xid, status) pairs) starting at member offset
    `moff`; nextMulti becomes at least mid + 1 and nextOffset moff + len(members)."""

    mid: int
    moff: int
    members: tuple[tuple[int, int], ...]

    @property
    def nmembers(self) -> int:
        return len(self.members)


@dataclass(slots=True)
class MultiXactTruncate:
    """Remove offsets for [start_trunc_off, end_trunc_off) and members for
    [start_trunc_memb, end_trunc_memb); `oldest_multi_db` holds the oldest multi."""

    oldest_multi_db: int
    start_trunc_off: int
    end_trunc_off: int
    start_trunc_memb: int
    end_trunc_memb: int


def decode(cur: Cursor, info: int) -> (
        MultiXactZeroOffPage | MultiXactZeroMemPage | MultiXactCreate | MultiXactTruncate):
    op = info & 0xF0
    if op == XLOG_MULTIXACT_ZERO_OFF_PAGE:
        return MultiXactZeroOffPage(pageno=_pageno(cur))
    if op == XLOG_MULTIXACT_ZERO_MEM_PAGE:
        return MultiXactZeroMemPage(pageno=_pageno(cur))
    if op == XLOG_MULTIXACT_CREATE_ID:
        return _create(cur)
    if op == XLOG_MULTIXACT_TRUNCATE_ID:
        return MultiXactTruncate(*cur.unpack(_TRUNCATE, "xl_multixact_truncate"))
    raise cur.error(f"unknown MultiXact info code {info:#04x}")


def _pageno(cur: Cursor) -> int:
    pageno = cur.i32("pageno")
    if pageno < 0:
        raise cur.error(f"page number {pageno} is negative")
    return pageno


def _create(cur: Cursor) -> MultiXactCreate:
    mid, moff, nmembers = cur.unpack(_CREATE, "xl_multixact_create")
    if nmembers < 0:
        raise cur.error(f"nmembers is {nmembers}")
    flat = cur.array("I", 2 * nmembers, "members")
    members = tuple((flat[i], flat[i + 1]) for i in range(0, 2 * nmembers, 2))
    for xid, status in members:
        if status not in MULTIXACT_STATUS_NAMES:
            raise cur.error(f"member {xid} has unknown status {status}")
    return MultiXactCreate(mid=mid, moff=moff, members=members)

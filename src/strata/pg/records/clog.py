"""Decode CLOG resource manager records (rmid 3): pg_xact page zeroing and truncation.

From PostgreSQL 15 `access/transam/clog.c`: ZEROPAGE's data is an `int pageno`;
`xl_clog_truncate` is {int pageno; TransactionId oldestXact; Oid oldestXactDb}.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor

CLOG_ZEROPAGE = 0x00
CLOG_TRUNCATE = 0x10
CLOG_NAMES = {CLOG_ZEROPAGE: "ZEROPAGE", CLOG_TRUNCATE: "TRUNCATE"}

_TRUNCATE = struct.Struct("<iII")


@dataclass(slots=True)
class ClogZeroPage:
    """Initialize pg_xact page `pageno` to zeros."""

    pageno: int


@dataclass(slots=True)
class ClogTruncate:
    """Remove pg_xact segments before the one holding page `pageno`."""

    pageno: int
    oldest_xact: int
    oldest_xact_db: int


def decode(cur: Cursor, info: int) -> ClogZeroPage | ClogTruncate:
    op = info & 0xF0
    if op == CLOG_ZEROPAGE:
        return ClogZeroPage(pageno=_pageno(cur, cur.i32("pageno")))
    if op == CLOG_TRUNCATE:
        pageno, oldest_xact, oldest_xact_db = cur.unpack(_TRUNCATE, "xl_clog_truncate")
        return ClogTruncate(pageno=_pageno(cur, pageno), oldest_xact=oldest_xact,
                            oldest_xact_db=oldest_xact_db)
    raise cur.error(f"unknown CLOG info code {info:#04x}")


def _pageno(cur: Cursor, pageno: int) -> int:
    if pageno < 0:
        raise cur.error(f"pg_xact page number {pageno} is negative")
    return pageno

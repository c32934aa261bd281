"""Decode Standby resource manager records (rmid 8): the running-transactions snapshot.

Layout from PostgreSQL 15 `storage/standbydefs.h`: `xl_running_xacts` {int xcnt;
int subxcnt; bool subxid_overflow; TransactionId nextXid, oldestRunningXid,
latestCompletedXid; TransactionId xids[xcnt + subxcnt]} (top-level xids first,
then subxids). LOCK and INVALIDATIONS only serve hot standby; the dispatcher
returns None for them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor

XLOG_STANDBY_LOCK = 0x00
XLOG_RUNNING_XACTS = 0x10
XLOG_INVALIDATIONS = 0x20
STANDBY_NAMES = {XLOG_STANDBY_LOCK: "LOCK", XLOG_RUNNING_XACTS: "RUNNING_XACTS",
                 XLOG_INVALIDATIONS: "INVALIDATIONS"}

_RUNNING_XACTS = struct.Struct("<ii?3xIII")
assert _RUNNING_XACTS.size == 24, _RUNNING_XACTS.size


@dataclass(slots=True)
class RunningXacts:
    """Transactions running at the time of the record (`xids` top-level, `subxids`)."""

    xcnt: int
    subxcnt: int
    subxid_overflow: bool
    next_xid: int
    oldest_running_xid: int
    latest_completed_xid: int
    xids: tuple[int, ...]
    subxids: tuple[int, ...]


def decode(cur: Cursor, info: int) -> RunningXacts | None:
    op = info & 0xF0
    if op == XLOG_RUNNING_XACTS:
        xcnt, subxcnt, overflow, next_xid, oldest, latest = cur.unpack(
            _RUNNING_XACTS, "xl_running_xacts")
        if xcnt < 0 or subxcnt < 0:
            raise cur.error(f"xcnt {xcnt} / subxcnt {subxcnt} is negative")
        xids = cur.array("I", xcnt + subxcnt, "xids")
        return RunningXacts(xcnt=xcnt, subxcnt=subxcnt, subxid_overflow=bool(overflow),
                            next_xid=next_xid, oldest_running_xid=oldest,
                            latest_completed_xid=latest, xids=xids[:xcnt],
                            subxids=xids[xcnt:])
    if op in (XLOG_STANDBY_LOCK, XLOG_INVALIDATIONS):
        return None
    raise cur.error(f"unknown Standby info code {info:#04x}")

"""PostgreSQL 15's transaction-id rules: wrapping order, nextXid epochs, SLRU truncation,
and how the checkpoint counters move.

Xids, multixact ids and member offsets are 32-bit counters that wrap; PostgreSQL
compares them modulo 2^32 (transam.c, multixact.c) and counts wraparounds of nextXid in
an epoch (varsup.c). Truncation of pg_xact and pg_multixact removes whole segments
chosen by the same wrapping order (slru.c, clog.c, multixact.c). Plain ints in and out,
no I/O: WAL ingest applies these to what it stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from strata.pg import slru
from strata.pg.checkpoint import CheckPoint

# transam.h
FIRST_NORMAL_TRANSACTION_ID = 3
# multixact.h / multixact.c
FIRST_MULTIXACT_ID = 1
MAX_MULTIXACT_OFFSET = 0xFFFFFFFF

U32_MASK = 0xFFFFFFFF


def xid_precedes(a: int, b: int) -> bool:
    """TransactionIdPrecedes for two normal xids (modulo-2^32 comparison, transam.c)."""
    return ((a - b) & U32_MASK) >= 0x8000_0000


def u32_follows(a: int, b: int) -> bool:
    """a is after b in modulo-2^32 order (MultiXactIdPrecedes(b, a) and alike)."""
    return a != b and not xid_precedes(a, b)


def later_u32(current: int, candidate: int) -> int:
    """The later of two wrapping 32-bit counters (nextOid, nextMulti, nextMultiOffset)."""
    return candidate if u32_follows(candidate, current) else current


def next_multixact_id(mid: int) -> int:
    """The multixact id after `mid`: wraps past 2^32 - 1 to FirstMultiXactId, skipping
    InvalidMultiXactId 0 (GetNewMultiXactId, multixact.c)."""
    return (mid + 1) & U32_MASK or FIRST_MULTIXACT_ID


def add_member_offset(offset: int, count: int) -> int:
    """The member offset `count` entries after `offset` (MultiXactOffset wraps at 2^32)."""
    return (offset + count) & U32_MASK


def merge_checkpoint(current: CheckPoint, seen: CheckPoint) -> CheckPoint:
    """Counters after a checkpoint record: maxima for the next* counters, its horizons.

    nextXid is compared as the full 64-bit value; the 32-bit counters in wrapping order.
    oldestXid and oldestMulti (with their databases) are the record's unless a CLOG or
    MultiXact truncation already moved them further: an online checkpoint computes them
    at its start, and a truncation during the checkpoint must not be undone. The other
    fields (oldestActiveXid, commit-ts xids, time, redo) are the record's.
    """
    oldest_xid, oldest_xid_db = seen.oldest_xid, seen.oldest_xid_db
    if u32_follows(current.oldest_xid, seen.oldest_xid):
        oldest_xid, oldest_xid_db = current.oldest_xid, current.oldest_xid_db
    oldest_multi, oldest_multi_db = seen.oldest_multi, seen.oldest_multi_db
    if u32_follows(current.oldest_multi, seen.oldest_multi):
        oldest_multi, oldest_multi_db = current.oldest_multi, current.oldest_multi_db
    return dataclasses.replace(
        seen,
        next_xid=max(current.next_xid, seen.next_xid),
        next_oid=later_u32(current.next_oid, seen.next_oid),
        next_multi=later_u32(current.next_multi, seen.next_multi),
        next_multi_offset=later_u32(current.next_multi_offset, seen.next_multi_offset),
        oldest_xid=oldest_xid, oldest_xid_db=oldest_xid_db,
        oldest_multi=oldest_multi, oldest_multi_db=oldest_multi_db,
    )


def advance_next_xid(next_full_xid: int, xid: int) -> int:
    """nextXid after seeing 32-bit `xid` used: AdvanceNextFullTransactionIdPastXid (varsup.c).

    Special xids (< 3) never move it; an xid that does not follow-or-equal the current
    32-bit nextXid is old; otherwise the next xid after it (skipping the special ones on
    wraparound), in the epoch of nextXid or the next one when the 32-bit value wrapped.
    """
    if xid < FIRST_NORMAL_TRANSACTION_ID:
        return next_full_xid
    next_xid = next_full_xid & U32_MASK
    if xid != next_xid and xid_precedes(xid, next_xid):
        return next_full_xid
    following = (xid + 1) & U32_MASK
    if following < FIRST_NORMAL_TRANSACTION_ID:
        following = FIRST_NORMAL_TRANSACTION_ID
    epoch = next_full_xid >> 32
    if following < next_xid:
        epoch += 1
    return (epoch << 32) | following


def clog_page_precedes(page1: int, page2: int) -> bool:
    """CLOGPagePrecedes (clog.c): compare pages through xids on them, modulo 2^32."""
    xid1 = (page1 * slru.CLOG_XACTS_PER_PAGE + FIRST_NORMAL_TRANSACTION_ID + 1) & U32_MASK
    xid2 = (page2 * slru.CLOG_XACTS_PER_PAGE + FIRST_NORMAL_TRANSACTION_ID + 1) & U32_MASK
    return (xid_precedes(xid1, xid2)
            and xid_precedes(xid1, (xid2 + slru.CLOG_XACTS_PER_PAGE - 1) & U32_MASK))


def clog_segments_to_remove(cutoff_page: int, segnos: Iterable[int]) -> list[int]:
    """SimpleLruTruncate for pg_xact (slru.c): segments wholly before the cutoff's segment."""
    cutoff = cutoff_page - cutoff_page % slru.SLRU_PAGES_PER_SEGMENT
    doomed = []
    for segno in segnos:
        first = segno * slru.SLRU_PAGES_PER_SEGMENT
        last = first + slru.SLRU_PAGES_PER_SEGMENT - 1
        if clog_page_precedes(first, cutoff) and clog_page_precedes(last, cutoff):
            doomed.append(segno)
    return doomed


def multixact_segments_to_remove(kind: slru.SlruKind, start: int, end: int,
                                 segnos: Iterable[int]) -> list[int]:
    """Segments of pg_multixact/offsets (entries are multis) or /members (entries are
    member offsets) removed by a TRUNCATE_ID for entries [start, end).

    PerformMembersTruncation removes member segments from the one holding `start` up to,
    not including, the one holding `end`, wrapping around; offsets truncation keeps the
    segment holding the last multi before `end` (SimpleLruTruncate at
    PreviousMultiXactId(end)). Both reduce to: segments in [seg(start), seg(keep)) in
    wrapping order, among those that exist.
    """
    if kind == slru.SlruKind.MULTIXACT_MEMBERS:
        per_page = slru.MULTIXACT_MEMBERS_PER_PAGE
        keep = end
        nsegs = MAX_MULTIXACT_OFFSET // per_page // slru.SLRU_PAGES_PER_SEGMENT + 1
    else:
        assert kind == slru.SlruKind.MULTIXACT_OFFSETS, kind
        per_page = slru.MULTIXACT_OFFSETS_PER_PAGE
        keep = (end - 1) & U32_MASK or U32_MASK  # PreviousMultiXactId skips 0
        nsegs = U32_MASK // per_page // slru.SLRU_PAGES_PER_SEGMENT + 1
    first = start // per_page // slru.SLRU_PAGES_PER_SEGMENT
    stop = keep // per_page // slru.SLRU_PAGES_PER_SEGMENT
    span = (stop - first) % nsegs
    doomed = {(first + i) % nsegs for i in range(span)} if span < nsegs else set()
    return sorted(s for s in segnos if s in doomed)

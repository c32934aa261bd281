"""Decode Transaction resource manager records (rmid 1): commit, abort, prepare, ...

Layouts from PostgreSQL 15 `access/xact.h` and the parse order of
`ParseCommitRecord` / `ParseAbortRecord` (xactdesc.c); the prepare record's main
data is the two-phase state file without its CRC (`EndPrepare` in twophase.c,
header `xl_xact_prepare` = `TwoPhaseFileHeader`).

Commit and abort records (`xl_xact_commit` / `xl_xact_abort`) are a timestamp,
then, if `XLOG_XACT_HAS_INFO` is set in xl_info, a uint32 `xinfo` whose bits say
which of these optional parts follow, in this order:
dbinfo (dbId, tsId), subxacts (int n, xid[n]), relfilenodes (int n,
RelFileNode[n]), dropped stats (int n, {int kind, Oid dboid, Oid objoid}[n]),
invalidations (commit only: int n, 16-byte messages[n]), twophase (xid, then the
GID as a C string if `HAS_GID`), origin (lsn, timestamp; unaligned).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.crc import crc32c
from strata.pg.records._cursor import Cursor, RelFileNode

# xl_info bits (xact.h)
XLOG_XACT_COMMIT = 0x00
XLOG_XACT_PREPARE = 0x10
XLOG_XACT_ABORT = 0x20
XLOG_XACT_COMMIT_PREPARED = 0x30
XLOG_XACT_ABORT_PREPARED = 0x40
XLOG_XACT_ASSIGNMENT = 0x50
XLOG_XACT_INVALIDATIONS = 0x60
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_HAS_INFO = 0x80

XACT_NAMES = {
    XLOG_XACT_COMMIT: "COMMIT", XLOG_XACT_PREPARE: "PREPARE", XLOG_XACT_ABORT: "ABORT",
    XLOG_XACT_COMMIT_PREPARED: "COMMIT_PREPARED", XLOG_XACT_ABORT_PREPARED: "ABORT_PREPARED",
    XLOG_XACT_ASSIGNMENT: "ASSIGNMENT", XLOG_XACT_INVALIDATIONS: "INVALIDATIONS",
}

# xinfo bits (xact.h)
XACT_XINFO_HAS_DBINFO = 1 << 0
XACT_XINFO_HAS_SUBXACTS = 1 << 1
XACT_XINFO_HAS_RELFILENODES = 1 << 2
XACT_XINFO_HAS_INVALS = 1 << 3
XACT_XINFO_HAS_TWOPHASE = 1 << 4
XACT_XINFO_HAS_ORIGIN = 1 << 5
XACT_XINFO_HAS_AE_LOCKS = 1 << 6
XACT_XINFO_HAS_GID = 1 << 7
XACT_XINFO_HAS_DROPPED_STATS = 1 << 8

SIZE_OF_INVAL_MESSAGE = 16  # sizeof(SharedInvalidationMessage), sinval.h
SIZE_OF_STATS_ITEM = 12  # xl_xact_stats_item: int kind, Oid dboid, Oid objoid (PG15)
SIZE_OF_REL_FILE_NODE = 12

# twophase.c: TWOPHASE_MAGIC of PostgreSQL 15 and sizeof(TwoPhaseFileHeader).
TWOPHASE_MAGIC = 0x57F94534
# magic, total_len, xid, database, prepared_at, owner, nsubxacts, ncommitrels,
# nabortrels, ncommitstats, nabortstats, ninvalmsgs, initfileinval (bool @52),
# gidlen (uint16 @54), origin_lsn @56, origin_timestamp @64: 72 bytes.
_PREPARE_HEADER = struct.Struct("<IIIIqIiiiiii?xHQq")
assert _PREPARE_HEADER.size == 72, _PREPARE_HEADER.size
_ORIGIN = struct.Struct("<Qq")
_ASSIGNMENT = struct.Struct("<Ii")
_DBINFO = struct.Struct("<II")  # xl_xact_dbinfo: dbId, tsId
MAXALIGN = 8


@dataclass(slots=True)
class XactOrigin:
    """Replication origin of a transaction (xl_xact_origin)."""

    lsn: int
    timestamp: int


@dataclass(slots=True)
class XactCommit:
    """COMMIT or COMMIT_PREPARED: mark `xid` and `subxacts` committed in pg_xact.

    `xid` is the top-level transaction: the record's xl_xid, or for COMMIT_PREPARED
    the prepared transaction's xid from the twophase part. `dropped_rels` are
    relations (all forks) to unlink. `commit_time` is a TimestampTz (microseconds
    since 2000-01-01 00:00 UTC).
    """

    xid: int
    is_prepared: bool
    commit_time: int
    xinfo: int
    db_id: int | None
    ts_id: int | None
    subxacts: tuple[int, ...]
    dropped_rels: tuple[RelFileNode, ...]
    dropped_stats: tuple[tuple[int, int, int], ...]
    invals: bytes
    gid: str | None
    origin: XactOrigin | None


@dataclass(slots=True)
class XactAbort:
    """ABORT or ABORT_PREPARED: mark `xid` and `subxacts` aborted in pg_xact.

    Fields as in `XactCommit`; `abort_time` is a TimestampTz. `dropped_rels` are
    the relations the aborted transaction had created.
    """

    xid: int
    is_prepared: bool
    abort_time: int
    xinfo: int
    db_id: int | None
    ts_id: int | None
    subxacts: tuple[int, ...]
    dropped_rels: tuple[RelFileNode, ...]
    dropped_stats: tuple[tuple[int, int, int], ...]
    gid: str | None
    origin: XactOrigin | None


@dataclass(slots=True)
class XactPrepare:
    """PREPARE: the two-phase state of `xid`; `state_data` IS the pg_twophase file
    content, less the CRC-32C that `state_file()` appends."""

    xid: int
    database: int
    prepared_at: int
    owner: int
    subxacts: tuple[int, ...]
    commit_rels: tuple[RelFileNode, ...]
    abort_rels: tuple[RelFileNode, ...]
    ncommitstats: int
    nabortstats: int
    ninvalmsgs: int
    initfileinval: bool
    gid: str
    origin: XactOrigin | None
    state_data: bytes

    def state_file(self) -> bytes:
        """The bytes of `pg_twophase/%08X` (RecreateTwoPhaseFile: data + CRC-32C)."""
        return self.state_data + crc32c(self.state_data).to_bytes(4, "little")


@dataclass(slots=True)
class XactAssignment:
    """ASSIGNMENT: `subxacts` belong to top-level `xtop` (for hot standby)."""

    xtop: int
    subxacts: tuple[int, ...]


@dataclass(slots=True)
class XactInvalidations:
    """INVALIDATIONS: catalog cache invalidation messages (16 bytes each)."""

    nmsgs: int
    msgs: bytes


def _gid(cur: Cursor, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # A GID is client text in the server encoding; Strata clusters are UTF8.
        raise cur.error(f"GID {raw!r} is not UTF-8") from err


@dataclass(slots=True)
class _Parsed:
    """The optional parts of a commit/abort record (ParseCommitRecord)."""

    xinfo: int = 0
    db_id: int | None = None
    ts_id: int | None = None
    subxacts: tuple[int, ...] = ()
    rels: tuple[RelFileNode, ...] = ()
    stats: tuple[tuple[int, int, int], ...] = ()
    invals: bytes = b""
    twophase_xid: int | None = None
    gid: str | None = None
    origin: XactOrigin | None = None


# What a commit/abort without XLOG_XACT_HAS_INFO has (most commits): shared, never
# changed (`_parse_end` fills a new `_Parsed` otherwise).
_NO_PARTS = _Parsed()


def _parse_end(cur: Cursor, info: int, is_commit: bool) -> _Parsed:
    if not info & XLOG_XACT_HAS_INFO:
        return _NO_PARTS
    p = _Parsed()
    xinfo = p.xinfo = cur.u32("xinfo")
    if xinfo & XACT_XINFO_HAS_DBINFO:
        p.db_id, p.ts_id = cur.unpack(_DBINFO, "dbinfo")
    if xinfo & XACT_XINFO_HAS_SUBXACTS:
        n = cur.count("nsubxacts", 4)
        p.subxacts = cur.array("I", n, "subxacts")
    if xinfo & XACT_XINFO_HAS_RELFILENODES:
        n = cur.count("nrels", SIZE_OF_REL_FILE_NODE)
        p.rels = cur.rels(n, "relfilenodes")
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS:
        n = cur.count("nstats", SIZE_OF_STATS_ITEM)
        flat = cur.array("I", 3 * n, "dropped stats")
        p.stats = tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * n, 3))
    if is_commit and xinfo & XACT_XINFO_HAS_INVALS:
        n = cur.count("nmsgs", SIZE_OF_INVAL_MESSAGE)
        p.invals = cur.raw(n * SIZE_OF_INVAL_MESSAGE, "invalidation messages")
    if xinfo & XACT_XINFO_HAS_TWOPHASE:
        p.twophase_xid = cur.u32("twophase xid")
        if xinfo & XACT_XINFO_HAS_GID:
            p.gid = _gid(cur, cur.cstring("gid"))
    if xinfo & XACT_XINFO_HAS_ORIGIN:
        p.origin = XactOrigin(*cur.unpack(_ORIGIN, "origin"))
    return p



def _top_xid(cur: Cursor, p: _Parsed, xl_xid: int, prepared: bool) -> int:
    if not prepared:
        return xl_xid
    if p.twophase_xid is None:
        raise cur.error("a *_PREPARED record has no twophase xid (XACT_XINFO_HAS_TWOPHASE)")
    return p.twophase_xid


def decode_commit(cur: Cursor, info: int, xl_xid: int) -> XactCommit:
    prepared = info & XLOG_XACT_OPMASK == XLOG_XACT_COMMIT_PREPARED
    commit_time = cur.i64("xact_time")
    p = _parse_end(cur, info, is_commit=True)
    return XactCommit(
        xid=_top_xid(cur, p, xl_xid, prepared), is_prepared=prepared,
        commit_time=commit_time, xinfo=p.xinfo, db_id=p.db_id, ts_id=p.ts_id,
        subxacts=p.subxacts, dropped_rels=p.rels, dropped_stats=p.stats, invals=p.invals,
        gid=p.gid, origin=p.origin)


def decode_abort(cur: Cursor, info: int, xl_xid: int) -> XactAbort:
    prepared = info & XLOG_XACT_OPMASK == XLOG_XACT_ABORT_PREPARED
    abort_time = cur.i64("xact_time")
    p = _parse_end(cur, info, is_commit=False)
    return XactAbort(
        xid=_top_xid(cur, p, xl_xid, prepared), is_prepared=prepared,
        abort_time=abort_time, xinfo=p.xinfo, db_id=p.db_id, ts_id=p.ts_id,
        subxacts=p.subxacts, dropped_rels=p.rels, dropped_stats=p.stats,
        gid=p.gid, origin=p.origin)


def decode_prepare(cur: Cursor) -> XactPrepare:
    """The state file: header, then each part MAXALIGNed (twophase.c, StartPrepare)."""
    (magic, total_len, xid, database, prepared_at, owner, nsubxacts, ncommitrels,
     nabortrels, ncommitstats, nabortstats, ninvalmsgs, initfileinval, gidlen,
     origin_lsn, origin_timestamp) = cur.unpack(_PREPARE_HEADER, "two-phase file header")
    if magic != TWOPHASE_MAGIC:
        raise cur.error(f"two-phase magic is {magic:#x}, expected {TWOPHASE_MAGIC:#x}")
    # total_len counts the CRC that the state file has and the WAL record does not.
    if total_len != len(cur.data) + 4:
        raise cur.error(f"two-phase total_len is {total_len}, expected {len(cur.data) + 4}")
    for name, n in (("nsubxacts", nsubxacts), ("ncommitrels", ncommitrels),
                    ("nabortrels", nabortrels), ("ncommitstats", ncommitstats),
                    ("nabortstats", nabortstats), ("ninvalmsgs", ninvalmsgs)):
        if n < 0:
            raise cur.error(f"two-phase {name} is {n}")
    cur.align(MAXALIGN)
    gid_raw = cur.raw(gidlen, "gid")
    if not gid_raw.endswith(b"\0"):
        raise cur.error(f"two-phase gid of {gidlen} bytes is not NUL-terminated")
    cur.align(MAXALIGN)
    subxacts = cur.array("I", nsubxacts, "subxacts")
    cur.align(MAXALIGN)
    commit_rels = cur.rels(ncommitrels, "commit rels")
    cur.align(MAXALIGN)
    abort_rels = cur.rels(nabortrels, "abort rels")
    origin = XactOrigin(origin_lsn, origin_timestamp) if origin_lsn else None
    return XactPrepare(
        xid=xid, database=database, prepared_at=prepared_at, owner=owner,
        subxacts=subxacts, commit_rels=commit_rels, abort_rels=abort_rels,
        ncommitstats=ncommitstats, nabortstats=nabortstats, ninvalmsgs=ninvalmsgs,
        initfileinval=bool(initfileinval), gid=_gid(cur, gid_raw[:-1]), origin=origin,
        state_data=cur.data)


def decode_assignment(cur: Cursor) -> XactAssignment:
    xtop, n = cur.unpack(_ASSIGNMENT, "xl_xact_assignment")
    if n < 0:
        raise cur.error(f"nsubxacts is {n}")
    return XactAssignment(xtop=xtop, subxacts=cur.array("I", n, "xsub"))


def decode_invalidations(cur: Cursor) -> XactInvalidations:
    n = cur.count("nmsgs", SIZE_OF_INVAL_MESSAGE)
    return XactInvalidations(nmsgs=n, msgs=cur.raw(n * SIZE_OF_INVAL_MESSAGE, "msgs"))


def decode(cur: Cursor, info: int, xl_xid: int) -> (
        XactCommit | XactAbort | XactPrepare | XactAssignment | XactInvalidations):
    op = info & XLOG_XACT_OPMASK
    if op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED):
        return decode_commit(cur, info, xl_xid)
    if op in (XLOG_XACT_ABORT, XLOG_XACT_ABORT_PREPARED):
        return decode_abort(cur, info, xl_xid)
    if op == XLOG_XACT_PREPARE:
        return decode_prepare(cur)
    if op == XLOG_XACT_ASSIGNMENT:
        return decode_assignment(cur)
    if op == XLOG_XACT_INVALIDATIONS:
        return decode_invalidations(cur)
    raise cur.error(f"unknown Transaction info code {info:#04x}")

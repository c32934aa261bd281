"""Transaction record decoders on bytes laid out as PostgreSQL 15's xact.h / twophase.c structs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.pg.constants import RmgrId
from strata.pg.crc import crc32c
from strata.pg.records import (
    XactAbort,
    XactAssignment,
    XactCommit,
    XactInvalidations,
    XactOrigin,
    XactPrepare,
    decode_record,
)
from strata.pg.records import xact as x

XACT = RmgrId.TRANSACTION
TS = 817_000_000_123_456  # a TimestampTz (µs since 2000-01-01)


def commit_bytes(*, xact_time: int = TS, dbinfo: tuple[int, int] | None = None,
                 subxacts: list[int] | None = None,
                 rels: list[tuple[int, int, int]] | None = None,
                 stats: list[tuple[int, int, int]] | None = None,
                 invals: bytes | None = None, twophase_xid: int | None = None,
                 gid: str | None = None, origin: tuple[int, int] | None = None,
                 is_commit: bool = True, extra_xinfo: int = 0) -> tuple[int, bytes]:
    """(xl_info bits, main data) as XactLogCommitRecord / XactLogAbortRecord write them."""
    xinfo = extra_xinfo
    parts = [struct.pack("<q", xact_time)]
    body: list[bytes] = []
    if dbinfo is not None:
        xinfo |= x.XACT_XINFO_HAS_DBINFO
        body.append(struct.pack("<II", *dbinfo))
    if subxacts is not None:
        xinfo |= x.XACT_XINFO_HAS_SUBXACTS
        body.append(struct.pack(f"<i{len(subxacts)}I", len(subxacts), *subxacts))
    if rels is not None:
        xinfo |= x.XACT_XINFO_HAS_RELFILENODES
        body.append(struct.pack("<i", len(rels)) + b"".join(struct.pack("<III", *r) for r in rels))
    if stats is not None:
        xinfo |= x.XACT_XINFO_HAS_DROPPED_STATS
        body.append(struct.pack("<i", len(stats))
                    + b"".join(struct.pack("<iII", *s) for s in stats))
    if invals is not None and is_commit:
        xinfo |= x.XACT_XINFO_HAS_INVALS
        body.append(struct.pack("<i", len(invals) // 16) + invals)
    if twophase_xid is not None:
        xinfo |= x.XACT_XINFO_HAS_TWOPHASE
        body.append(struct.pack("<I", twophase_xid))
        if gid is not None:
            xinfo |= x.XACT_XINFO_HAS_GID
            body.append(gid.encode() + b"\0")
    if origin is not None:
        xinfo |= x.XACT_XINFO_HAS_ORIGIN
        body.append(struct.pack("<Qq", *origin))
    if not xinfo:
        return 0, parts[0]
    return x.XLOG_XACT_HAS_INFO, b"".join([parts[0], struct.pack("<I", xinfo), *body])


def test_plain_commit() -> None:
    """A commit without xinfo: only the timestamp; the xid is the record's xl_xid."""
    flags, data = commit_bytes()
    assert len(data) == 8
    d = decode_record(XACT, x.XLOG_XACT_COMMIT | flags, data, xl_xid=735)
    assert d == XactCommit(xid=735, is_prepared=False, commit_time=TS, xinfo=0, db_id=None,
                           ts_id=None, subxacts=(), dropped_rels=(), dropped_stats=(),
                           invals=b"", gid=None, origin=None)


def test_commit_with_every_part() -> None:
    inval = bytes(range(16)) * 2
    flags, data = commit_bytes(dbinfo=(5, 1663), subxacts=[736, 737],
                               rels=[(1663, 5, 16384), (1663, 5, 16390)],
                               stats=[(2, 5, 16384)], invals=inval, origin=(0x1_0000_0028, 99),
                               extra_xinfo=x.XACT_XINFO_HAS_AE_LOCKS)
    d = decode_record(XACT, x.XLOG_XACT_COMMIT | flags | 0x01, data, xl_xid=735)
    assert isinstance(d, XactCommit)
    assert (d.xid, d.db_id, d.ts_id, d.subxacts) == (735, 5, 1663, (736, 737))
    assert d.dropped_rels == ((1663, 5, 16384), (1663, 5, 16390))
    assert d.dropped_stats == ((2, 5, 16384),)
    assert d.invals == inval
    assert d.origin == XactOrigin(lsn=0x1_0000_0028, timestamp=99)
    assert not d.is_prepared and d.gid is None


def test_commit_prepared_reports_the_prepared_xid() -> None:
    """COMMIT_PREPARED is written by another backend: the top xid is the twophase xid."""
    flags, data = commit_bytes(dbinfo=(5, 1663), subxacts=[901], twophase_xid=900,
                               gid="p1", origin=(0, 0))
    d = decode_record(XACT, x.XLOG_XACT_COMMIT_PREPARED | flags, data, xl_xid=0)
    assert isinstance(d, XactCommit)
    assert (d.xid, d.is_prepared, d.gid, d.subxacts) == (900, True, "p1", (901,))


def test_abort_has_no_invalidations_part() -> None:
    """xl_xact_abort has no invals even if a bit says so: the twophase xid follows the rels."""
    flags, data = commit_bytes(rels=[(1663, 5, 16400)], twophase_xid=910, is_commit=False)
    d = decode_record(XACT, x.XLOG_XACT_ABORT_PREPARED | flags, data, xl_xid=0)
    assert isinstance(d, XactAbort)
    assert (d.xid, d.is_prepared, d.abort_time) == (910, True, TS)
    assert d.dropped_rels == ((1663, 5, 16400),)
    plain = decode_record(XACT, x.XLOG_XACT_ABORT, struct.pack("<q", -5), xl_xid=42)
    assert isinstance(plain, XactAbort)
    assert (plain.xid, plain.abort_time, plain.is_prepared) == (42, -5, False)


def test_prepared_record_without_twophase_part_is_corrupt() -> None:
    flags, data = commit_bytes(subxacts=[1])
    with pytest.raises(CorruptionError, match="COMMIT_PREPARED.*no twophase xid"):
        decode_record(XACT, x.XLOG_XACT_COMMIT_PREPARED | flags, data, xl_xid=1)


rel = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
xid = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(subxacts=st.none() | st.lists(xid, max_size=5), rels=st.none() | st.lists(rel, max_size=4),
       stats=st.none() | st.lists(st.tuples(st.integers(0, 9), xid, xid), max_size=3),
       invals=st.none() | st.binary(min_size=0, max_size=3).map(lambda b: b * 16),
       twophase=st.none() | st.tuples(xid, st.none() | st.text("abcxyz_-09", max_size=20)),
       origin=st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(-2**63, 2**63 - 1)),
       dbinfo=st.none() | st.tuples(xid, xid), is_commit=st.booleans())
def test_commit_abort_round_trip(
        subxacts: list[int] | None, rels: list[tuple[int, int, int]] | None,
        stats: list[tuple[int, int, int]] | None, invals: bytes | None,
        twophase: tuple[int, str | None] | None, origin: tuple[int, int] | None,
        dbinfo: tuple[int, int] | None, is_commit: bool) -> None:
    """Every combination of optional parts decodes to what was encoded."""
    flags, data = commit_bytes(
        dbinfo=dbinfo, subxacts=subxacts, rels=rels, stats=stats, invals=invals,
        twophase_xid=None if twophase is None else twophase[0],
        gid=None if twophase is None else twophase[1], origin=origin, is_commit=is_commit)
    if twophase is not None:
        op = x.XLOG_XACT_COMMIT_PREPARED if is_commit else x.XLOG_XACT_ABORT_PREPARED
    else:
        op = x.XLOG_XACT_COMMIT if is_commit else x.XLOG_XACT_ABORT
    d = decode_record(XACT, op | flags, data, xl_xid=77)
    assert isinstance(d, XactCommit if is_commit else XactAbort)
    assert d.xid == (77 if twophase is None else twophase[0])
    assert d.is_prepared == (twophase is not None)
    assert d.subxacts == tuple(subxacts or ())
    assert d.dropped_rels == tuple(rels or ())
    assert d.dropped_stats == tuple(stats or ())
    assert (d.db_id, d.ts_id) == (dbinfo or (None, None))
    assert d.gid == (None if twophase is None else twophase[1])
    assert d.origin == (None if origin is None else XactOrigin(*origin))
    if isinstance(d, XactCommit):
        assert d.invals == (invals or b"")
        assert d.commit_time == TS
    # Every part is needed, so any shorter main data is corrupt (and never an IndexError).
    for cut in range(len(data)):
        with pytest.raises(CorruptionError):
            decode_record(XACT, op | flags, data[:cut], xl_xid=77)


Rels = tuple[tuple[int, int, int], ...]


def prepare_bytes(*, xid: int = 900, database: int = 5, prepared_at: int = TS, owner: int = 10,
                  subxacts: tuple[int, ...] = (), commit_rels: Rels = (),
                  abort_rels: Rels = (), ninvalmsgs: int = 0,
                  gid: str = "p1", origin: tuple[int, int] = (0, 0),
                  magic: int = x.TWOPHASE_MAGIC) -> bytes:
    """The state data as StartPrepare/EndPrepare build it (each part MAXALIGNed)."""
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 8)

    gid_raw = gid.encode() + b"\0"
    body = [pad(gid_raw), pad(struct.pack(f"<{len(subxacts)}I", *subxacts)),
            pad(b"".join(struct.pack("<III", *r) for r in commit_rels)),
            pad(b"".join(struct.pack("<III", *r) for r in abort_rels)),
            pad(bytes(16 * ninvalmsgs)),
            # TwoPhaseRecordOnDisk end sentinel: len 0, rmid TWOPHASE_RM_END_ID (0), info 0
            pad(struct.pack("<IHH", 0, 0, 0))]
    total = 72 + sum(len(b) for b in body) + 4
    header = struct.pack("<IIIIqIiiiiii?xHQq", magic, total, xid, database, prepared_at, owner,
                         len(subxacts), len(commit_rels), len(abort_rels), 0, 0, ninvalmsgs,
                         False, len(gid_raw), *origin)
    return header + b"".join(body)


def test_prepare_header_and_parts() -> None:
    data = prepare_bytes(subxacts=(901, 902, 903), commit_rels=((1663, 5, 1),),
                         abort_rels=((1663, 5, 2), (1663, 5, 3)), ninvalmsgs=2, gid="gid-x")
    d = decode_record(XACT, x.XLOG_XACT_PREPARE, data, xl_xid=900)
    assert isinstance(d, XactPrepare)
    assert (d.xid, d.database, d.prepared_at, d.owner, d.gid) == (900, 5, TS, 10, "gid-x")
    assert d.subxacts == (901, 902, 903)
    assert d.commit_rels == ((1663, 5, 1),)
    assert d.abort_rels == ((1663, 5, 2), (1663, 5, 3))
    assert (d.ninvalmsgs, d.origin, d.initfileinval) == (2, None, False)
    assert d.state_data == data
    # The pg_twophase file is the state data followed by its CRC-32C.
    assert d.state_file() == data + struct.pack("<I", crc32c(data))


def test_prepare_checks_magic_and_length() -> None:
    with pytest.raises(CorruptionError, match="two-phase magic"):
        decode_record(XACT, x.XLOG_XACT_PREPARE, prepare_bytes(magic=0x57F94533), xl_xid=1)
    data = prepare_bytes()
    with pytest.raises(CorruptionError, match="total_len"):
        decode_record(XACT, x.XLOG_XACT_PREPARE, data + bytes(8), xl_xid=1)
    for cut in (0, 10, 71, 75):
        with pytest.raises(CorruptionError):
            decode_record(XACT, x.XLOG_XACT_PREPARE, data[:cut], xl_xid=1)


def test_assignment_and_invalidations() -> None:
    d = decode_record(XACT, x.XLOG_XACT_ASSIGNMENT, struct.pack("<Ii3I", 500, 3, 501, 502, 503))
    assert d == XactAssignment(xtop=500, subxacts=(501, 502, 503))
    msgs = bytes(range(32))
    d2 = decode_record(XACT, x.XLOG_XACT_INVALIDATIONS, struct.pack("<i", 2) + msgs)
    assert d2 == XactInvalidations(nmsgs=2, msgs=msgs)
    with pytest.raises(CorruptionError, match="nsubxacts is -1"):
        decode_record(XACT, x.XLOG_XACT_ASSIGNMENT, struct.pack("<Ii", 500, -1))
    with pytest.raises(CorruptionError, match="3 entries of xsub|xsub needs"):
        decode_record(XACT, x.XLOG_XACT_ASSIGNMENT, struct.pack("<Ii2I", 500, 3, 1, 2))


def test_unknown_info_and_bad_counts_name_the_record() -> None:
    with pytest.raises(CorruptionError, match=r"Transaction UNKNOWN 0x70 record at 0/16B3740"):
        decode_record(XACT, 0x70, b"", lsn=0x16B3740)
    data = struct.pack("<qIi", TS, x.XACT_XINFO_HAS_SUBXACTS, 1_000_000)
    with pytest.raises(CorruptionError, match="Transaction COMMIT record.*nsubxacts"):
        decode_record(XACT, x.XLOG_XACT_COMMIT | x.XLOG_XACT_HAS_INFO, data)
    data = struct.pack("<qIi", TS, x.XACT_XINFO_HAS_RELFILENODES, -3)
    with pytest.raises(CorruptionError, match="nrels is -3"):
        decode_record(XACT, x.XLOG_XACT_COMMIT | x.XLOG_XACT_HAS_INFO, data)
    data = struct.pack("<qII", TS, x.XACT_XINFO_HAS_TWOPHASE | x.XACT_XINFO_HAS_GID, 5) + b"p1"
    with pytest.raises(CorruptionError, match="no terminating NUL"):
        decode_record(XACT, x.XLOG_XACT_COMMIT_PREPARED | x.XLOG_XACT_HAS_INFO, data)

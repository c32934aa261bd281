"""CheckPoint: every field at its PostgreSQL 15 offset, and a byte-exact round trip."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.pg.checkpoint import SIZE_OF_CHECKPOINT, CheckPoint

# checkPointCopy (bytes 40..128) of the pg_control that initdb wrote (PostgreSQL 15.18).
INITDB_CHECKPOINT = bytes.fromhex(
    "180750010000000001000000010000000100000000000000d402000000000000"
    "043500000100000000000000cc02000001000000010000000100000000000000"
    "38ab066b0000000000000000000000000000000000000000")

u32 = st.integers(0, 0xFFFFFFFF)
checkpoints = st.builds(
    CheckPoint, redo=st.builds(Lsn, st.integers(0, (1 << 64) - 1)), this_timeline_id=u32,
    prev_timeline_id=u32, full_page_writes=st.booleans(), next_xid=st.integers(0, (1 << 64) - 1),
    next_oid=u32, next_multi=u32, next_multi_offset=u32, oldest_xid=u32, oldest_xid_db=u32,
    oldest_multi=u32, oldest_multi_db=u32, time=st.integers(-(1 << 63), (1 << 63) - 1),
    oldest_commit_ts_xid=u32, newest_commit_ts_xid=u32, oldest_active_xid=u32)


def test_parse_initdb_checkpoint() -> None:
    """The values pg_controldata printed for this cluster (REDO 0/1500718, NextXID 0:724 ...)."""
    assert len(INITDB_CHECKPOINT) == SIZE_OF_CHECKPOINT
    cp = CheckPoint.from_bytes(INITDB_CHECKPOINT)
    assert cp.redo == Lsn.parse("0/1500718")
    assert (cp.this_timeline_id, cp.prev_timeline_id, cp.full_page_writes) == (1, 1, True)
    assert (cp.next_xid_epoch, cp.next_xid_32) == (0, 724)
    assert (cp.next_oid, cp.next_multi, cp.next_multi_offset) == (13572, 1, 0)
    assert (cp.oldest_xid, cp.oldest_xid_db, cp.oldest_multi, cp.oldest_multi_db) == (716, 1, 1, 1)
    assert cp.time == 0x6B06AB38
    assert (cp.oldest_commit_ts_xid, cp.newest_commit_ts_xid, cp.oldest_active_xid) == (0, 0, 0)
    assert cp.to_bytes() == INITDB_CHECKPOINT


def test_field_offsets() -> None:
    """Each field lands at its offsetof() in pg_control.h."""
    cp = CheckPoint(Lsn(0x1111111111111111), 0x22, 0x33, True, 0x4444444444444444, 0x55, 0x66,
                    0x77, 0x88, 0x99, 0xAA, 0xBB, -2, 0xCC, 0xDD, 0xEE)
    raw = cp.to_bytes()
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x1111111111111111
    assert struct.unpack_from("<IIB", raw, 8) == (0x22, 0x33, 1)
    assert raw[17:24] == bytes(7)
    assert struct.unpack_from("<Q", raw, 24)[0] == 0x4444444444444444
    assert struct.unpack_from("<8I", raw, 32) == (0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0)
    assert struct.unpack_from("<q", raw, 64)[0] == -2
    assert struct.unpack_from("<4I", raw, 72) == (0xCC, 0xDD, 0xEE, 0)


@settings(max_examples=200)
@given(checkpoints)
def test_round_trip(cp: CheckPoint) -> None:
    raw = cp.to_bytes()
    assert len(raw) == SIZE_OF_CHECKPOINT
    assert CheckPoint.from_bytes(raw) == cp
    assert CheckPoint.from_bytes(b"\xAA" * 5 + raw, offset=5) == cp


def test_short_input_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="needs 88 bytes.*file wal/x"):
        CheckPoint.from_bytes(bytes(87), path="wal/x")

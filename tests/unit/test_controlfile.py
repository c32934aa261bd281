"""pg_control: parse every field of a real PostgreSQL 15 file, write it back byte-identical."""

import dataclasses
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import Lsn
from strata.pg.checkpoint import CheckPoint
from strata.pg.controlfile import (
    CONTROL_CRC_OFFSET,
    PG_CONTROL_FILE_SIZE,
    ControlFileData,
    DBState,
    WalLevel,
)
from strata.pg.crc import crc32c

# The 296-byte struct of the pg_control initdb wrote (PostgreSQL 15.18); the file is this
# followed by zeros up to 8192 bytes.
INITDB_CONTROL = bytes.fromhex(
    "ca65ed7b38ab066b1405000025770d0c010000000000000038ab066b00000000"
    "1807500100000000180750010000000001000000010000000100000000000000"
    "d402000000000000043500000100000000000000cc0200000100000001000000"
    "010000000000000038ab066b0000000000000000000000000000000000000000"
    "e803000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000010000000000000064000000080000000a000000"
    "000000004000000000000000080000000000000087d632410020000000000200"
    "00200000000000014000000020000000cc070000000800000100000000000000"
    "44715ffa3302338729e59c54a8c6434e12a3da4ffca01456da0c89d0933af3e9"
    "f978f44f00000000") + bytes(PG_CONTROL_FILE_SIZE - 296)


def test_parse_initdb_control_file() -> None:
    """Values as pg_controldata printed them for this file."""
    c = ControlFileData.from_bytes(INITDB_CONTROL)
    assert c.system_identifier == 7712039671004227018
    assert (c.pg_control_version, c.catalog_version_no) == (1300, 202209061)
    assert c.state == DBState.SHUTDOWNED
    assert c.checkpoint == Lsn.parse("0/1500718")
    assert c.checkpoint_copy.redo == Lsn.parse("0/1500718")
    assert c.checkpoint_copy.next_oid == 13572
    assert c.unlogged_lsn == Lsn.parse("0/3E8")
    assert (c.min_recovery_point, c.min_recovery_point_tli) == (Lsn(0), 0)
    assert (c.backup_start_point, c.backup_end_point, c.backup_end_required) == \
        (Lsn(0), Lsn(0), False)
    assert (c.wal_level, c.wal_log_hints) == (WalLevel.REPLICA, False)
    assert (c.max_connections, c.max_worker_processes, c.max_wal_senders) == (100, 8, 10)
    assert (c.max_prepared_xacts, c.max_locks_per_xact, c.track_commit_timestamp) == \
        (0, 64, False)
    assert (c.max_align, c.float_format, c.blcksz, c.relseg_size) == (8, 1234567.0, 8192, 131072)
    assert (c.xlog_blcksz, c.xlog_seg_size, c.name_data_len, c.index_max_keys) == \
        (8192, 16777216, 64, 32)
    assert (c.toast_max_chunk_size, c.loblksize, c.float8_by_val) == (1996, 2048, True)
    assert c.data_checksum_version == 0
    assert c.mock_authentication_nonce.hex() == \
        "44715ffa3302338729e59c54a8c6434e12a3da4ffca01456da0c89d0933af3e9"
    assert c.to_bytes() == INITDB_CONTROL


def test_changed_field_gets_new_crc() -> None:
    c = ControlFileData.from_bytes(INITDB_CONTROL)
    changed = dataclasses.replace(c, checkpoint_copy=dataclasses.replace(
        c.checkpoint_copy, next_oid=99999))
    raw = changed.to_bytes()
    assert raw != INITDB_CONTROL
    assert struct.unpack_from("<I", raw, 40 + 32)[0] == 99999
    assert struct.unpack_from("<I", raw, CONTROL_CRC_OFFSET)[0] == crc32c(raw[:CONTROL_CRC_OFFSET])
    assert ControlFileData.from_bytes(raw) == changed


@pytest.mark.parametrize("offset", [0, 40, 100, 287, 288, 291])
def test_damage_is_detected(offset: int) -> None:
    raw = bytearray(INITDB_CONTROL)
    raw[offset] ^= 0x40
    with pytest.raises(CorruptionError, match="CRC mismatch.*file /d/global/pg_control"):
        ControlFileData.from_bytes(raw, path="/d/global/pg_control")


def test_wrong_version_and_short_file() -> None:
    raw = bytearray(INITDB_CONTROL)
    struct.pack_into("<I", raw, 8, 1700)
    with pytest.raises(CorruptionError, match="version 1700"):
        ControlFileData.from_bytes(raw)
    with pytest.raises(CorruptionError, match="is 200 bytes"):
        ControlFileData.from_bytes(INITDB_CONTROL[:200])


def test_clean_start_sets_what_pg_resetwal_sets() -> None:
    c = dataclasses.replace(ControlFileData.from_bytes(INITDB_CONTROL),
                            state=DBState.IN_PRODUCTION, min_recovery_point=Lsn(5),
                            min_recovery_point_tli=1, backup_start_point=Lsn(6),
                            backup_end_point=Lsn(7), backup_end_required=True)
    x = Lsn.parse("3/5000028")
    cp = dataclasses.replace(c.checkpoint_copy, redo=x, next_oid=20000)
    new = c.with_clean_start(cp, x, time=1234)
    assert (new.state, new.time, new.checkpoint, new.checkpoint_copy) == \
        (DBState.SHUTDOWNED, 1234, x, cp)
    assert (new.min_recovery_point, new.min_recovery_point_tli) == (Lsn(0), 0)
    assert (new.backup_start_point, new.backup_end_point, new.backup_end_required) == \
        (Lsn(0), Lsn(0), False)
    # Everything else is kept, including the settings a hot standby checks.
    assert dataclasses.replace(new, state=c.state, time=c.time, checkpoint=c.checkpoint,
                               checkpoint_copy=c.checkpoint_copy,
                               min_recovery_point=c.min_recovery_point,
                               min_recovery_point_tli=1, backup_start_point=Lsn(6),
                               backup_end_point=Lsn(7), backup_end_required=True) == c
    with pytest.raises(UserError, match="must equal the checkpoint record"):
        c.with_clean_start(cp, x + 8, time=1)


u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
lsns = st.builds(Lsn, st.integers(0, (1 << 64) - 1))
checkpoints = st.builds(
    CheckPoint, redo=lsns, this_timeline_id=u32, prev_timeline_id=u32,
    full_page_writes=st.booleans(), next_xid=st.integers(0, (1 << 64) - 1), next_oid=u32,
    next_multi=u32, next_multi_offset=u32, oldest_xid=u32, oldest_xid_db=u32, oldest_multi=u32,
    oldest_multi_db=u32, time=st.integers(-(1 << 63), (1 << 63) - 1), oldest_commit_ts_xid=u32,
    newest_commit_ts_xid=u32, oldest_active_xid=u32)


@st.composite
def control_files(draw: st.DrawFn) -> ControlFileData:
    base = ControlFileData.from_bytes(INITDB_CONTROL)
    cp: CheckPoint = draw(checkpoints)
    return dataclasses.replace(
        base, system_identifier=draw(st.integers(0, (1 << 64) - 1)), state=draw(u32),
        time=draw(st.integers(-(1 << 63), (1 << 63) - 1)), checkpoint=draw(lsns),
        checkpoint_copy=cp, unlogged_lsn=draw(lsns), min_recovery_point=draw(lsns),
        min_recovery_point_tli=draw(u32), backup_start_point=draw(lsns),
        backup_end_point=draw(lsns), backup_end_required=draw(st.booleans()),
        wal_level=draw(i32), wal_log_hints=draw(st.booleans()), max_connections=draw(i32),
        max_worker_processes=draw(i32), max_wal_senders=draw(i32),
        max_prepared_xacts=draw(i32), max_locks_per_xact=draw(i32),
        track_commit_timestamp=draw(st.booleans()), xlog_seg_size=draw(u32),
        data_checksum_version=draw(u32),
        mock_authentication_nonce=draw(st.binary(min_size=32, max_size=32)))


@settings(max_examples=150)
@given(control_files())
def test_round_trip(c: ControlFileData) -> None:
    raw = c.to_bytes()
    assert len(raw) == PG_CONTROL_FILE_SIZE
    assert raw[296:] == bytes(PG_CONTROL_FILE_SIZE - 296)
    assert ControlFileData.from_bytes(raw) == c


def test_compute_remembers_pg_control_for_one_read(tmp_path: Path) -> None:
    """`Compute.remember_control` (a lazy compute, before global/ moves onto its FUSE
    mount): the next `control()` is that copy, later ones read the file again."""
    from strata.common.proc import RunAs
    from strata.compute.compute import Compute

    (tmp_path / "global").mkdir()
    control = tmp_path / "global" / "pg_control"
    control.write_bytes(INITDB_CONTROL)
    me = RunAs("me", os.getuid(), os.getgid(), str(tmp_path))
    compute = Compute(tmp_path, user=me)
    compute.remember_control()
    control.unlink()
    assert compute.control().system_identifier == 7712039671004227018
    with pytest.raises(FileNotFoundError):
        compute.control()

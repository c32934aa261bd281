"""pg_control against PostgreSQL 15's own tools: every field as pg_controldata prints it,
byte-identical write-back, and changes that pg_controldata accepts (CRC included)."""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.compute.pgserver import PgServer
from strata.pg.controlfile import ControlFileData, DBState

CRC_WARNING = "Calculated CRC checksum does not match"
STATE_NAMES = {DBState.STARTUP: "starting up", DBState.SHUTDOWNED: "shut down",
               DBState.SHUTDOWNED_IN_RECOVERY: "shut down in recovery",
               DBState.SHUTDOWNING: "shutting down",
               DBState.IN_CRASH_RECOVERY: "in crash recovery",
               DBState.IN_ARCHIVE_RECOVERY: "in archive recovery",
               DBState.IN_PRODUCTION: "in production"}


def controldata(server: PgServer) -> tuple[str, dict[str, str]]:
    out = server.run_tool("pg_controldata", "-D", server.datadir).stdout.decode()
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields[key.strip()] = value.strip()
    # "Latest checkpoint's oldestCommitTsXid:0" has no space after the colon.
    return out, fields


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def expected_fields(c: ControlFileData) -> dict[str, str]:
    """What pg_controldata (pg_controldata.c) prints for each field of `c`."""
    cp = c.checkpoint_copy
    return {
        "pg_control version number": str(c.pg_control_version),
        "Catalog version number": str(c.catalog_version_no),
        "Database system identifier": str(c.system_identifier),
        "Database cluster state": STATE_NAMES[DBState(c.state)],
        "pg_control last modified": time.strftime("%c", time.localtime(c.time)),
        "Latest checkpoint location": str(c.checkpoint),
        "Latest checkpoint's REDO location": str(cp.redo),
        "Latest checkpoint's REDO WAL file": cp.redo.segment_file_name(
            cp.this_timeline_id, c.xlog_seg_size),
        "Latest checkpoint's TimeLineID": str(cp.this_timeline_id),
        "Latest checkpoint's PrevTimeLineID": str(cp.prev_timeline_id),
        "Latest checkpoint's full_page_writes": on_off(cp.full_page_writes),
        "Latest checkpoint's NextXID": f"{cp.next_xid_epoch}:{cp.next_xid_32}",
        "Latest checkpoint's NextOID": str(cp.next_oid),
        "Latest checkpoint's NextMultiXactId": str(cp.next_multi),
        "Latest checkpoint's NextMultiOffset": str(cp.next_multi_offset),
        "Latest checkpoint's oldestXID": str(cp.oldest_xid),
        "Latest checkpoint's oldestXID's DB": str(cp.oldest_xid_db),
        "Latest checkpoint's oldestActiveXID": str(cp.oldest_active_xid),
        "Latest checkpoint's oldestMultiXid": str(cp.oldest_multi),
        "Latest checkpoint's oldestMulti's DB": str(cp.oldest_multi_db),
        "Latest checkpoint's oldestCommitTsXid": str(cp.oldest_commit_ts_xid),
        "Latest checkpoint's newestCommitTsXid": str(cp.newest_commit_ts_xid),
        "Time of latest checkpoint": time.strftime("%c", time.localtime(cp.time)),
        "Fake LSN counter for unlogged rels": str(c.unlogged_lsn),
        "Minimum recovery ending location": str(c.min_recovery_point),
        "Min recovery ending loc's timeline": str(c.min_recovery_point_tli),
        "Backup start location": str(c.backup_start_point),
        "Backup end location": str(c.backup_end_point),
        "End-of-backup record required": "yes" if c.backup_end_required else "no",
        "wal_level setting": ["minimal", "replica", "logical"][c.wal_level],
        "wal_log_hints setting": on_off(c.wal_log_hints),
        "max_connections setting": str(c.max_connections),
        "max_worker_processes setting": str(c.max_worker_processes),
        "max_wal_senders setting": str(c.max_wal_senders),
        "max_prepared_xacts setting": str(c.max_prepared_xacts),
        "max_locks_per_xact setting": str(c.max_locks_per_xact),
        "track_commit_timestamp setting": on_off(c.track_commit_timestamp),
        "Maximum data alignment": str(c.max_align),
        "Database block size": str(c.blcksz),
        "Blocks per segment of large relation": str(c.relseg_size),
        "WAL block size": str(c.xlog_blcksz),
        "Bytes per WAL segment": str(c.xlog_seg_size),
        "Maximum length of identifiers": str(c.name_data_len),
        "Maximum columns in an index": str(c.index_max_keys),
        "Maximum size of a TOAST chunk": str(c.toast_max_chunk_size),
        "Size of a large-object chunk": str(c.loblksize),
        "Float8 argument passing": "by value" if c.float8_by_val else "by reference",
        "Data page checksum version": str(c.data_checksum_version),
        "Mock authentication nonce": c.mock_authentication_nonce.hex(),
    }


def control_path(server: PgServer) -> Path:
    return server.datadir / "global" / "pg_control"


def check_matches_controldata(server: PgServer) -> ControlFileData:
    raw = control_path(server).read_bytes()
    parsed = ControlFileData.from_bytes(raw)
    assert parsed.to_bytes() == raw, "write-back is not byte-identical"
    out, fields = controldata(server)
    assert CRC_WARNING not in out
    expected = expected_fields(parsed)
    assert {k: fields.get(k) for k in expected} == expected
    # Every line pg_controldata prints is covered (the float format line is derived).
    assert set(fields) - set(expected) == {"Date/time type storage"}
    return parsed


def test_real_control_file_fields_and_write_back(
        pg_factory: Callable[..., PgServer]) -> None:
    """Parse initdb's and a running-then-stopped server's pg_control; both match pg_controldata
    field by field and write back byte-identical."""
    server = pg_factory("pg")
    server.initdb("--wal-segsize=64", "--data-checksums")
    first = check_matches_controldata(server)
    assert first.xlog_seg_size == 64 << 20
    assert first.data_checksum_version == 1
    server.start({"max_connections": 37, "max_prepared_transactions": 3,
                  "track_commit_timestamp": "on", "wal_log_hints": "on"})
    server.sql("create table t as select generate_series(1, 1000) a")
    server.stop("fast")
    second = check_matches_controldata(server)
    assert (second.max_connections, second.max_prepared_xacts) == (37, 3)
    assert second.track_commit_timestamp and second.wal_log_hints
    assert second.checkpoint > first.checkpoint


def test_changed_fields_are_accepted_by_pg_controldata(
        pg_factory: Callable[..., PgServer]) -> None:
    """nextOid, nextXid (with an epoch), the checkpoint location and state written by us show
    up in pg_controldata with a valid CRC; a damaged file is refused by both."""
    server = pg_factory("pg")
    server.initdb()
    path = control_path(server)
    c = ControlFileData.from_bytes(path.read_bytes())
    x = Lsn.parse("3/5000A28")
    changed = dataclasses.replace(
        c, state=DBState.IN_PRODUCTION, checkpoint=x, min_recovery_point=Lsn.parse("3/0"),
        checkpoint_copy=dataclasses.replace(c.checkpoint_copy, redo=x, next_oid=987654,
                                            next_xid=(7 << 32) | 123456, oldest_active_xid=99))
    path.write_bytes(changed.to_bytes())
    out, fields = controldata(server)
    assert CRC_WARNING not in out
    assert fields["Latest checkpoint location"] == "3/5000A28"
    assert fields["Latest checkpoint's REDO location"] == "3/5000A28"
    assert fields["Latest checkpoint's NextOID"] == "987654"
    assert fields["Latest checkpoint's NextXID"] == "7:123456"
    assert fields["Latest checkpoint's oldestActiveXID"] == "99"
    assert fields["Database cluster state"] == "in production"
    assert fields["Minimum recovery ending location"] == "3/0"
    assert check_matches_controldata(server) == changed

    damaged = bytearray(changed.to_bytes())
    damaged[36] ^= 0x01  # one bit of the checkpoint location
    path.write_bytes(bytes(damaged))
    out, _ = controldata(server)
    assert CRC_WARNING in out
    with pytest.raises(CorruptionError, match=f"CRC mismatch.*file {path}"):
        ControlFileData.from_bytes(path.read_bytes(), path=str(path))

"""`ControlFileData`: parse and write PostgreSQL 15's `global/pg_control`.

Layout (pg_control.h, PG_CONTROL_VERSION 1300; offsets checked with `offsetof` against the
15.20 headers, x86-64). Bytes not named here are alignment padding and are zero, because
PostgreSQL zeroes the struct before filling it and writes it into a zeroed 8 KB buffer
(`WriteControlFile`):

    system_identifier u64 @0, pg_control_version u32 @8, catalog_version_no u32 @12,
    state u32 @16, time i64 @24, checkPoint u64 @32, checkPointCopy CheckPoint @40 (88 bytes),
    unloggedLSN u64 @128, minRecoveryPoint u64 @136, minRecoveryPointTLI u32 @144,
    backupStartPoint u64 @152, backupEndPoint u64 @160, backupEndRequired bool @168,
    wal_level i32 @172, wal_log_hints bool @176, MaxConnections i32 @180,
    max_worker_processes i32 @184, max_wal_senders i32 @188, max_prepared_xacts i32 @192,
    max_locks_per_xact i32 @196, track_commit_timestamp bool @200, maxAlign u32 @204,
    floatFormat f64 @208, blcksz u32 @216, relseg_size u32 @220, xlog_blcksz u32 @224,
    xlog_seg_size u32 @228, nameDataLen u32 @232, indexMaxKeys u32 @236,
    toast_max_chunk_size u32 @240, loblksize u32 @244, float8ByVal bool @248,
    data_checksum_version u32 @252, mock_authentication_nonce char[32] @256, crc u32 @288.

The CRC is CRC-32C over bytes [0, 288) (`offsetof(ControlFileData, crc)`); the file is
PG_CONTROL_FILE_SIZE = 8192 bytes, zero after the struct.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from enum import IntEnum

from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import Lsn
from strata.pg.checkpoint import SIZE_OF_CHECKPOINT, CheckPoint
from strata.pg.constants import PG_CONTROL_VERSION
from strata.pg.crc import crc32c

PG_CONTROL_FILE_SIZE = 8192
SIZE_OF_CONTROL_FILE_DATA = 296  # sizeof(ControlFileData), MAXALIGNed
CONTROL_CRC_OFFSET = 288
MOCK_AUTH_NONCE_LEN = 32
FLOAT_FORMAT = 1234567.0  # pg_control.h: detects a float format mismatch

_HEAD = struct.Struct("<QIII4xqQ")  # system_identifier .. checkPoint, ends at 40
_CHECKPOINT_COPY_OFFSET = 40
_TAIL_OFFSET = _CHECKPOINT_COPY_OFFSET + SIZE_OF_CHECKPOINT  # 128
# unloggedLSN .. data_checksum_version, then the nonce and the CRC.
_TAIL = struct.Struct("<QQI4xQQB3xiB3xiiiiiB3xIdIIIIIIIIB3xI32sI")
assert _HEAD.size == _CHECKPOINT_COPY_OFFSET, _HEAD.size
assert _TAIL_OFFSET + _TAIL.size == CONTROL_CRC_OFFSET + 4, _TAIL.size


class DBState(IntEnum):
    """pg_control.h `DBState`."""

    STARTUP = 0
    SHUTDOWNED = 1
    SHUTDOWNED_IN_RECOVERY = 2
    SHUTDOWNING = 3
    IN_CRASH_RECOVERY = 4
    IN_ARCHIVE_RECOVERY = 5
    IN_PRODUCTION = 6


class WalLevel(IntEnum):
    """xlog.h `WalLevel`."""

    MINIMAL = 0
    REPLICA = 1
    LOGICAL = 2


@dataclass(frozen=True, slots=True)
class ControlFileData:
    """Every field of PostgreSQL 15's `ControlFileData` except the CRC (computed on write)."""

    system_identifier: int
    pg_control_version: int
    catalog_version_no: int
    state: int  # a DBState value; kept as int so an unknown value still round-trips
    time: int
    checkpoint: Lsn
    checkpoint_copy: CheckPoint
    unlogged_lsn: Lsn
    min_recovery_point: Lsn
    min_recovery_point_tli: int
    backup_start_point: Lsn
    backup_end_point: Lsn
    backup_end_required: bool
    wal_level: int
    wal_log_hints: bool
    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    track_commit_timestamp: bool
    max_align: int
    float_format: float
    blcksz: int
    relseg_size: int
    xlog_blcksz: int
    xlog_seg_size: int
    name_data_len: int
    index_max_keys: int
    toast_max_chunk_size: int
    loblksize: int
    float8_by_val: bool
    data_checksum_version: int
    mock_authentication_nonce: bytes

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *,
                   path: str = "global/pg_control") -> ControlFileData:
        """Parse a pg_control file; a wrong size, version or CRC raises CorruptionError."""
        if len(data) < SIZE_OF_CONTROL_FILE_DATA:
            raise CorruptionError(f"pg_control is {len(data)} bytes, expected "
                                  f"{PG_CONTROL_FILE_SIZE}; restore it from a backup",
                                  path=path, offset=0)
        (system_identifier, version, catversion, state, time,
         checkpoint) = _HEAD.unpack_from(data, 0)
        if version != PG_CONTROL_VERSION:
            # Checked before the CRC, as PostgreSQL does: another version has another layout.
            raise CorruptionError(f"pg_control version {version}, expected "
                                  f"{PG_CONTROL_VERSION} (PostgreSQL 15)", path=path, offset=8)
        (unlogged, min_recovery, min_recovery_tli, backup_start, backup_end, backup_end_required,
         wal_level, wal_log_hints, max_connections, max_worker_processes, max_wal_senders,
         max_prepared_xacts, max_locks_per_xact, track_commit_timestamp, max_align, float_format,
         blcksz, relseg_size, xlog_blcksz, xlog_seg_size, name_data_len, index_max_keys,
         toast_max_chunk_size, loblksize, float8_by_val, data_checksum_version, nonce,
         stored_crc) = _TAIL.unpack_from(data, _TAIL_OFFSET)
        computed = crc32c(bytes(data[:CONTROL_CRC_OFFSET]))
        if computed != stored_crc:
            raise CorruptionError(f"pg_control CRC mismatch: stored {stored_crc:08X}, computed "
                                  f"{computed:08X}; the file is damaged, restore it",
                                  path=path, offset=CONTROL_CRC_OFFSET)
        return cls(
            system_identifier, version, catversion, state, time, Lsn(checkpoint),
            CheckPoint.from_bytes(data, path=path, offset=_CHECKPOINT_COPY_OFFSET),
            Lsn(unlogged), Lsn(min_recovery), min_recovery_tli, Lsn(backup_start),
            Lsn(backup_end), backup_end_required != 0, wal_level, wal_log_hints != 0,
            max_connections, max_worker_processes, max_wal_senders, max_prepared_xacts,
            max_locks_per_xact, track_commit_timestamp != 0, max_align, float_format, blcksz,
            relseg_size, xlog_blcksz, xlog_seg_size, name_data_len, index_max_keys,
            toast_max_chunk_size, loblksize, float8_by_val != 0, data_checksum_version, nonce)

    def struct_bytes(self) -> bytes:
        """The 296-byte struct with its CRC."""
        assert len(self.mock_authentication_nonce) == MOCK_AUTH_NONCE_LEN, \
            len(self.mock_authentication_nonce)
        head = _HEAD.pack(self.system_identifier, self.pg_control_version,
                          self.catalog_version_no, self.state, self.time, self.checkpoint.value)
        tail = _TAIL.pack(
            self.unlogged_lsn.value, self.min_recovery_point.value, self.min_recovery_point_tli,
            self.backup_start_point.value, self.backup_end_point.value,
            int(self.backup_end_required), self.wal_level, int(self.wal_log_hints),
            self.max_connections, self.max_worker_processes, self.max_wal_senders,
            self.max_prepared_xacts, self.max_locks_per_xact, int(self.track_commit_timestamp),
            self.max_align, self.float_format, self.blcksz, self.relseg_size, self.xlog_blcksz,
            self.xlog_seg_size, self.name_data_len, self.index_max_keys,
            self.toast_max_chunk_size, self.loblksize, int(self.float8_by_val),
            self.data_checksum_version, self.mock_authentication_nonce, 0)
        body = bytearray(head + self.checkpoint_copy.to_bytes() + tail)
        struct.pack_into("<I", body, CONTROL_CRC_OFFSET, crc32c(body[:CONTROL_CRC_OFFSET]))
        body += bytes(SIZE_OF_CONTROL_FILE_DATA - len(body))
        assert len(body) == SIZE_OF_CONTROL_FILE_DATA, len(body)
        return bytes(body)

    def to_bytes(self) -> bytes:
        """The whole 8192-byte pg_control file."""
        body = self.struct_bytes()
        return body + bytes(PG_CONTROL_FILE_SIZE - len(body))

    def with_clean_start(self, checkpoint: CheckPoint, record_lsn: Lsn, *,
                         time: int) -> ControlFileData:
        """This control file, set for a clean start at the shutdown checkpoint at `record_lsn`.

        The same fields `RewriteControlFile` (pg_resetwal.c) sets: state DB_SHUTDOWNED, the
        checkpoint location and copy, the time, and no recovery or backup points. Unlike
        pg_resetwal it keeps wal_level and the max_* settings: a hot standby started on this
        file checks them against its own configuration (D6).
        """
        if checkpoint.redo != record_lsn:
            raise UserError(f"checkpoint redo {checkpoint.redo} must equal the checkpoint record "
                            f"LSN {record_lsn} for a shutdown checkpoint; build the CheckPoint "
                            f"with redo={record_lsn}")
        return dataclasses.replace(
            self, state=DBState.SHUTDOWNED, time=time, checkpoint=record_lsn,
            checkpoint_copy=checkpoint, min_recovery_point=Lsn(0), min_recovery_point_tli=0,
            backup_start_point=Lsn(0), backup_end_point=Lsn(0), backup_end_required=False)

"""The safekeeper's control file: one timeline's `AcceptorState`, checksummed, written atomically.

Layout (all little-endian), version 2:

    magic    u32   0x534B4346 ("SKCF")
    version  u32   1
    length   u32   bytes of the body that follows
    body           tenant_id[16] timeline_id[16] system_id u64 wal_seg_size u32
                   timeline_start_lsn u64 timeline_start_prev_lsn u64 term u64 voted_for u64
                   commit_lsn u64 scan_lsn u64 scan_prev_lsn u64 backup_lsn u64
                   history_count u32, then (term u64, start_lsn u64, prev_record_lsn u64) each
    crc      u32   CRC-32C of everything before it

Version 1 (no `backup_lsn`: read as 0, nothing uploaded yet) is still read; a store always
writes version 2.

A store writes a temporary file, fsyncs it, renames it over the control file and fsyncs the
directory (architecture D7), so a crash leaves either the old or the new state. A load
checks every field it can (magic, version, length, checksum, LSN order) and raises
`CorruptionError` naming the file: a safekeeper must not vote or serve WAL with a state it
cannot trust.
"""

from __future__ import annotations

import struct
from pathlib import Path

from strata.common.durable import write_atomic
from strata.common.errors import CorruptionError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, check_segment_size
from strata.pg.crc import crc32c
from strata.safekeeper.acceptor import AcceptorState
from strata.safekeeper.messages import MAX_TERM_HISTORY, TermEntry

CONTROL_FILE_NAME = "safekeeper.control"
MAGIC = 0x534B4346
VERSION = 2
_READABLE_VERSIONS = (1, 2)

_PREAMBLE = struct.Struct("<III")  # magic, version, body length
_FIXED = struct.Struct("<16s16sQIQQQQQQQQI")  # body up to and including history_count
_FIXED_V1 = struct.Struct("<16s16sQIQQQQQQQI")  # version 1: no backup_lsn
_ENTRY = struct.Struct("<QQQ")
_CRC = struct.Struct("<I")


def encode_state(state: AcceptorState) -> bytes:
    """The control file's bytes for `state`."""
    assert len(state.term_history) <= MAX_TERM_HISTORY, len(state.term_history)
    body = bytearray(_FIXED.pack(
        state.tenant_id.raw, state.timeline_id.raw, state.system_id, state.wal_seg_size,
        state.timeline_start_lsn.value, state.timeline_start_prev_lsn.value, state.term,
        state.voted_for, state.commit_lsn.value, state.scan_lsn.value, state.scan_prev_lsn.value,
        state.backup_lsn.value, len(state.term_history)))
    for entry in state.term_history:
        body += _ENTRY.pack(entry.term, entry.start_lsn.value, entry.prev_record_lsn.value)
    out = _PREAMBLE.pack(MAGIC, VERSION, len(body)) + body
    return out + _CRC.pack(crc32c(out))


def decode_state(data: bytes, path: str = "<bytes>") -> AcceptorState:
    """Parse and check a control file; `CorruptionError` (with `path`) says what is wrong."""
    def bad(what: str, offset: int | None = None) -> CorruptionError:
        return CorruptionError(f"safekeeper control file is damaged: {what}; the timeline "
                               "cannot be served from this safekeeper (restore it from a "
                               "peer or delete the timeline directory)", path=path,
                               offset=offset)

    if len(data) < _PREAMBLE.size + _CRC.size:
        raise bad(f"only {len(data)} bytes")
    magic, version, length = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise bad(f"magic {magic:#010x}, expected {MAGIC:#010x}", 0)
    if version not in _READABLE_VERSIONS:
        raise bad(f"version {version}, this safekeeper reads versions "
                  f"{', '.join(map(str, _READABLE_VERSIONS))}", 4)
    if len(data) != _PREAMBLE.size + length + _CRC.size:
        raise bad(f"{len(data)} bytes, but the header says {length} bytes of body")
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    computed = crc32c(data[:-_CRC.size])
    if stored != computed:
        raise bad(f"checksum {stored:#010x}, computed {computed:#010x}", len(data) - _CRC.size)
    body = data[_PREAMBLE.size:-_CRC.size]
    fixed = _FIXED if version == VERSION else _FIXED_V1
    if len(body) < fixed.size:
        raise bad(f"body of {len(body)} bytes is shorter than {fixed.size}")
    if version == VERSION:
        (tenant, timeline, system_id, seg_size, start, start_prev, term, voted_for, commit,
         scan, scan_prev, backup, count) = fixed.unpack_from(body, 0)
    else:
        (tenant, timeline, system_id, seg_size, start, start_prev, term, voted_for, commit,
         scan, scan_prev, count) = fixed.unpack_from(body, 0)
        backup = 0
    if len(body) != fixed.size + count * _ENTRY.size:
        raise bad(f"{count} history entries do not fit a body of {len(body)} bytes")
    history = tuple(TermEntry(t, Lsn(s), Lsn(p))
                    for t, s, p in _ENTRY.iter_unpack(body[fixed.size:]))
    try:
        check_segment_size(seg_size)
    except UserError as err:
        raise bad(str(err)) from err
    if not start <= scan <= commit:
        raise bad(f"positions out of order: timeline start {Lsn(start)}, scan point "
                  f"{Lsn(scan)}, commit {Lsn(commit)}")
    if backup > commit:
        raise bad(f"upload position {Lsn(backup)} is above the commit LSN {Lsn(commit)}")
    for a, b in zip(history, history[1:], strict=False):
        if b.term <= a.term or b.start_lsn < a.start_lsn:
            raise bad(f"term history out of order: {a} then {b}")
    return AcceptorState(TenantId(tenant), TimelineId(timeline), system_id, seg_size,
                         Lsn(start), Lsn(start_prev), term, voted_for, history, Lsn(commit),
                         Lsn(scan), Lsn(scan_prev), Lsn(backup))


def store(directory: Path, state: AcceptorState) -> None:
    """Make `state` the timeline's durable state: temp, fsync, rename, fsync directory.

    Failpoints `sk-control-before-write`, `-before-rename`, `-before-dir-fsync`."""
    write_atomic(directory / CONTROL_FILE_NAME, encode_state(state),
                 failpoint_prefix="sk-control")


def load(directory: Path) -> AcceptorState:
    """The timeline's durable state; `CorruptionError` if the file is missing or damaged."""
    path = directory / CONTROL_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise CorruptionError("safekeeper control file is missing; the timeline directory is "
                              "incomplete (remove it and create the timeline again)",
                              path=str(path)) from err
    return decode_state(data, str(path))

"""The synthesized WAL that lets a stock PostgreSQL 15 start at an LSN we choose (D6).

`synthesize_wal` builds the segment file(s) holding one XLOG_CHECKPOINT_SHUTDOWN record at
the start position; `install_synthetic_start` puts them into a data directory and rewrites
`global/pg_control` to point at the record. The layout rules are in postgres15.md sec. 3:

* Every segment we write starts with a valid long page header (`XLogLongPageHeaderData`,
  xlog_internal.h): PostgreSQL validates page 0 whenever it switches segment.
* The page holding the record start has a valid header. When the record does not start
  right after that header, the header says XLP_FIRST_IS_CONTRECORD with `xlp_rem_len` =
  the bytes between the header and the record: `XLogFindNextRecord` (pg_waldump -s) skips
  MAXALIGN(xlp_rem_len) and lands exactly on the record. The server never reads those bytes.
* A page the record continues onto has XLP_FIRST_IS_CONTRECORD and `xlp_rem_len` = the
  record bytes still to come, as `XLogInsertRecord`/`CopyXLogRecordToWAL` write it.
* Every other byte is zero.

Positions: the caller passes the *next record position*, PostgreSQL's `EndRecPtr` of the
last record (MAXALIGNed; it may be a page boundary). A page boundary is not a record start
(`XLogBytePosToRecPtr`): the record then goes after the page header, at +24, or +40 at a
segment start. `SyntheticWal.record_lsn` is the LSN PostgreSQL will report for the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from strata.common.durable import write_atomic
from strata.common.errors import UserError
from strata.common.lsn import Lsn, check_segment_size, page_header_size, segment_file_name
from strata.pg.checkpoint import SIZE_OF_CHECKPOINT, CheckPoint
from strata.pg.constants import (
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_RECORD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLOG_BLCKSZ,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_PAGE_MAGIC,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    XLR_BLOCK_ID_DATA_SHORT,
    RmgrId,
)
from strata.pg.controlfile import ControlFileData
from strata.pg.crc import crc32c

# Strata computes always run on PostgreSQL timeline 1 (D5).
TIMELINE = 1
# XLogRecord + XLR_BLOCK_ID_DATA_SHORT + length byte + CheckPoint (xlogrecord.h).
CHECKPOINT_RECORD_LEN = SIZE_OF_XLOG_RECORD + 2 + SIZE_OF_CHECKPOINT
assert CHECKPOINT_RECORD_LEN == 114, CHECKPOINT_RECORD_LEN

# XLogRecord: xl_tot_len u32, xl_xid u32, xl_prev u64, xl_info u8, xl_rmid u8, 2 pad, xl_crc u32.
_RECORD_HEADER = struct.Struct("<IIQBB2xI")
_CRC_OFFSET = 20
# XLogPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32, 4 pad.
_SHORT_PHD = struct.Struct("<HHIQI4x")
# XLogLongPageHeaderData adds sysid u64, seg_size u32, xlog_blcksz u32.
_LONG_PHD = struct.Struct("<HHIQI4xQII")
assert _SHORT_PHD.size == SIZE_OF_XLOG_SHORT_PHD, _SHORT_PHD.size
assert _LONG_PHD.size == SIZE_OF_XLOG_LONG_PHD, _LONG_PHD.size

_SEGMENT_NAME = re.compile(r"^[0-9A-F]{24}(\.partial)?$")


@dataclass(frozen=True, slots=True)
class SyntheticWal:
    """The synthesized segment file(s) and where the checkpoint record landed."""

    record_lsn: Lsn  # the checkpoint record's LSN = checkpoint.redo = pg_control checkPoint
    end_lsn: Lsn  # MAXALIGN(end of the record): PostgreSQL's EndRecPtr after reading it
    prev_lsn: Lsn  # the record's xl_prev
    checkpoint: CheckPoint
    system_identifier: int
    seg_size: int
    segments: dict[str, bytes]  # segment file name -> seg_size bytes, in WAL order
    # segment file name -> (offset, length) of each run of its pages that are not all
    # zeros (the pages given a header): `written_runs` of the segment, without reading it
    data_runs: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)


# A lazy basebackup carries only the pages of each synthesized segment that are not all
# zeros (`written_runs`): the first page's long header and the checkpoint record's pages.
# Two pax headers of the tar member describe the file: its full size, and where each run
# of the member's content goes ("offset:length,..."); the rest is zeros, which
# `Compute.unpack` leaves as holes (up to 16 MB fewer to send, receive and write at
# every start).
FULL_SIZE_PAX_HEADER = "STRATA.full_size"
DATA_MAP_PAX_HEADER = "STRATA.data_map"


def written_runs(segment: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each run of whole pages of `segment` that are not all zeros."""
    zero = bytes(XLOG_BLCKSZ)
    runs: list[tuple[int, int]] = []
    for offset in range(0, len(segment), XLOG_BLCKSZ):
        if segment[offset:offset + XLOG_BLCKSZ] == zero:
            continue
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + XLOG_BLCKSZ)
        else:
            runs.append((offset, XLOG_BLCKSZ))
    return runs


def format_data_map(runs: list[tuple[int, int]]) -> str:
    return ",".join(f"{offset}:{length}" for offset, length in runs)


def parse_data_map(text: str, content_size: int, full_size: int) -> list[tuple[int, int]]:
    """The runs of `DATA_MAP_PAX_HEADER`; UserError unless they are in order, do not
    overlap, fit in `full_size` bytes and add up to the member's `content_size`."""
    runs: list[tuple[int, int]] = []
    end = 0
    for item in text.split(",") if text else []:
        offset_text, _, length_text = item.partition(":")
        if not (offset_text.isdigit() and length_text.isdigit()):
            raise UserError(f"data map item {item!r} is not OFFSET:LENGTH")
        offset, length = int(offset_text), int(length_text)
        if offset < end or offset + length > full_size:
            raise UserError(f"data map run {item!r} overlaps the one before it or ends "
                            f"beyond the file's {full_size} bytes")
        runs.append((offset, length))
        end = offset + length
    if sum(length for _, length in runs) != content_size:
        raise UserError(f"data map runs hold {sum(n for _, n in runs)} bytes, the content "
                        f"{content_size}")
    return runs


def checkpoint_record_lsn(next_record_lsn: Lsn, seg_size: int) -> Lsn:
    """Where a record written at `next_record_lsn` (an EndRecPtr) actually starts.

    A page-aligned position is moved past the page header, as `XLogBytePosToRecPtr` does.
    """
    value = next_record_lsn.value
    if value % 8:
        raise UserError(f"next record position {next_record_lsn} is not 8-byte aligned; "
                        "pass the MAXALIGNed end of the previous record")
    if value % XLOG_BLCKSZ == 0:
        return Lsn(value + page_header_size(value, seg_size))
    if value % XLOG_BLCKSZ < page_header_size(value, seg_size):
        raise UserError(f"next record position {next_record_lsn} is inside a WAL page header")
    return next_record_lsn


def checkpoint_record(checkpoint: CheckPoint, prev_lsn: Lsn) -> bytes:
    """The 114-byte XLOG_CHECKPOINT_SHUTDOWN record with its CRC-32C.

    The CRC covers the payload [24, 114) first and then the header up to xl_crc
    (`XLogRecordAssemble` + `XLogInsertRecord`; checked by `ValidXLogRecord`).
    """
    payload = bytes([XLR_BLOCK_ID_DATA_SHORT, SIZE_OF_CHECKPOINT]) + checkpoint.to_bytes()
    header = _RECORD_HEADER.pack(CHECKPOINT_RECORD_LEN, 0, prev_lsn.value,
                                 XLOG_CHECKPOINT_SHUTDOWN, RmgrId.XLOG, 0)
    crc = crc32c(header[:_CRC_OFFSET], crc32c(payload))
    record = header[:_CRC_OFFSET] + struct.pack("<I", crc) + payload
    assert len(record) == CHECKPOINT_RECORD_LEN, len(record)
    return record


def _write_page_header(segment: bytearray, page_lsn: int, info: int, rem_len: int,
                       system_identifier: int, seg_size: int) -> None:
    offset = page_lsn % seg_size
    assert offset % XLOG_BLCKSZ == 0, page_lsn
    if offset == 0:
        _LONG_PHD.pack_into(segment, 0, XLOG_PAGE_MAGIC, info | XLP_LONG_HEADER, TIMELINE,
                            page_lsn, rem_len, system_identifier, seg_size, XLOG_BLCKSZ)
    else:
        _SHORT_PHD.pack_into(segment, offset, XLOG_PAGE_MAGIC, info, TIMELINE, page_lsn,
                             rem_len)


def synthesize_wal(next_record_lsn: Lsn, prev_lsn: Lsn, checkpoint: CheckPoint, *,
                   system_identifier: int, seg_size: int) -> SyntheticWal:
    """Build the segment(s) holding a shutdown checkpoint at `next_record_lsn` (see module doc).

    `checkpoint` supplies the counters; its `redo` is replaced by the record LSN, which the
    caller cannot know before the page-boundary rule is applied. `prev_lsn` becomes xl_prev
    and must be below the record (PostgreSQL checks only that; 0/0 is accepted).
    """
    check_segment_size(seg_size)
    record_lsn = checkpoint_record_lsn(next_record_lsn, seg_size)
    if prev_lsn >= record_lsn:
        raise UserError(f"xl_prev {prev_lsn} must be below the checkpoint record at "
                        f"{record_lsn}; PostgreSQL rejects the record otherwise")
    if checkpoint.this_timeline_id != TIMELINE or checkpoint.prev_timeline_id != TIMELINE:
        raise UserError(f"checkpoint timelines {checkpoint.this_timeline_id}/"
                        f"{checkpoint.prev_timeline_id}: Strata computes run on timeline 1")
    checkpoint = dataclasses.replace(checkpoint, redo=record_lsn)
    record = checkpoint_record(checkpoint, prev_lsn)

    segments: dict[int, bytearray] = {}
    headers: set[int] = set()  # the LSNs of the pages given a header: all that is written

    def segment_for(pos: int) -> bytearray:
        """The segment holding `pos`; page 0 gets a plain long header on first use."""
        segno = pos // seg_size
        if segno not in segments:
            segments[segno] = bytearray(seg_size)
            _write_page_header(segments[segno], segno * seg_size, 0, 0, system_identifier,
                               seg_size)
            headers.add(segno * seg_size)
        return segments[segno]

    pos = record_lsn.value
    page = pos - pos % XLOG_BLCKSZ
    gap = pos - (page + page_header_size(page, seg_size))
    assert gap >= 0, (record_lsn, gap)
    # Bytes before the record on its page read as the tail of an earlier record.
    info = XLP_FIRST_IS_CONTRECORD if gap else 0
    _write_page_header(segment_for(page), page, info, gap, system_identifier,
                       seg_size)
    headers.add(page)
    written = 0
    while True:
        chunk = min(len(record) - written, page + XLOG_BLCKSZ - pos)
        segment = segment_for(pos)
        segment[pos % seg_size:pos % seg_size + chunk] = record[written:written + chunk]
        written += chunk
        pos += chunk
        if written == len(record):
            break
        # The record continues on the next page, after its header.
        page = pos
        assert page % XLOG_BLCKSZ == 0, page
        rem_len = len(record) - written
        _write_page_header(segment_for(page), page,
                           XLP_FIRST_IS_CONTRECORD, rem_len, system_identifier, seg_size)
        headers.add(page)
        pos += page_header_size(page, seg_size)
    end_lsn = Lsn(pos).align(8)
    return SyntheticWal(
        record_lsn=record_lsn, end_lsn=end_lsn, prev_lsn=prev_lsn, checkpoint=checkpoint,
        system_identifier=system_identifier, seg_size=seg_size,
        segments={segment_file_name(segno, TIMELINE, seg_size): bytes(data)
                  for segno, data in sorted(segments.items())},
        data_runs={segment_file_name(segno, TIMELINE, seg_size):
                   _page_runs(sorted(lsn % seg_size for lsn in headers
                                     if lsn // seg_size == segno))
                   for segno in sorted(segments)})


def _page_runs(offsets: list[int]) -> list[tuple[int, int]]:
    """(offset, length) runs of the whole pages at the sorted `offsets`."""
    runs: list[tuple[int, int]] = []
    for offset in offsets:
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + XLOG_BLCKSZ)
        else:
            runs.append((offset, XLOG_BLCKSZ))
    return runs


def install_synthetic_start(datadir: Path, control: ControlFileData, wal: SyntheticWal, *,
                            time: int) -> ControlFileData:
    """Replace the WAL in `datadir/pg_wal` by `wal` and point `global/pg_control` at it.

    The old segment files (and their archive_status markers) are removed first: records in
    an old segment past the checkpoint would be replayed as if they followed it. `control`
    is the data directory's current control file (its counters are not merged:
    `wal.checkpoint` already holds them); `time` (seconds since the epoch) becomes
    pg_control's modification time. Returns the new control file. New files get the data
    directory's owner, mode 0600.
    """
    if control.system_identifier != wal.system_identifier:
        raise UserError(f"synthesized WAL is for system {wal.system_identifier}, the control "
                        f"file in {datadir} is for {control.system_identifier}")
    if control.xlog_seg_size != wal.seg_size:
        raise UserError(f"synthesized WAL uses {wal.seg_size}-byte segments, the cluster in "
                        f"{datadir} uses {control.xlog_seg_size}")
    stat = os.stat(datadir)
    owner = (stat.st_uid, stat.st_gid) if os.getuid() == 0 else None  # as the server user
    pg_wal = datadir / "pg_wal"
    for entry in pg_wal.iterdir():
        if _SEGMENT_NAME.match(entry.name) and entry.is_file():
            entry.unlink()
    # The archiver's .ready/.done markers name segments that no longer exist.
    archive_status = pg_wal / "archive_status"
    if archive_status.is_dir():
        for entry in archive_status.iterdir():
            if _SEGMENT_NAME.match(entry.stem) and entry.suffix in (".ready", ".done"):
                entry.unlink()
    for name, data in wal.segments.items():
        assert len(data) == wal.seg_size, (name, len(data))
        write_atomic(pg_wal / name, data, mode=0o600, owner=owner)
    new_control = control.with_clean_start(wal.checkpoint, wal.record_lsn, time=time)
    write_atomic(datadir / "global" / "pg_control", new_control.to_bytes(), mode=0o600,
                 owner=owner)
    return new_control

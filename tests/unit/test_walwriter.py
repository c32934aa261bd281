"""The synthesized checkpoint WAL: exact record bytes, page headers and layouts (D6)."""

import dataclasses
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_controlfile import INITDB_CONTROL  # the pg_control of the same cluster

from strata.common.errors import UserError
from strata.common.lsn import Lsn, parse_segment_file_name
from strata.pg.checkpoint import CheckPoint
from strata.pg.controlfile import ControlFileData
from strata.pg.crc import crc32c
from strata.pg.walwriter import (
    CHECKPOINT_RECORD_LEN,
    SyntheticWal,
    checkpoint_record,
    checkpoint_record_lsn,
    install_synthetic_start,
    synthesize_wal,
    written_runs,
)

MB = 1 << 20
SYSID = 7712039671004227018
# The shutdown checkpoint record initdb wrote at 0/1500718 (prev 0/15006D0), PostgreSQL 15.18.
INITDB_RECORD = bytes.fromhex(
    "7200000000000000d006500100000000000000005e1ae24bff58180750010000"
    "000001000000010000000100000000000000d402000000000000043500000100"
    "000000000000cc0200000100000001000000010000000000000038ab066b0000"
    "000000000000000000000000000000000000")
INITDB_CHECKPOINT = CheckPoint.from_bytes(INITDB_RECORD, offset=26)


def test_record_is_byte_identical_to_postgres() -> None:
    assert INITDB_CHECKPOINT.redo == Lsn.parse("0/1500718")
    assert checkpoint_record(INITDB_CHECKPOINT, Lsn.parse("0/15006D0")) == INITDB_RECORD


def read_back(wal: SyntheticWal) -> bytes:
    """An independent reader: follow the page headers from record_lsn, check each header,
    return the record, and check that every byte we did not account for is zero."""
    seg_size = wal.seg_size
    segs = {parse_segment_file_name(name, seg_size)[1]: bytearray(data)
            for name, data in wal.segments.items()}
    assert all(len(s) == seg_size for s in segs.values())
    assert list(segs) == sorted(segs) and list(segs) == list(range(min(segs), max(segs) + 1))

    def take_header(page: int, want_info: int, want_rem: int) -> int:
        seg = segs[page // seg_size]
        off = page % seg_size
        magic, info, tli, addr, rem = struct.unpack_from("<HHIQI", seg, off)
        size = 24
        if off == 0:
            sysid, segsz, blcksz = struct.unpack_from("<QII", seg, 24)
            assert (sysid, segsz, blcksz) == (SYSID, seg_size, 8192)
            want_info |= 0x2
            size = 40
        assert (magic, info, tli, addr, rem) == (0xD110, want_info, 1, page, want_rem)
        seg[off:off + size] = bytes(size)  # accounted for
        return size

    x = wal.record_lsn.value
    first = x - x % seg_size
    if x - first >= 8192:  # page 0 of X's segment: a plain long header
        take_header(first, 0, 0)
    x = wal.record_lsn.value
    page = x - x % 8192
    gap = x - page - (40 if page % seg_size == 0 else 24)
    take_header(page, 0x1 if gap else 0, gap)
    out = bytearray()
    pos = x
    while len(out) < CHECKPOINT_RECORD_LEN:
        if pos % 8192 == 0:
            pos += take_header(pos, 0x1, CHECKPOINT_RECORD_LEN - len(out))
        seg = segs[pos // seg_size]
        n = min(CHECKPOINT_RECORD_LEN - len(out), 8192 - pos % 8192)
        out += seg[pos % seg_size:pos % seg_size + n]
        seg[pos % seg_size:pos % seg_size + n] = bytes(n)
        pos += n
    assert wal.end_lsn == Lsn((pos + 7) // 8 * 8)
    for segno, seg in segs.items():
        assert seg == bytes(seg_size), f"stray bytes in segment {segno}"
    return bytes(out)


def check_record(raw: bytes, wal: SyntheticWal, prev: Lsn) -> None:
    tot_len, xid, xl_prev, info, rmid, crc = struct.unpack_from("<IIQBB2xI", raw)
    assert (tot_len, xid, xl_prev, info, rmid) == (114, 0, prev.value, 0x00, 0)
    assert raw[24:26] == bytes([0xFF, 88])
    assert crc == crc32c(raw[:20], crc32c(raw[24:]))
    cp = CheckPoint.from_bytes(raw, offset=26)
    assert cp == wal.checkpoint
    assert cp.redo == wal.record_lsn


def synth(next_lsn: str, seg_size: int = 16 * MB, prev: str = "0/15006D0") -> SyntheticWal:
    wal = synthesize_wal(Lsn.parse(next_lsn), Lsn.parse(prev), INITDB_CHECKPOINT,
                         system_identifier=SYSID, seg_size=seg_size)
    check_record(read_back(wal), wal, Lsn.parse(prev))
    return wal


@pytest.mark.parametrize(("next_lsn", "seg_size", "record_lsn", "end_lsn", "names"), [
    # A: mid-page
    ("0/1503A10", 16 * MB, "0/1503A10", "0/1503A88", ["000000010000000000000001"]),
    # B: a later segment, page 5 offset 1232
    ("0/400A4D0", 16 * MB, "0/400A4D0", "0/400A548", ["000000010000000000000004"]),
    # C: crossing a page boundary: 56 bytes, then 58 after the next page's header
    ("0/1505FC8", 16 * MB, "0/1505FC8", "0/1506058", ["000000010000000000000001"]),
    # D: a segment start: the record goes after the long header
    ("0/2000000", 16 * MB, "0/2000028", "0/20000A0", ["000000010000000000000002"]),
    ("0/2000028", 16 * MB, "0/2000028", "0/20000A0", ["000000010000000000000002"]),
    # E: a page start: after the short header
    ("0/2006000", 16 * MB, "0/2006018", "0/2006090", ["000000010000000000000002"]),
    # F: crossing a segment end: 48 bytes, then 66 after the next segment's long header
    ("0/2FFFFD0", 16 * MB, "0/2FFFFD0", "0/3000070", ["000000010000000000000002",
                                                      "000000010000000000000003"]),
    ("1/FFFD0", MB, "1/FFFD0", "1/100070", ["000000010000000100000000",
                                             "000000010000000100000001"]),
    ("0/FFFFFF0", 64 * MB, "0/FFFFFF0", "0/10000090", ["000000010000000000000003",
                                                      "000000010000000000000004"]),
])
def test_layouts(next_lsn: str, seg_size: int, record_lsn: str, end_lsn: str,
                 names: list[str]) -> None:
    wal = synth(next_lsn, seg_size)
    assert (str(wal.record_lsn), str(wal.end_lsn)) == (record_lsn, end_lsn)
    assert list(wal.segments) == names
    # The pages the lazy basebackup sends are those that are not all zeros.
    assert wal.data_runs == {name: written_runs(data) for name, data in wal.segments.items()}


def test_exact_headers_of_a_segment_crossing() -> None:
    wal = synth("0/2FFFFD0")
    first, second = wal.segments.values()
    # The last page of the first segment: CONTRECORD for the 8120 bytes before X.
    assert struct.unpack_from("<HHIQI", first, 16 * MB - 8192) == \
        (0xD110, 0x1, 1, 0x2FFE000, 8192 - 48 - 24)
    assert struct.unpack_from("<HHIQIxxxxQII", second, 0) == \
        (0xD110, 0x3, 1, 0x3000000, 66, SYSID, 16 * MB, 8192)


def test_prev_zero_and_redo_is_replaced() -> None:
    wal = synth("0/1503A10", prev="0/0")
    assert wal.checkpoint == dataclasses.replace(INITDB_CHECKPOINT, redo=Lsn.parse("0/1503A10"))
    assert wal.prev_lsn == Lsn(0)


def test_page_aligned_position() -> None:
    assert checkpoint_record_lsn(Lsn.parse("0/1000000"), 16 * MB) == Lsn.parse("0/1000028")
    assert checkpoint_record_lsn(Lsn.parse("0/1002000"), 16 * MB) == Lsn.parse("0/1002018")
    assert checkpoint_record_lsn(Lsn.parse("0/1100000"), MB) == Lsn.parse("0/1100028")
    assert checkpoint_record_lsn(Lsn.parse("0/1100000"), 16 * MB) == Lsn.parse("0/1100018")


@pytest.mark.parametrize(("next_lsn", "prev", "message"), [
    ("0/1503A11", "0/0", "not 8-byte aligned"),
    ("0/1502010", "0/0", "inside a WAL page header"),
    ("0/1000020", "0/0", "inside a WAL page header"),
    ("0/1503A10", "0/1503A10", "must be below"),
    ("0/2000000", "0/2000028", "must be below"),
])
def test_rejects(next_lsn: str, prev: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        synthesize_wal(Lsn.parse(next_lsn), Lsn.parse(prev), INITDB_CHECKPOINT,
                       system_identifier=SYSID, seg_size=16 * MB)


def test_rejects_other_timeline() -> None:
    cp = dataclasses.replace(INITDB_CHECKPOINT, this_timeline_id=2)
    with pytest.raises(UserError, match="timeline 1"):
        synthesize_wal(Lsn.parse("0/1503A10"), Lsn(0), cp, system_identifier=SYSID,
                       seg_size=16 * MB)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, (1 << 40) // 8).map(lambda v: v * 8), st.sampled_from([MB, 2 * MB]),
       st.booleans())
def test_any_position(value: int, seg_size: int, near_end: bool) -> None:
    """Any aligned position, biased to the last bytes of a page or segment, reads back."""
    if near_end:
        value = value - value % seg_size + seg_size - 8 * (value % 40 + 1)
    lsn = Lsn(value)
    if lsn.page_offset() and lsn.page_offset() < (40 if value % seg_size < 8192 else 24):
        return  # inside a header: rejected, tested above
    wal = synth(str(lsn), seg_size, prev="0/0")
    assert wal.record_lsn == checkpoint_record_lsn(lsn, seg_size)


def test_install_replaces_wal_and_control(tmp_path: Path) -> None:
    """Old segments and their archive markers go; the new ones and pg_control are written."""
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "pg_control").write_bytes(INITDB_CONTROL)
    status = tmp_path / "pg_wal" / "archive_status"
    status.mkdir(parents=True)
    for name in ("000000010000000000000001", "000000010000000000000009",
                 "000000010000000000000002.partial"):
        (tmp_path / "pg_wal" / name).write_bytes(b"old")
    (status / "000000010000000000000001.done").touch()
    (status / "000000010000000000000002.partial.ready").touch()
    (tmp_path / "pg_wal" / "00000002.history").write_text("kept")
    control = ControlFileData.from_bytes(INITDB_CONTROL)
    wal = synthesize_wal(Lsn.parse("0/3FFFFD0"), control.checkpoint, control.checkpoint_copy,
                         system_identifier=control.system_identifier,
                         seg_size=control.xlog_seg_size)

    new = install_synthetic_start(tmp_path, control, wal, time=1700000000)

    files = sorted(p.name for p in (tmp_path / "pg_wal").iterdir() if p.is_file())
    assert files == ["000000010000000000000003", "000000010000000000000004",
                     "00000002.history"]
    assert list(status.iterdir()) == []
    for name, data in wal.segments.items():
        path = tmp_path / "pg_wal" / name
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = ControlFileData.from_bytes((tmp_path / "global" / "pg_control").read_bytes())
    assert written == new
    assert (written.checkpoint, written.checkpoint_copy, written.time) == \
        (wal.record_lsn, wal.checkpoint, 1700000000)

    other = dataclasses.replace(control, system_identifier=1)
    with pytest.raises(UserError, match="is for system"):
        install_synthetic_start(tmp_path, other, wal, time=1)

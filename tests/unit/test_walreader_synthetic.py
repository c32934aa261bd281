"""The WAL reader on synthetic WAL laid out by PostgreSQL's rules (xloginsert.c placement,
xlog_internal.h page headers): records of any length, including ones that end exactly at a
page end, headers split across pages and records spanning many pages and segments."""

from __future__ import annotations

import struct
from pathlib import Path

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.pg.walreader import WalStreamDecoder, read_wal_files

SEG = 1 << 20
PAGE = 8192
BASE = 3 * SEG  # the first segment: 000000010000000000000003
SYSID = 7311234567890123456
XLOG_NOOP = 0x20


def _record(n: int, prev: int) -> bytes:
    """An XLOG NOOP record with n bytes of main data (xlogrecord.h layout)."""
    data = (b"%08d" % n * (n // 8 + 1))[:n]
    body = (bytes([255, n]) if n < 256 else b"\xfe" + struct.pack("<I", n)) + data
    head = struct.pack("<IIQBBxx", 24 + len(body), 0, prev, XLOG_NOOP, 0)
    crc = google_crc32c.extend(google_crc32c.value(body), head)
    return head + struct.pack("<I", crc) + body


def build_wal(lengths: list[int], abandon: int | None = None,
              ) -> tuple[bytes, list[tuple[int, int, int]]]:
    """WAL segments holding NOOP records of the given main data lengths, from BASE on;
    returns the bytes (whole segments, zeros after the last record) and (lsn, end_lsn, n).

    Record number `abandon` is cut after its first page, as when a crash interrupted it;
    the next page then carries XLP_FIRST_IS_OVERWRITE_CONTRECORD and the records go on there
    (xlog.c after recovery; the overwrite record itself is a NOOP here). It is not returned.
    """
    buf = bytearray(((sum(lengths) + 64 * len(lengths)) * 2 // SEG + 2) * SEG)
    overwrite = False

    def header(page: int, rem: int) -> int:
        long = page % SEG == 0
        info = (1 if rem else 0) | (2 if long else 0) | (8 if overwrite else 0)
        h = struct.pack("<HHIQI4x", 0xD110, info, 1, page, rem)
        if long:
            h += struct.pack("<QII", SYSID, SEG, PAGE)
        buf[page - BASE:page - BASE + len(h)] = h
        return len(h)

    pos = BASE
    prev = 0
    out: list[tuple[int, int, int]] = []
    for k, n in enumerate(lengths):
        if pos % PAGE == 0:
            pos += header(pos, 0)
            overwrite = False
        lsn = pos
        rec = _record(n, prev)
        i = 0
        while i < len(rec):
            if pos % PAGE == 0:
                if k == abandon:
                    overwrite = True
                    break
                pos += header(pos, len(rec) - i)
            take = min(len(rec) - i, PAGE - pos % PAGE)
            buf[pos - BASE:pos - BASE + take] = rec[i:i + take]
            pos += take
            i += take
        if overwrite:
            continue  # the next record begins on this page, after its header
        end = (pos + 7) & ~7
        out.append((lsn, end, n))
        prev, pos = lsn, end
    return bytes(buf), out


def _write(tmp: Path, data: bytes) -> Path:
    for i in range(len(data) // SEG):
        (tmp / Lsn(BASE + i * SEG).segment_file_name(1, SEG)).write_bytes(
            data[i * SEG:(i + 1) * SEG])
    return tmp


def test_stream_from_a_page_whose_continuation_ends_with_the_page(tmp_path: Path) -> None:
    """Record B fills page 1 and ends 8164 bytes into page 2, so with its padding page 2 holds
    nothing else: a stream from page 2 must begin with the record after page 3's header."""
    lengths = [8152 - 29, 8168 + 8164 - 29, 100, 200]  # A ends exactly at page 1's start
    data, built = build_wal(lengths)
    assert built[1][0] == BASE + PAGE + 24
    assert built[1][1] == BASE + 3 * PAGE
    for start in (BASE + 2 * PAGE, BASE + PAGE + 200, BASE + 2 * PAGE + 200):
        decoder = WalStreamDecoder(Lsn(start), SEG)
        decoder.feed(data[start - BASE:built[-1][1] - BASE])
        assert [(r.lsn, r.end_lsn) for r in decoder] == [b[:2] for b in built[2:]]
    assert [r.lsn for r in read_wal_files(_write(tmp_path, data))] == [b[0] for b in built]


_lengths = st.lists(st.one_of(st.integers(0, 300), st.integers(8080, 8200),
                              st.integers(16250, 16400), st.integers(30000, 70000)),
                    min_size=1, max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(_lengths, st.data())
def test_any_layout_decodes_from_files_and_from_any_start(
        tmp_path: Path, lengths: list[int], data: st.DataObject) -> None:
    wal, built = build_wal(lengths)
    for f in tmp_path.iterdir():
        f.unlink()
    records = list(read_wal_files(_write(tmp_path, wal)))
    assert [(r.lsn, r.end_lsn, len(r.main_data)) for r in records] == built
    assert all(r.main_data == (b"%08d" % n * (n // 8 + 1))[:n]
               for r, (_, _, n) in zip(records, built, strict=True))
    # A stream from any position, in chunks: exactly the records that begin at or after it.
    end = built[-1][1]
    start = data.draw(st.integers(BASE, end - 1), label="start")
    chunk = data.draw(st.integers(1, 20000), label="chunk")
    decoder = WalStreamDecoder(Lsn(start), SEG)
    got: list[tuple[int, int, int]] = []
    for pos in range(start, end, chunk):
        decoder.feed(wal[pos - BASE:min(pos + chunk, end) - BASE])
        got.extend((r.lsn, r.end_lsn, len(r.main_data)) for r in decoder)
    expect = [b for b in built if b[0] >= start]
    # A mid-page start finds its footing at the first record that begins after the next page
    # header and walks back along xl_prev; until that record arrives, it can only wait.
    if start % PAGE and not any(b[0] > ((start | (PAGE - 1)) + 1) for b in built):
        assert got == []
    else:
        assert got == expect


def test_abandoned_record_is_skipped_at_an_overwrite_contrecord_page(tmp_path: Path) -> None:
    """A record cut short by a crash is skipped where the next page has
    XLP_FIRST_IS_OVERWRITE_CONTRECORD; without the flag it is corruption."""
    data, built = build_wal([100, 20000, 50, 60], abandon=1)
    assert len(built) == 3
    records = list(read_wal_files(_write(tmp_path, data)))
    assert [(r.lsn, r.end_lsn, len(r.main_data)) for r in records] == built
    assert records[1].prev == records[0].lsn
    page = (built[0][1] | (PAGE - 1)) + 1
    plain = bytearray(data)
    plain[page - BASE + 2] &= ~8
    decoder = WalStreamDecoder(Lsn(BASE), SEG)
    decoder.feed(bytes(plain[:built[-1][1] - BASE]))
    with pytest.raises(CorruptionError, match=rf"at {Lsn(page)}: there is no contrecord flag"):
        list(decoder)

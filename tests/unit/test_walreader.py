"""The WAL reader on real PostgreSQL 15 WAL (a committed byte fixture): good input decodes
consistently, bad input raises a CorruptionError naming the LSN, never garbage or a hang."""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path

import google_crc32c
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import Lsn
from strata.pg import walreader
from strata.pg.constants import RmgrId
from strata.pg.walreader import DecodedRecord, WalStreamDecoder, read_wal_files

FIXTURE = Path(__file__).parent / "data" / "walreader_1mb.zst"  # make_walreader_fixture.py


@cache
def _fixture() -> tuple[str, int, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(FIXTURE.read_bytes(),
                                                  max_output_size=1 << 26)
    head, _, data = raw.partition(b"\n")
    first, seg, count = head.decode().split()
    assert len(data) == int(seg) * int(count), (len(data), seg, count)
    return first, int(seg), data


SEG = _fixture()[1]
BASE = int(_fixture()[0][16:], 16) * SEG  # LSN of the first byte of the fixture


def wal_bytes() -> bytearray:
    return bytearray(_fixture()[2])


def stream_bytes(start: int) -> bytes:
    """The fixture from `start` to the end of its last record (a stream has no zeroed tail)."""
    return _fixture()[2][start - BASE:all_records()[-1].end_lsn - BASE]


def write_segments(directory: Path, data: bytes | bytearray, count: int | None = None) -> Path:
    """Write `data` as segment files (the fixture's names) into `directory`."""
    first = _fixture()[0]
    n = len(data) // SEG if count is None else count
    for i in range(n):
        name = f"{first[:16]}{int(first[16:], 16) + i:08X}"
        (directory / name).write_bytes(bytes(data[i * SEG:(i + 1) * SEG]))
    return directory


@cache
def all_records() -> tuple[DecodedRecord, ...]:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return tuple(read_wal_files(write_segments(Path(d), wal_bytes())))


def record_spanning_pages() -> DecodedRecord:
    return next(r for r in all_records()
                if r.lsn >> 13 != (r.lsn + r.tot_len - 1) >> 13 and r.lsn >> 20 == r.end_lsn >> 20)


def header_size(page_lsn: int) -> int:
    return 40 if page_lsn % SEG == 0 else 24


def test_fixture_decodes_into_a_consistent_chain() -> None:
    """Every record's prev is the previous record, and the next record starts at its end
    (after a page header, or at the next segment after an XLOG SWITCH)."""
    records = all_records()
    assert len(records) > 1000
    for a, b in zip(records, records[1:], strict=False):
        assert b.prev == a.lsn
        assert a.end_lsn % 8 == 0
        expect = a.end_lsn
        if expect % 8192 == 0:
            expect += header_size(expect)
        assert b.lsn == expect, (hex(a.lsn), hex(a.end_lsn), hex(b.lsn))
    switches = [r for r in records if r.rmid == RmgrId.XLOG and r.info & 0xF0 == 0x40]
    assert len(switches) == 1
    assert switches[0].end_lsn % SEG == 0
    assert any(r.lsn >> 13 != (r.lsn + r.tot_len - 1) >> 13 for r in records)


def test_every_image_restores_to_a_page() -> None:
    images = [b for r in all_records() for b in r.blocks if b.has_image]
    assert len(images) > 500
    for block in images:
        page = block.page()
        assert len(page) == 8192
        # pd_lower/pd_upper of the restored page bracket the hole (standard pages).
        if block.hole_length:
            lower, upper = struct.unpack_from("<HH", page, 12)
            assert lower == block.hole_offset
            assert upper == block.hole_offset + block.hole_length


def test_records_carry_block_refs_and_main_data() -> None:
    heap_inserts = [r for r in all_records() if r.rmid == RmgrId.HEAP and r.info & 0x70 == 0]
    assert heap_inserts
    for r in heap_inserts:
        assert len(r.blocks) == 1
        # The tuple, unless an image for redo replaces it (XLogRecordAssemble drops block
        # data when it takes a backup image without REGBUF_KEEP_DATA).
        assert r.blocks[0].has_data != r.blocks[0].apply_image
        # wal_consistency_checking (XLR_CHECK_CONSISTENCY in xl_info) forces an image.
        if r.info & 0x02:
            assert r.blocks[0].has_image
        assert len(r.main_data) == 3  # xl_heap_insert: offnum u16 + flags u8
        assert r.blocks[0].relnode != 0
        assert r.xid != 0
    assert any(r.info & 0x02 for r in heap_inserts)


def test_stream_from_a_page_start_skips_the_continued_record() -> None:
    """Starting at the page after a page-crossing record skips its tail (xlp_rem_len)."""
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    decoder = WalStreamDecoder(Lsn(page), SEG)
    decoder.feed(stream_bytes(page))
    got = [r.lsn for r in decoder]
    assert got == [r.lsn for r in all_records() if r.lsn >= page]


@pytest.mark.parametrize("shift", [0, 3, 8, 100])
def test_stream_from_mid_page_starts_at_first_record_at_or_after_start(shift: int) -> None:
    """A stream that starts mid-page (at a record start or mid-record) yields exactly the
    records that begin at or after its start."""
    records = all_records()
    for rec in (records[40], record_spanning_pages(), records[-30]):
        start = rec.lsn + shift
        if start % 8192 == 0:
            continue
        decoder = WalStreamDecoder(Lsn(start), SEG)
        decoder.feed(stream_bytes(start))
        got = [r.lsn for r in decoder]
        assert got == [r.lsn for r in records if r.lsn >= start], hex(start)


def test_stream_at_a_known_record_start_decodes_without_looking_ahead() -> None:
    """With at_record_start, the records of the first partial page come out at once."""
    records = all_records()
    rec = records[-4]  # mid-page, near the end of the WAL: the next page never arrives
    decoder = WalStreamDecoder(Lsn(rec.lsn), SEG, at_record_start=True)
    decoder.feed(stream_bytes(rec.lsn))
    assert [r.lsn for r in decoder] == [r.lsn for r in records[-4:]]
    without = WalStreamDecoder(Lsn(rec.lsn), SEG)
    without.feed(stream_bytes(rec.lsn))
    assert without.poll() is None  # waits for the next page header to find its footing
    with pytest.raises(UserError, match="8-byte aligned"):
        WalStreamDecoder(Lsn(rec.lsn + 4), SEG, at_record_start=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=20000), min_size=1, max_size=60),
       st.integers(min_value=0, max_value=1000))
def test_random_chunks_decode_like_whole_files(sizes: list[int], start_index: int) -> None:
    """Feeding the stream in random-sized chunks gives the same records as reading files."""
    records = all_records()
    window = records[start_index:start_index + 30]  # ~100 KB, some of it across pages
    start = window[0].lsn
    data = stream_bytes(start)[:window[-1].end_lsn - start]
    decoder = WalStreamDecoder(Lsn(start), SEG)
    got: list[DecodedRecord] = []
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        i += 1
        decoder.feed(data[pos:pos + n])
        pos += n
        got.extend(decoder)
    expect = list(window)
    assert [(r.lsn, r.end_lsn, r.tot_len) for r in got] == \
        [(r.lsn, r.end_lsn, r.tot_len) for r in expect]
    assert got == expect  # every field, block ref, image and data byte


def test_truncated_stream_waits_for_more_data_and_never_yields_garbage() -> None:
    rec = record_spanning_pages()
    start = BASE  # a segment start: the decoder can begin without looking ahead
    decoder = WalStreamDecoder(Lsn(start), SEG)
    cut = rec.lsn + rec.tot_len - 5  # stop inside the page-crossing record
    decoder.feed(wal_bytes()[start - BASE:cut - BASE])
    got = list(decoder)
    assert got[-1].end_lsn <= rec.lsn
    assert decoder.poll() is None
    assert decoder.has_partial_record()
    decoder.feed(wal_bytes()[cut - BASE:cut - BASE + 16384])
    assert decoder.poll() == rec


def test_truncated_segment_file(tmp_path: Path) -> None:
    write_segments(tmp_path, wal_bytes())
    last = sorted(tmp_path.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(CorruptionError, match=r"has 5000 bytes, expected 1048576"):
        list(read_wal_files(tmp_path))


def test_wal_ending_mid_record_is_an_error(tmp_path: Path) -> None:
    """The record that crosses into the missing next segment is reported by its LSN."""
    crossing = next(r for r in all_records() if r.lsn >> 20 != (r.end_lsn - 1) >> 20)
    write_segments(tmp_path, wal_bytes(), count=(crossing.lsn - BASE) // SEG + 1)
    with pytest.raises(CorruptionError, match=f"WAL ends mid-record at {Lsn(crossing.lsn)}"):
        list(read_wal_files(tmp_path))


def _expect_error(data: bytearray, start: int, match: str) -> None:
    decoder = WalStreamDecoder(Lsn(start), SEG)
    decoder.feed(data[start - BASE:all_records()[-1].end_lsn - BASE])
    with pytest.raises(CorruptionError, match=match):
        list(decoder)


def test_corrupted_crc_names_the_record() -> None:
    rec = all_records()[100]
    data = wal_bytes()
    data[rec.lsn - BASE + rec.tot_len - 1] ^= 0x40
    _expect_error(data, BASE,
                  rf"invalid WAL at {Lsn(rec.lsn)}: incorrect resource manager data checksum")


def test_wrong_magic_names_the_page() -> None:
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    data = wal_bytes()
    struct.pack_into("<H", data, page - BASE, 0xD10D)
    _expect_error(data, BASE, rf"at {Lsn(page)}: page header has magic 0xd10d")


def test_wrong_page_address_names_the_page() -> None:
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    data = wal_bytes()
    struct.pack_into("<Q", data, page - BASE + 8, page + 8192)
    _expect_error(data, BASE,
                  rf"at {Lsn(page)}: page header has address {Lsn(page + 8192)}")


def test_record_torn_across_a_missing_page() -> None:
    """A stream that lost the page after a record's first part: the next page's header
    shows up where the lost page should be."""
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    data = wal_bytes()
    del data[page - BASE:page - BASE + 8192]
    _expect_error(data, BASE, rf"at {Lsn(page)}: page header has address")


def test_other_timeline_is_refused() -> None:
    rec = all_records()[200]
    page = rec.lsn & ~8191
    data = wal_bytes()
    struct.pack_into("<I", data, page - BASE + 4, 2)
    _expect_error(data, BASE, "timeline 1 only")


def test_other_timeline_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "000000020000000000000006").write_bytes(b"\0" * SEG)
    with pytest.raises(UserError, match="timeline 1 only"):
        list(read_wal_files(tmp_path))


def test_missing_contrecord_flag() -> None:
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    data = wal_bytes()
    info = struct.unpack_from("<H", data, page - BASE + 2)[0]
    struct.pack_into("<H", data, page - BASE + 2, info & ~1)
    _expect_error(data, BASE, rf"at {Lsn(page)}: there is no contrecord flag")


def test_wrong_contrecord_length() -> None:
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    data = wal_bytes()
    rem = struct.unpack_from("<I", data, page - BASE + 16)[0]
    struct.pack_into("<I", data, page - BASE + 16, rem + 8)
    _expect_error(data, BASE, rf"at {Lsn(page)}: invalid contrecord length")


def test_bad_record_length_and_rmgr() -> None:
    rec = all_records()[50]
    data = wal_bytes()
    struct.pack_into("<I", data, rec.lsn - BASE, 12)
    _expect_error(data, BASE,
                  rf"at {Lsn(rec.lsn)}: invalid record length: .*got xl_tot_len 12")
    data = wal_bytes()
    data[rec.lsn - BASE + 17] = 99
    _expect_error(data, BASE,
                  rf"at {Lsn(rec.lsn)}: invalid resource manager ID 99")


def _fix_crc(data: bytearray, lsn: int, tot_len: int) -> None:
    off = lsn - BASE
    crc = google_crc32c.extend(google_crc32c.value(bytes(data[off + 24:off + tot_len])),
                               bytes(data[off:off + 20]))
    struct.pack_into("<I", data, off + 20, crc)


def test_block_lengths_that_disagree_with_the_record_length() -> None:
    """A record with a valid CRC whose block header claims more data than the record holds
    fails DecodeXLogRecord's length checks (not an IndexError, not garbage)."""
    rec = next(r for r in all_records()[10:] if r.blocks and r.blocks[0].has_data
               and r.lsn >> 13 == (r.lsn + r.tot_len - 1) >> 13)
    data = wal_bytes()
    off = rec.lsn - BASE
    assert data[off + 24] == 0  # block_id 0
    data_len = struct.unpack_from("<H", data, off + 26)[0]
    struct.pack_into("<H", data, off + 26, data_len + 1000)
    _fix_crc(data, rec.lsn, rec.tot_len)
    _expect_error(data, BASE, rf"at {Lsn(rec.lsn)}: record with invalid length")


def test_wrong_prev_link() -> None:
    rec = all_records()[60]
    data = wal_bytes()
    struct.pack_into("<Q", data, rec.lsn - BASE + 8, rec.prev - 8)
    _fix_crc(data, rec.lsn, rec.tot_len)
    _expect_error(data, BASE, rf"at {Lsn(rec.lsn)}: record with incorrect prev")


def test_file_errors_name_the_segment_file_and_offset(tmp_path: Path) -> None:
    rec = all_records()[-3]  # in the last segment
    data = wal_bytes()
    data[rec.lsn - BASE + 30] ^= 0x10
    write_segments(tmp_path, data)
    name = Lsn(rec.lsn).segment_file_name(1, SEG)
    with pytest.raises(CorruptionError, match=rf"invalid WAL at {Lsn(rec.lsn)}: .* "
                       rf"\(file {tmp_path / name}, offset {rec.lsn % SEG}\)"):
        list(read_wal_files(tmp_path))


def test_zeroed_page_between_records_is_the_end_of_wal(tmp_path: Path) -> None:
    """The segment after the XLOG SWITCH is zeroed (never written): reading stops cleanly."""
    records = all_records()
    switch = next(i for i, r in enumerate(records) if r.rmid == 0 and r.info & 0xF0 == 0x40)
    data = wal_bytes()
    cut = records[switch].end_lsn
    data[cut - BASE:] = bytes(len(data) - (cut - BASE))
    got = list(read_wal_files(write_segments(tmp_path, data)))
    assert got == list(records[:switch + 1])


def test_zeroed_page_inside_a_record_is_wal_ending_mid_record(tmp_path: Path) -> None:
    rec = record_spanning_pages()
    page = (rec.lsn | 8191) + 1
    data = wal_bytes()
    data[page - BASE:] = bytes(len(data) - (page - BASE))
    with pytest.raises(CorruptionError, match=rf"at {Lsn(page)}: WAL ends mid-record"):
        list(read_wal_files(write_segments(tmp_path, data)))


def test_zeroed_tail_is_the_end_of_wal_for_files_but_an_error_for_a_stream(
        tmp_path: Path) -> None:
    records = all_records()
    cut = records[300]
    data = wal_bytes()
    data[cut.lsn - BASE:] = bytes(len(data) - (cut.lsn - BASE))
    got = list(read_wal_files(write_segments(tmp_path, data)))
    assert [r.lsn for r in got] == [r.lsn for r in records[:300]]
    _expect_error(data, records[0].lsn, rf"at {Lsn(cut.lsn)}: invalid record length")


def test_start_and_end_bounds(tmp_path: Path) -> None:
    records = all_records()
    write_segments(tmp_path, wal_bytes())
    got = list(read_wal_files(tmp_path, Lsn(records[10].lsn), Lsn(records[20].lsn)))
    assert [r.lsn for r in got] == [r.lsn for r in records[10:20]]
    for i in (-5, -4, -30):  # just after a long page header, mid-page, another segment
        got = list(read_wal_files(sorted(tmp_path.iterdir())[1:], Lsn(records[i].lsn)))
        assert [r.lsn for r in got] == [r.lsn for r in records[i:]]
    got = list(read_wal_files(tmp_path, Lsn(records[7].lsn + 4)))  # mid-record
    assert [r.lsn for r in got] == [r.lsn for r in records[8:]]


def _in_page_record_bytes() -> list[tuple[int, bytes]]:
    """(lsn, bytes) of the fixture's records that lie within one page."""
    data = _fixture()[2]
    return [(r.lsn, data[r.lsn - BASE:r.lsn - BASE + r.tot_len]) for r in all_records()
            if r.lsn >> 13 == (r.lsn + r.tot_len - 1) >> 13]


def _general(lsn: int, rec: bytes) -> DecodedRecord:
    tot_len, xid, prev, info, rmid, _crc = walreader._RECORD_HEADER.unpack_from(rec, 0)
    return walreader._decode_general(lsn, rec, tot_len, xid, prev, info, rmid)


def _with_crc(rec: bytes | bytearray) -> bytes:
    out = bytearray(rec)
    struct.pack_into("<I", out, 20, google_crc32c.extend(google_crc32c.value(bytes(out[24:])),
                                                         bytes(out[:20])))
    return bytes(out)


@cache
def _usual_records() -> tuple[tuple[int, bytes], ...]:
    """The fixture's records that `decode_record` decodes with one unpack (one block,
    compressed image with a hole): without `_decode_general`, they still decode."""
    usual = []
    records = _in_page_record_bytes()
    general = walreader._decode_general
    try:
        walreader._decode_general = None  # type: ignore[assignment]
        for lsn, rec in records:
            try:
                walreader.decode_record(lsn, rec)
            except TypeError:  # it called _decode_general
                continue
            usual.append((lsn, rec))
    finally:
        walreader._decode_general = general
    return tuple(usual)


def test_the_usual_records_take_the_one_unpack_path_and_decode_as_the_general_path() -> None:
    usual = _usual_records()
    assert len(usual) > len(all_records()) // 4, (len(usual), len(all_records()))
    for lsn, rec in usual:
        assert walreader.decode_record(lsn, rec) == _general(lsn, rec)


def _decoded_or_error(decode: Callable[[int, bytes], DecodedRecord], lsn: int,
                      rec: bytes) -> DecodedRecord | str:
    try:
        return decode(lsn, rec)
    except walreader.WalCorruption as err:
        return str(err)


def test_the_one_unpack_path_and_the_general_path_agree_on_every_bit_flip() -> None:
    """Each bit of a usual record's block, image, rel and main data headers flipped, and
    each pair of bytes zeroed (the CRC made right again): `decode_record` decodes or fails
    as the general path does."""
    usual = _usual_records()
    one = [(lsn, rec) for lsn, rec in usual if rec[walreader._USUAL_END - 2] == 0xFF]
    two = [(lsn, rec) for lsn, rec in usual if rec[walreader._USUAL_END - 2] == 1]
    assert one and two, (len(one), len(two))
    for lsn, rec in one[:3] + two[:3]:
        for at in range(walreader.SIZE_OF_XLOG_RECORD, walreader._TWO_END):
            for bit in range(9):
                buf = bytearray(rec)
                if bit < 8:
                    buf[at] ^= 1 << bit
                else:
                    buf[at:at + 2] = b"\0\0"
                damaged = _with_crc(buf)
                assert _decoded_or_error(walreader.decode_record, lsn, damaged) == \
                    _decoded_or_error(_general, lsn, damaged), (at, bit)


@given(st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_one_unpack_path_decodes_or_fails_as_the_general_path(data: st.DataObject) -> None:
    """Damage the headers of a usual record (block, image, rel, main data headers and
    lengths; the CRC made right again): `decode_record` returns what the general path
    returns, or raises the same error."""
    lsn, rec = data.draw(st.sampled_from(_usual_records()))
    buf = bytearray(rec)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(walreader.SIZE_OF_XLOG_RECORD, walreader._TWO_END - 1))
        buf[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 2))  # a shorter record too (xl_tot_len follows)
    del buf[len(buf) - cut:]
    struct.pack_into("<I", buf, 0, len(buf))
    damaged = _with_crc(buf)
    assert _decoded_or_error(walreader.decode_record, lsn, damaged) == \
        _decoded_or_error(_general, lsn, damaged)

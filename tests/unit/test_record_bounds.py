"""The record-boundary tracker finds exactly the record ends `strata.pg.walreader` finds: on
real PostgreSQL 15 WAL (the walreader fixture, which ends with an XLOG_SWITCH) and on the
simulator's generated WAL, whatever the chunking; damaged headers are refused."""

from __future__ import annotations

import bisect
import random
from functools import cache
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.walgen import WalGenerator
from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.pg.walreader import WalStreamDecoder
from strata.safekeeper.record_bounds import RecordBoundaryTracker, scan_record_bounds

FIXTURE = Path(__file__).parent / "data" / "walreader_1mb.zst"


@cache
def real_wal() -> tuple[int, int, bytes, tuple[tuple[int, int], ...]]:
    """(segment size, first LSN, bytes, ((record lsn, record end), ...)) of the fixture."""
    raw = zstandard.ZstdDecompressor().decompress(FIXTURE.read_bytes(),
                                                  max_output_size=1 << 26)
    head, _, data = raw.partition(b"\n")
    first, seg_text, _count = head.decode().split()
    seg = int(seg_text)
    base = int(first[16:], 16) * seg
    decoder = WalStreamDecoder(Lsn(base), seg, zero_is_end=True)
    decoder.feed(data)
    bounds = tuple((r.lsn, r.end_lsn) for r in decoder)
    return seg, base, data[:bounds[-1][1] - base], bounds


def expected_after(bounds: tuple[tuple[int, int], ...], ends: list[int], fed_end: int,
                   floor: tuple[int, int]) -> tuple[int, int]:
    """(end, lsn) of the last record whose padded end has been fed."""
    i = bisect.bisect_right(ends, fed_end)
    return (bounds[i - 1][1], bounds[i - 1][0]) if i else floor


def check_chunked(seg: int, start: tuple[int, int], data: bytes, base: int,
                  bounds: tuple[tuple[int, int], ...], sizes: list[int]) -> None:
    start_end, start_lsn = start
    tracker = RecordBoundaryTracker(start_end, start_lsn, seg)
    off = start_end - base
    later = tuple(b for b in bounds if b[1] > start_end)
    ends = [end for _lsn, end in later]
    i = 0
    while off < len(data):
        size = sizes[i % len(sizes)]
        i += 1
        tracker.feed(data[off:off + size])
        off = min(off + size, len(data))
        want = expected_after(later, ends, base + off, (start_end, start_lsn))
        assert (tracker.last_record_end, tracker.last_record_lsn) == want, (base + off, want)
    assert tracker.last_record_end == bounds[-1][1]
    assert not tracker.in_record()


def test_real_wal_record_ends_match_the_reader() -> None:
    """Every record end of real WAL (spanning pages, segments, and an XLOG_SWITCH tail)."""
    seg, base, data, bounds = real_wal()
    lsn, end = bounds[0]
    assert any(b[1] % seg == 0 for b in bounds), "fixture lacks a switch record"
    check_chunked(seg, (end, lsn), data, base, bounds, [8192])
    check_chunked(seg, (end, lsn), data, base, bounds, [1, 7, 13, 4000, 50_000, 100_000])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(100, 20_000), min_size=1, max_size=5), st.integers(0, 200))
def test_real_wal_any_chunking_any_start(sizes: list[int], start_index: int) -> None:
    seg, base, data, bounds = real_wal()
    lsn, end = bounds[start_index % len(bounds)]
    check_chunked(seg, (end, lsn), data, base, bounds, sizes)


@pytest.mark.parametrize("seed", range(5))
def test_generated_wal_matches_the_reader(seed: int) -> None:
    """The simulator's WAL generator writes WAL the reader accepts, from a mid-page start."""
    rng = random.Random(seed)
    seg = 1 << 20
    start = seg - 3 * 8192 + 8 * rng.randrange(10, 900)
    gen = WalGenerator(start, start - 200, seg)
    pieces = [gen.random_record(rng) for _ in range(300)]
    data = b"".join(p for _s, p in pieces)
    decoder = WalStreamDecoder(Lsn(start), seg, at_record_start=True)
    decoder.feed(data)
    bounds = tuple((r.lsn, r.end_lsn) for r in decoder)
    assert [b[0] for b in bounds] == [s for s, _p in pieces]
    assert bounds[-1][1] == gen.end_lsn
    check_chunked(seg, (start, start - 200), data, start, bounds,
                  [rng.randrange(1, 9000) for _ in range(7)])
    assert scan_record_bounds(start, start - 200, data, seg) == (gen.end_lsn, pieces[-1][0])
    # A partial record at the tail is not counted.
    tail = scan_record_bounds(start, start - 200, data[:-9], seg)
    assert tail == (bounds[-2][1], bounds[-2][0])


def test_damaged_headers_are_refused() -> None:
    seg = 1 << 20
    gen = WalGenerator(seg + 40, seg - 100, seg)
    data = b"".join(gen.record(bytes(3000))[1] for _ in range(6))
    page_off = 8192 - 40  # the page header of the second page
    cases = {
        "magic": (page_off, b"\x00\x00"),
        "says it is at": (page_off + 8, b"\x01"),
        "continues a record": (page_off + 16, b"\x00\x00"),
        "xl_tot_len": (0, b"\x01\x00\x00\x00"),
    }
    for what, (at, patch) in cases.items():
        bad = bytearray(data)
        bad[at:at + len(patch)] = patch
        with pytest.raises(CorruptionError, match=what):
            scan_record_bounds(seg + 40, seg - 100, bytes(bad), seg)

"""The pageserver's WAL log: PostgreSQL-named segments, exact bytes, reopen finds the end,
gaps are refused, and trimming removes only whole segments below the cut."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import Lsn
from strata.pageserver.wal_log import WalLog

SEG = 1 << 20  # the smallest segment size PostgreSQL allows, to cross segments cheaply


def payload(start: int, n: int) -> bytes:
    """Bytes that depend on their LSN, so misplaced bytes are caught."""
    return bytes((start + i) * 7 % 251 for i in range(n))


def test_append_fsync_read_and_segment_names(tmp_path: Path) -> None:
    start = Lsn(0x1_0000_0000 + 3 * SEG - 100)  # crosses from segment 2 into 3 of xlogid 1
    wal = WalLog.create(tmp_path, start, seg_size=SEG)
    data = payload(start.value, 300)
    wal.append(start, data[:120])
    wal.append(start + 120, data[120:])
    assert wal.end_lsn == start + 300
    assert wal.flush_lsn == start
    assert wal.fsync() == start + 300
    assert wal.flush_lsn == start + 300
    assert wal.read(start, start + 300) == data
    assert wal.read(start + 50, start + 250) == data[50:250]
    # Laid out as in pg_wal: 4096 segments of 1 MB per xlogid.
    names = sorted(p.name for p in tmp_path.iterdir() if len(p.name) == 24)
    assert names == ["000000010000000100000002", "000000010000000100000003"]
    with open(tmp_path / names[0], "rb") as f:
        f.seek(SEG - 100)
        assert f.read() == data[:100]
    assert (tmp_path / names[1]).read_bytes() == data[100:]
    wal.close()


def test_gap_and_overlap_are_refused(tmp_path: Path) -> None:
    wal = WalLog.create(tmp_path, Lsn(1000), seg_size=SEG)
    wal.append(Lsn(1000), b"x" * 10)
    with pytest.raises(UserError, match="without gaps"):
        wal.append(Lsn(1011), b"y")
    with pytest.raises(UserError, match="without gaps"):
        wal.append(Lsn(1009), b"y")
    with pytest.raises(UserError, match="not in the log"):
        wal.read(Lsn(999), Lsn(1005))
    with pytest.raises(UserError, match="not in the log"):
        wal.read(Lsn(1005), Lsn(1011))
    with pytest.raises(UserError, match="already exists"):
        WalLog.create(tmp_path, Lsn(0), seg_size=SEG)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3 * SEG), st.lists(st.integers(1, SEG // 2), min_size=1, max_size=8),
       st.integers(0, 7))
def test_reopen_finds_the_end(tmp_path_factory: pytest.TempPathFactory, start: int,
                              sizes: list[int], fsync_after: int) -> None:
    directory = tmp_path_factory.mktemp("wal")
    wal = WalLog.create(directory, Lsn(start), seg_size=SEG)
    pos = start
    for i, n in enumerate(sizes):
        wal.append(Lsn(pos), payload(pos, n))
        pos += n
        if i == fsync_after:
            wal.fsync()
    wal.close()  # a process crash: written bytes survive without the final fsync
    again = WalLog.open(directory)
    assert again.start_lsn == Lsn(start)
    assert again.end_lsn == Lsn(pos)
    assert again.read(Lsn(start), Lsn(pos)) == payload(start, pos - start)
    again.append(Lsn(pos), b"more")
    again.fsync()
    assert again.read(Lsn(pos), Lsn(pos + 4)) == b"more"
    again.close()


def test_empty_log_reopens_at_its_start(tmp_path: Path) -> None:
    WalLog.create(tmp_path, Lsn(5 * SEG + 40), seg_size=SEG).close()
    wal = WalLog.open(tmp_path)
    assert (wal.start_lsn, wal.end_lsn, wal.flush_lsn) == (Lsn(5 * SEG + 40),) * 3


def test_remove_below_keeps_segments_holding_needed_bytes(tmp_path: Path) -> None:
    start = 2 * SEG + 8
    wal = WalLog.create(tmp_path, Lsn(start), seg_size=SEG)
    end = 5 * SEG + 100
    data = payload(start, end - start)
    wal.append(Lsn(start), data)
    # Not yet durable: nothing may be dropped above the flush point.
    assert wal.remove_below(Lsn(end)) == 0
    wal.fsync()
    assert wal.remove_below(Lsn(3 * SEG - 1)) == 0  # segment 2 still holds 3*SEG-1
    assert wal.remove_below(Lsn(4 * SEG + 5)) == 2  # segments 2 and 3
    assert wal.start_lsn == Lsn(4 * SEG)
    assert wal.read(Lsn(4 * SEG), Lsn(end)) == data[4 * SEG - start:]
    with pytest.raises(UserError):
        wal.read(Lsn(4 * SEG - 1), Lsn(4 * SEG))
    wal.close()
    again = WalLog.open(tmp_path)
    assert (again.start_lsn, again.end_lsn) == (Lsn(4 * SEG), Lsn(end))


def test_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    wal = WalLog.create(tmp_path, Lsn(0), seg_size=SEG)
    wal.append(Lsn(0), bytes(3 * SEG + 1))
    wal.fsync()
    wal.close()
    os.unlink(wal.segment_path(1))
    with pytest.raises(CorruptionError, match="not contiguous"):
        WalLog.open(tmp_path)


def test_short_middle_segment_is_corruption(tmp_path: Path) -> None:
    wal = WalLog.create(tmp_path, Lsn(0), seg_size=SEG)
    wal.append(Lsn(0), bytes(2 * SEG + 1))
    wal.close()
    os.truncate(wal.segment_path(0), SEG - 8)
    with pytest.raises(CorruptionError, match="expected"):
        WalLog.open(tmp_path)


def test_bad_segment_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="power of two"):
        WalLog.create(tmp_path, Lsn(0), seg_size=3 << 20)


def test_publish_moves_flush_without_fsync_and_sync_all(tmp_path: Path) -> None:
    start = Lsn(2 * SEG - 50)
    wal = WalLog.create(tmp_path, start, seg_size=SEG)
    data = payload(start.value, SEG + 200)  # from segment 1 across 2 into 3
    fds_before = len(os.listdir("/proc/self/fd"))
    wal.append(start, data)
    assert wal.flush_lsn == start
    assert wal.publish() == start + len(data)
    assert wal.flush_lsn == wal.end_lsn == start + len(data)
    # The finished segments' descriptors are closed; only the open one is left.
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    assert wal.read(start, wal.end_lsn) == data
    assert wal.sync_all() == start + len(data)
    wal.close()
    reopened = WalLog.open(tmp_path)
    assert reopened.end_lsn == start + len(data)
    assert reopened.read(start, reopened.end_lsn) == data
    reopened.close()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
       reads=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=20))
def test_reads_of_the_in_memory_tail_equal_the_files(
        tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
        reads: list[tuple[float, float]]) -> None:
    directory = tmp_path_factory.mktemp("wal")
    start = Lsn(SEG - 7000)  # the appends cross into the next segment
    wal = WalLog.create(directory, start, seg_size=SEG)
    wal.tail_bytes = 5000  # so that most reads reach below the tail
    pos = start
    for n in sizes:
        wal.append(pos, payload(pos.value, n))
        pos += n
    reopened = WalLog.open(directory)  # reads only the files
    total = pos - start
    for a, b in reads:
        lo, hi = sorted((int(a * total), int(b * total)))
        want = payload(start.value + lo, hi - lo)
        assert wal.read(start + lo, start + hi) == want
        assert reopened.read(start + lo, start + hi) == want
    wal.close()
    reopened.close()


def test_the_last_appends_are_read_from_memory(tmp_path: Path) -> None:
    start = Lsn(SEG)
    wal = WalLog.create(tmp_path, start, seg_size=SEG)
    data = payload(start.value, 5000)
    wal.append(start, data)
    # Damage the file behind the log's back: the tail still serves the appended bytes,
    # a log reopened from the files sees the damage.
    with open(wal.segment_path(1), "r+b") as f:
        f.write(b"\0" * 100)
    assert wal.read(start + 10, start + 200) == data[10:200]
    reopened = WalLog.open(tmp_path)
    assert reopened.read(start + 10, start + 200) == bytes(90) + data[100:200]
    reopened.close()
    wal.close()

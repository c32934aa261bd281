"""Safekeeper WAL storage and restart: segment files, truncation, removal, the end of valid
WAL after a crash, damage below the commit LSN, and a `Timeline` rebuilt from its files.
Preallocation itself (prepared segments, a crash while preparing, a truncation that must
not come back): test_sk_wal_storage_prealloc.py."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from sim.walgen import SYSID, WalGenerator
from strata.common.errors import CorruptionError, NotFound
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, segment_file_name
from strata.safekeeper import control_file
from strata.safekeeper.acceptor import AcceptorState
from strata.safekeeper.messages import (
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    TermEntry,
    VoteRequest,
    decode,
)
from strata.safekeeper.timeline import Timeline
from strata.safekeeper.wal_storage import PREPARED_SUFFIX, WalStorage

SEG = 1 << 20
START = Lsn(3 * SEG + 40)
PREV = Lsn(3 * SEG - 64)


def generate(n: int, seed: int = 0, size: int = 0) -> tuple[bytes, list[int]]:
    """`n` records of WAL from START and their end LSNs."""
    gen = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(seed)
    out = bytearray()
    ends = []
    for _ in range(n):
        _, data = gen.record(rng.randbytes(size)) if size else gen.random_record(rng)
        out += data
        ends.append(gen.end_lsn)
    return bytes(out), ends


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if len(p.name) == 24)


def test_write_read_reopen_across_segments(tmp_path: Path) -> None:
    """WAL lands at its offsets in PostgreSQL-named 1 MB segments, each full size (zeros
    before the timeline start and after the WAL); reads return it; a reopen knows only an
    upper bound of the end (the last segment's end), decoding finds the same end, and the
    cut there leaves the files as they were."""
    wal, _ = generate(300, size=9000)
    storage = WalStorage(tmp_path, SEG, START)
    assert (storage.wal_start_lsn, storage.end_lsn) == (START, START)
    pos = START
    for i in range(0, len(wal), 70_000):
        storage.write(pos, wal[i:i + 70_000])
        pos += len(wal[i:i + 70_000])
    storage.flush()
    end = START + len(wal)
    assert storage.end_lsn == end
    assert segments(tmp_path) == [segment_file_name(n, 1, SEG)
                                  for n in range(START.segno(SEG), end.segno(SEG) + 1)]
    assert all((tmp_path / name).stat().st_size == SEG for name in segments(tmp_path))
    first = (tmp_path / segment_file_name(3, 1, SEG)).read_bytes()
    assert first[:40] == bytes(40) and first[40:200] == wal[:160]
    last = (tmp_path / segment_file_name(end.segno(SEG), 1, SEG)).read_bytes()
    assert last[end.segment_offset(SEG):] == bytes(SEG - end.segment_offset(SEG))
    assert storage.read(START + 12345, START + 2_000_000) == wal[12345:2_000_000]
    storage.close()
    again = WalStorage(tmp_path, SEG, START)
    assert (again.wal_start_lsn, again.end_lsn) == (START, Lsn((end.segno(SEG) + 1) * SEG))
    assert again.find_valid_end(START, SYSID) == end
    assert again.truncate(end).zeroed_bytes == 0  # nothing but zeros after the WAL
    assert again.end_lsn == end
    assert again.read(START, end) == wal
    again.close()


def test_flush_fdatasyncs_each_written_segment_and_the_new_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flush` makes every segment written since the last one durable with fdatasync (its
    bytes; the size never changes), and fsyncs the directory (only) when a segment was
    renamed into place; a flush with nothing written syncs nothing. (The zero-fill of a
    new segment fdatasyncs its `.___prepared` file, before the rename: not counted.)"""
    synced: list[tuple[str, str]] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def name(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fdatasync(fd: int) -> None:
        if not name(fd).endswith(PREPARED_SUFFIX):
            synced.append(("fdatasync", name(fd)))
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        synced.append(("fsync", name(fd)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, b"x" * (SEG - 40 + 100))  # the rest of segment 3, 100 B of 4
    storage.flush()
    assert synced == [("fdatasync", segment_file_name(3, 1, SEG)),
                      ("fdatasync", segment_file_name(4, 1, SEG)),
                      ("fsync", tmp_path.name)]
    synced.clear()
    storage.write(storage.end_lsn, b"y" * 100)
    storage.flush()
    assert synced == [("fdatasync", segment_file_name(4, 1, SEG))]
    synced.clear()
    storage.flush()
    assert synced == []
    storage.close()
    again = WalStorage(tmp_path, SEG, START)
    assert again.find_valid_end(START, SYSID) == START  # b"x" is no WAL: it ends at once
    ys = START + SEG - 40 + 100
    assert again.read(ys - 1, ys + 101) == b"x" + b"y" * 100 + b"\0"
    again.close()


def test_truncate_cuts_the_segment_and_removes_later_ones(tmp_path: Path) -> None:
    """A cut zeroes the rest of its segment (the file keeps its full size) and removes the
    later segments."""
    wal, ends = generate(300, size=9000)
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, wal)
    cut = Lsn(ends[120])  # in the second segment
    assert cut.segno(SEG) == 4
    done = storage.truncate(cut)
    assert done.zeroed_bytes == SEG - cut.segment_offset(SEG)  # WAL went on after segment 4
    assert done.segments_removed == (START + len(wal)).segno(SEG) - 4
    assert storage.end_lsn == cut
    assert segments(tmp_path) == [segment_file_name(n, 1, SEG) for n in (3, 4)]
    kept = (tmp_path / segment_file_name(4, 1, SEG)).read_bytes()
    assert len(kept) == SEG
    assert kept[:cut.segment_offset(SEG)] == wal[4 * SEG - START.value:cut - START]
    assert kept[cut.segment_offset(SEG):] == bytes(SEG - cut.segment_offset(SEG))
    storage.write(cut, wal[cut - START:])  # writing goes on from the cut
    storage.flush()
    storage.close()
    assert WalStorage(tmp_path, SEG, START).read(START, START + len(wal)) == wal


@pytest.mark.parametrize("tail", ["zeros", "garbage", "partial-record", "half-page-header"])
def test_valid_end_after_a_torn_write(tmp_path: Path, tail: str) -> None:
    """Bytes after the last complete, CRC-valid record are not WAL: a zero-filled or
    garbage tail, a record cut short, or a page header cut short."""
    wal, ends = generate(200, seed=1)
    last = Lsn(ends[150])
    nxt = Lsn(ends[151])
    extra = {"zeros": bytes(5000), "garbage": random.Random(5).randbytes(3000),
             "partial-record": wal[last - START:nxt - START - 1],
             "half-page-header": b""}[tail]
    data = wal[:last - START] + extra
    if tail == "half-page-header":
        page_end = (last.value | 8191) + 1
        data = wal[:page_end - START.value + 10]
        last = Lsn(max(e for e in ends if e <= page_end))
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, data)
    assert storage.find_valid_end(START, SYSID) == last


def test_invalid_wal_below_the_durable_commit_is_corruption(tmp_path: Path) -> None:
    """A damaged record below the durable commit LSN is refused naming the segment file
    and offset; the same damage above it is only the end of the WAL."""
    wal, ends = generate(200, seed=2)
    damaged = bytearray(wal)
    at = ends[100] - START.value + 30  # inside record 101
    damaged[at] ^= 0x10
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, bytes(damaged))
    assert storage.find_valid_end(Lsn(ends[99]), SYSID) == Lsn(ends[100])
    with pytest.raises(CorruptionError, match="below the durable commit LSN") as info:
        storage.find_valid_end(Lsn(ends[150]), SYSID)
    assert segment_file_name(3, 1, SEG) in str(info.value)
    assert f"offset {Lsn(ends[100]).segment_offset(SEG)}" in str(info.value)


def test_remove_below_keeps_the_last_segment(tmp_path: Path) -> None:
    """Segments ending at or below the horizon go, the last one never does; reads below
    the new start are NotFound; a reopen starts at the first kept segment and checks the
    WAL from a segment start, mid-record."""
    wal, _ = generate(400, seed=3, size=9000)
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, wal)
    storage.flush()
    end = storage.end_lsn
    assert storage.remove_below(Lsn(5 * SEG + 10)) == 2
    assert storage.wal_start_lsn == Lsn(5 * SEG)
    assert segments(tmp_path)[0] == segment_file_name(5, 1, SEG)
    with pytest.raises(NotFound, match="removed"):
        storage.read(START, START + 10)
    assert storage.remove_below(Lsn(100 * SEG)) == end.segno(SEG) - 5  # all but the last
    assert segments(tmp_path) == [segment_file_name(end.segno(SEG), 1, SEG)]
    storage.close()
    again = WalStorage(tmp_path, SEG, START)
    assert again.wal_start_lsn == end.segment_start(SEG)
    assert again.find_valid_end(end.segment_start(SEG), SYSID) == end
    again.close()


def test_remove_below_keeps_the_segment_of_the_last_byte(tmp_path: Path) -> None:
    """WAL that ends exactly at a segment's end: that segment is kept (it holds the last
    byte), even with the next one in place already."""
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, b"w" * (2 * SEG - 40))  # the WAL ends at the end of segment 4
    storage.flush()
    assert storage.end_lsn == Lsn(5 * SEG)
    assert storage.remove_below(Lsn(5 * SEG)) == 1  # segment 3 only
    assert segments(tmp_path) == [segment_file_name(4, 1, SEG)]
    storage.write(storage.end_lsn, b"v" * 10)  # segment 5 now holds the last byte
    assert storage.remove_below(Lsn(5 * SEG)) == 1
    assert segments(tmp_path) == [segment_file_name(5, 1, SEG)]
    storage.close()


def test_a_missing_segment_ends_the_files(tmp_path: Path) -> None:
    """A segment file after a missing one is beyond a torn end: the files end at the gap,
    and the cut there removes it."""
    wal, _ = generate(400, seed=4, size=9000)
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, wal)
    storage.flush()
    storage.close()
    os.unlink(tmp_path / segment_file_name(5, 1, SEG))
    again = WalStorage(tmp_path, SEG, START)
    assert again.end_lsn == Lsn(5 * SEG)
    end = again.find_valid_end(START, SYSID)
    assert end < Lsn(5 * SEG)  # the record crossing into segment 5 is incomplete
    assert again.truncate(end).segments_removed == 1  # segment 6, after the gap
    again.close()


# --- a timeline rebuilt from its files ------------------------------------------------------
async def elect(tl: Timeline) -> None:
    """Proposer 77 wins term 1 at the timeline start."""
    s = tl.state
    await tl.handle(ProposerGreeting(s.tenant_id, s.timeline_id, SYSID, SEG, 77))
    await tl.handle(VoteRequest(1, 77))
    await tl.handle(ProposerElected(1, START, (TermEntry(1, START, PREV),)))


def elect_and_append(tl: Timeline, wal: bytes, pieces: int) -> AppendResponse:
    term = 1

    async def run() -> AppendResponse:
        await elect(tl)
        step = len(wal) // pieces + 1
        replies: list[bytes] = []
        for i in range(0, len(wal), step):
            replies = await tl.handle(AppendRequest(term, START + i, START, wal[i:i + step]))
        last = decode(replies[-1])
        assert isinstance(last, AppendResponse)
        return last

    return asyncio.run(run())


def test_timeline_restart_recovers_state_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    """After the acceptor appended WAL durably, a restart finds the same term, history and
    WAL end (the segment is full size: decoding finds it); bytes a crash left after the last
    complete record are zeroed in the files."""
    wal, ends = generate(120, seed=6)
    directory = tmp_path / "tl"
    state = AcceptorState.new_timeline(TenantId.generate(), TimelineId.generate(), SYSID, SEG,
                                       START, PREV)
    tl = Timeline.create(directory, state, wal_keep_bytes=0)
    reply = elect_and_append(tl, wal, pieces=7)
    assert reply.flush_lsn == START + len(wal)
    assert reply.last_record_end == Lsn(ends[-1])
    assert tl.counters.wal_fsyncs == 7 and tl.counters.control_writes == 2
    tl.close()

    again = Timeline.open(directory, wal_keep_bytes=0)
    assert again.state == tl.state
    assert again.acceptor.flush_lsn == START + len(wal)
    assert again.acceptor.last_record_end == Lsn(ends[-1])
    assert again.acceptor.last_record_lsn == tl.acceptor.last_record_lsn
    again.close()

    seg = directory / segment_file_name(3, 1, SEG)
    end_offset = (START + len(wal)).segment_offset(SEG)
    torn = wal[ends[50] - START.value:ends[51] - START.value - 3]  # a torn record
    with open(seg, "r+b") as f:
        f.seek(end_offset)
        f.write(torn)
    third = Timeline.open(directory, wal_keep_bytes=0)
    assert third.acceptor.flush_lsn == START + len(wal)
    data = seg.read_bytes()
    assert len(data) == SEG
    assert data[end_offset:] == bytes(SEG - end_offset)
    third.close()


def test_a_batch_of_appends_is_fsynced_once_and_before_a_control_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appends handled as one batch share one WAL fsync and their replies report all of
    it; a control-file write inside the batch (a commit-only append that asks to persist
    the commit LSN) finds the WAL before it already fsynced."""
    wal, ends = generate(60, seed=7)
    state = AcceptorState.new_timeline(TenantId.generate(), TimelineId.generate(), SYSID, SEG,
                                       START, PREV)
    tl = Timeline.create(tmp_path / "tl", state, wal_keep_bytes=0)
    asyncio.run(elect(tl))
    assert tl.counters.wal_fsyncs == 0
    store = control_file.store
    unsynced_at_store: list[int] = []

    def checked_store(directory: Path, new_state: AcceptorState) -> None:
        unsynced_at_store.append(len(tl.wal._dirty))
        store(directory, new_state)

    monkeypatch.setattr(control_file, "store", checked_store)
    half = ends[30] - START.value
    first = [AppendRequest(1, START + i, START, wal[i:min(i + 4000, half)])
             for i in range(0, half, 4000)]
    second = [AppendRequest(1, START + i, Lsn(ends[30]), wal[i:i + 4000])
              for i in range(half, len(wal), 4000)]
    commit_only = AppendRequest(1, START + len(wal), Lsn(ends[30]), b"", persist_commit=True)
    replies = asyncio.run(tl.handle_batch([*first, commit_only, *second]))
    assert tl.counters.wal_fsyncs == 2  # before the control write, and at the end
    assert unsynced_at_store == [0]
    assert tl.state.commit_lsn == Lsn(ends[30])
    last = decode(replies[-1])
    assert isinstance(last, AppendResponse)
    assert last.flush_lsn == START + len(wal)
    assert len(replies) == len(first) + len(second) + 1
    tl.close()

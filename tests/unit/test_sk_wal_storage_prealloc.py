"""Preallocated safekeeper WAL segments: the next segment is zero-filled ahead and renamed
into place by the writer; the end of the WAL is found by decoding, not from the files'
size; a crash while preparing leaves a usable directory; a cut tail never comes back after
a restart, even when the new WAL would chain onto the cut records."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sk_wal_storage import PREV, SEG, START, elect_and_append, generate, segments

from sim.walgen import SYSID
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, segment_file_name
from strata.safekeeper import wal_storage
from strata.safekeeper.acceptor import AcceptorState
from strata.safekeeper.messages import (
    AppendRequest,
    AppendResponse,
    ProposerElected,
    TermEntry,
    VoteRequest,
    decode,
)
from strata.safekeeper.timeline import Timeline
from strata.safekeeper.wal_storage import PREPARED_SUFFIX, WalStorage


def prepared_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(PREPARED_SUFFIX))


def wait_prepared(storage: WalStorage) -> None:
    """Let the worker thread finish the segment it prepares (there is one)."""
    prepared = storage._prepared
    assert prepared is not None
    assert prepared.future.result(timeout=30)


def test_the_next_segment_is_prepared_ahead_and_renamed_into_place(tmp_path: Path) -> None:
    """The first write of a timeline creates its segment itself (none was prepared) and
    starts preparing the next; crossing into it renames the prepared file (no zero-fill in
    the writer) and prepares the one after; an unused prepared file left by close is
    removed by the next open, and is not a segment."""
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, b"a" * 100)
    assert (storage.segments_created, storage.segments_prepared) == (1, 0)
    wait_prepared(storage)
    name4 = segment_file_name(4, 1, SEG)
    assert prepared_files(tmp_path) == [name4 + PREPARED_SUFFIX]
    assert (tmp_path / (name4 + PREPARED_SUFFIX)).read_bytes() == bytes(SEG)
    storage.write(storage.end_lsn, b"b" * SEG)  # into segment 4
    assert (storage.segments_created, storage.segments_prepared) == (1, 1)
    assert segments(tmp_path) == [segment_file_name(3, 1, SEG), name4]
    wait_prepared(storage)
    assert prepared_files(tmp_path) == [segment_file_name(5, 1, SEG) + PREPARED_SUFFIX]
    storage.flush()
    storage.close()
    assert prepared_files(tmp_path) == [segment_file_name(5, 1, SEG) + PREPARED_SUFFIX]
    again = WalStorage(tmp_path, SEG, START)
    assert prepared_files(tmp_path) == []
    assert segments(tmp_path) == [segment_file_name(3, 1, SEG), name4]
    assert again.end_lsn == Lsn(5 * SEG)  # an upper bound: the end of the last segment
    assert again.find_valid_end(START, SYSID) == START  # b"a"... is no WAL
    again.close()


def test_a_new_timeline_has_its_first_segment_and_its_writes_zero_fill_nothing(
        tmp_path: Path) -> None:
    """`Timeline.create` puts the first segment in place (zeros, full size) where it runs
    (a worker thread in the server); appends over two segments then take the prepared
    next one: the writer zero-fills nothing itself."""
    wal, ends = generate(200, seed=16, size=9000)
    assert Lsn(ends[-1]).segno(SEG) == 4
    directory = tmp_path / "tl"
    state = AcceptorState.new_timeline(TenantId.generate(), TimelineId.generate(), SYSID, SEG,
                                       START, PREV)
    tl = Timeline.create(directory, state, wal_keep_bytes=0)
    assert segments(directory) == [segment_file_name(3, 1, SEG)]
    assert (directory / segment_file_name(3, 1, SEG)).read_bytes() == bytes(SEG)
    assert (tl.wal.segments_created, tl.wal.segments_prepared) == (1, 0)
    assert elect_and_append(tl, wal, pieces=5).flush_lsn == Lsn(ends[-1])
    assert (tl.wal.segments_created, tl.wal.segments_prepared) == (1, 1)
    tl.close()


def test_a_failed_preparation_is_done_again_by_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A zero-fill that fails in the worker thread (a full disk, say) is done again by the
    writer when it needs the segment; the failure is logged."""
    real = wal_storage.zero_fill

    def failing_in_the_thread(path: Path, size: int, cancel: threading.Event | None = None,
                              failpoint_name: str | None = None) -> bool:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(28, "No space left on device (test)")
        return real(path, size, cancel, failpoint_name)

    monkeypatch.setattr(wal_storage, "zero_fill", failing_in_the_thread)
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, b"d" * 100)  # segment 3 by the writer; 4 fails in the thread
    with caplog.at_level(logging.WARNING, logger=wal_storage.__name__):
        storage.write(storage.end_lsn, b"e" * SEG)
    assert "preparing WAL segment 000000010000000000000004 failed" in caplog.text
    assert (storage.segments_created, storage.segments_prepared) == (2, 0)
    storage.flush()
    assert storage.read(START + 99, START + 101) == b"de"
    storage.close()


def test_a_restart_ends_exactly_at_the_last_complete_record(tmp_path: Path) -> None:
    """WAL over three segments whose last append stopped inside a record: after a restart
    the WAL ends at the last complete record (not at the files' end, which is the segment's
    end), the cut part of the record is zeroed and the proposer can go on from there."""
    wal, ends = generate(260, seed=11, size=9000)
    assert Lsn(ends[-1]).segno(SEG) == 5
    partial = ends[-1] - START.value - 5000  # the last record, without its last 5000 bytes
    directory = tmp_path / "tl"
    state = AcceptorState.new_timeline(TenantId.generate(), TimelineId.generate(), SYSID, SEG,
                                       START, PREV)
    tl = Timeline.create(directory, state, wal_keep_bytes=0)
    reply = elect_and_append(tl, wal[:partial], pieces=9)
    assert reply.flush_lsn == START + partial
    assert reply.last_record_end == Lsn(ends[-2])
    tl.close()
    assert all((directory / n).stat().st_size == SEG for n in segments(directory))

    again = Timeline.open(directory, wal_keep_bytes=0)
    assert again.wal.end_lsn == Lsn(ends[-2])
    assert again.acceptor.flush_lsn == Lsn(ends[-2])
    assert again.acceptor.last_record_end == Lsn(ends[-2])
    seg5 = (directory / segment_file_name(5, 1, SEG)).read_bytes()
    assert seg5[Lsn(ends[-2]).segment_offset(SEG):] == bytes(SEG - Lsn(ends[-2])
                                                            .segment_offset(SEG))

    async def resend() -> AppendResponse:
        rest = wal[ends[-2] - START.value:]
        replies = await again.handle(AppendRequest(1, Lsn(ends[-2]), START, rest))
        out = decode(replies[-1])
        assert isinstance(out, AppendResponse)
        return out

    assert asyncio.run(resend()).last_record_end == Lsn(ends[-1])
    again.close()
    third = Timeline.open(directory, wal_keep_bytes=0)
    assert third.acceptor.flush_lsn == Lsn(ends[-1]) == START + len(wal)
    third.close()


_CHILD = """
import sys
from pathlib import Path
from strata.common.lsn import Lsn
from strata.safekeeper.wal_storage import WalStorage
directory, seg, start = Path(sys.argv[1]), int(sys.argv[2]), Lsn(int(sys.argv[3]))
data = Path(sys.argv[4]).read_bytes()
storage = WalStorage(directory, seg, start)
storage.write(start, data)  # starts preparing the next segment: it waits at the failpoint
storage.flush()
(directory / "flushed").touch()
storage._prepared.future.result()  # (held until the test kills this process)
"""


def test_kill9_while_preparing_a_segment_leaves_a_usable_directory(tmp_path: Path) -> None:
    """A process killed (SIGKILL) while its worker thread zero-fills the next segment leaves
    a partly written `.___prepared` file: opening the directory removes it, the WAL flushed
    before is all there, and writing goes on into that segment."""
    wal, ends = generate(150, seed=12, size=4000)
    assert Lsn(ends[-1]).segno(SEG) == 3
    directory = tmp_path / "wal"
    directory.mkdir()
    (tmp_path / "wal.bin").write_bytes(wal)
    env = {**os.environ, "STRATA_FAILPOINTS":
           f"sk-wal-prepare-mid-fill=wait(60,{tmp_path / 'never'})"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), str(SEG),
                              str(START.value), str(tmp_path / "wal.bin")], env=env)
    try:
        stray = directory / (segment_file_name(4, 1, SEG) + PREPARED_SUFFIX)
        deadline = time.monotonic() + 30
        while not ((directory / "flushed").exists() and stray.exists()
                   and stray.stat().st_size > 0):
            assert child.poll() is None, child.returncode
            assert time.monotonic() < deadline, "the child never got to its preparation"
            time.sleep(0.02)
        assert 0 < stray.stat().st_size < SEG  # stopped in the middle of its zero-fill
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    storage = WalStorage(directory, SEG, START)
    assert prepared_files(directory) == []  # removed at open
    end = storage.find_valid_end(START, SYSID)
    assert end == START + len(wal)
    storage.truncate(end)
    more, _ = generate(300, seed=12, size=4000)  # the same records and more after them
    storage.write(end, more[len(wal):])
    storage.flush()
    storage.close()
    again = WalStorage(directory, SEG, START)
    assert again.find_valid_end(START, SYSID) == START + len(more)
    assert (START + len(more)).segno(SEG) >= 4
    again.close()


@pytest.mark.parametrize("zeroing", [True, False])
def test_a_cut_tail_does_not_come_back_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zeroing: bool) -> None:
    """Cut the WAL at a record end, write part of the same records again (so the new WAL
    ends exactly where a cut record begins, and that record's prev-link points at the new
    WAL's last record), restart: the WAL ends at the rewritten part. Without the zeroing
    (`zeroing=False`, the check that this test can fail) the cut records, valid real WAL
    bytes with matching CRCs and prev-links, are decoded again after the restart."""
    if not zeroing:
        monkeypatch.setattr(WalStorage, "_zero_tail", lambda self, fd, offset, limit: 0)
    wal, ends = generate(200, seed=13)
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, wal)
    storage.flush()
    storage.truncate(Lsn(ends[100]))
    storage.write(Lsn(ends[100]), wal[ends[100] - START.value:ends[150] - START.value])
    storage.flush()
    storage.close()
    again = WalStorage(tmp_path, SEG, START)
    end = again.find_valid_end(START, SYSID)
    assert end == Lsn(ends[150] if zeroing else ends[199])
    again.close()


def test_a_new_terms_truncation_is_not_undone_by_a_restart(tmp_path: Path) -> None:
    """A timeline: term 1 appends 200 records; term 2 (another proposer) adopts only the
    first 100 (its `ProposerElected` cuts the rest) and appends 50 of the same records
    again; after a restart the WAL ends at record 150, with term 2's history."""
    wal, ends = generate(200, seed=14)
    directory = tmp_path / "tl"
    state = AcceptorState.new_timeline(TenantId.generate(), TimelineId.generate(), SYSID, SEG,
                                       START, PREV)
    tl = Timeline.create(directory, state, wal_keep_bytes=0)
    assert elect_and_append(tl, wal, pieces=4).flush_lsn == Lsn(ends[-1])
    gen_starts = [START.value, *ends[:-1]]  # each record's start (a record follows the last
    cut = Lsn(ends[100])                     # end; no page boundary falls just there below)
    prev = Lsn(gen_starts[100])
    assert prev.value % 8192 != 0

    async def term2() -> None:
        await tl.handle(VoteRequest(2, 88))
        history = (TermEntry(1, START, PREV), TermEntry(2, cut, prev))
        await tl.handle(ProposerElected(2, cut, history))
        await tl.handle(AppendRequest(2, cut, START,
                                      wal[cut - START:ends[150] - START.value]))

    asyncio.run(term2())
    assert tl.counters.truncations == 1
    assert tl.acceptor.flush_lsn == Lsn(ends[150])
    tl.close()
    again = Timeline.open(directory, wal_keep_bytes=0)
    assert again.acceptor.flush_lsn == Lsn(ends[150])
    assert again.acceptor.last_record_end == Lsn(ends[150])
    assert again.state.term_history[-1] == TermEntry(2, cut, prev)
    again.close()


def test_a_segment_from_before_preallocation_is_filled_up(tmp_path: Path) -> None:
    """Files written by a version that did not preallocate (the last segment as long as
    its WAL): opened, the end is found; the first write fills the segment up to full size,
    and a reopen finds all the WAL."""
    wal, ends = generate(300, seed=15, size=9000)
    first = wal[:ends[200] - START.value]
    storage = WalStorage(tmp_path, SEG, START)
    storage.write(START, first)
    storage.flush()
    storage.close()
    end = START + len(first)
    for segno in range(3, end.segno(SEG) + 1):  # as the old layout: the last one short
        os.truncate(tmp_path / segment_file_name(segno, 1, SEG),
                    SEG if segno < end.segno(SEG) else end.segment_offset(SEG))
    for name in prepared_files(tmp_path):
        (tmp_path / name).unlink()
    old = WalStorage(tmp_path, SEG, START)
    assert old.end_lsn == end  # the old layout: the short segment ends the files
    assert old.find_valid_end(START, SYSID) == end
    assert old.truncate(end).zeroed_bytes == 0
    last = tmp_path / segment_file_name(end.segno(SEG), 1, SEG)
    assert last.stat().st_size == end.segment_offset(SEG)
    old.write(end, wal[len(first):])
    old.flush()
    assert last.stat().st_size == SEG
    old.close()
    again = WalStorage(tmp_path, SEG, START)
    assert again.find_valid_end(START, SYSID) == START + len(wal)
    again.close()


def test_after_a_switch_record_the_end_is_its_segment_end(tmp_path: Path) -> None:
    """Real PostgreSQL 15 WAL with an XLOG_SWITCH (test_record_bounds' fixture),
    written up to the switch record and only part of its zero padding: reopened, the WAL
    ends at the segment's end (the preallocated file holds the rest of the padding, the
    same zeros the compute's WAL has)."""
    from test_record_bounds import real_wal
    seg, base, data, bounds = real_wal()
    switch_lsn, switch_end = [b for b in bounds if b[1] % seg == 0][0]
    assert switch_end - switch_lsn > 1000  # a switch record and its padding
    sysid = int.from_bytes(data[24:32], "little")  # the long page header's xlp_sysid
    written = switch_lsn - base + 200  # the switch record and a little of its padding
    # The files start at the fixture's segment start, after the timeline start (the
    # segment before is removed, as after the pageserver got it).
    storage = WalStorage(tmp_path, seg, Lsn(base - seg))
    storage.write(Lsn(base - seg), bytes(seg) + data[:written])
    storage.flush()
    assert storage.remove_below(Lsn(base)) == 1
    storage.close()
    again = WalStorage(tmp_path, seg, Lsn(base - seg))
    assert again.find_valid_end(Lsn(base), sysid) == Lsn(switch_end)
    again.close()

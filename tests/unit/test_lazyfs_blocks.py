"""The lazy file system's block logic (blockstate, manifest) and its operations on a
store directory, called directly (no mount) with an in-memory page source."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import mfusepy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import Unavailable, UserError
from strata.common.lsn import Lsn
from strata.compute.lazyfs import prewarm as prewarm_module
from strata.compute.lazyfs.blockstate import RemoteFile
from strata.compute.lazyfs.fetcher import PageFetcher
from strata.compute.lazyfs.fs import LazyFs
from strata.compute.lazyfs.layout import Layout
from strata.compute.lazyfs.manifest import SegmentFile, parse_manifest, segment_files
from strata.compute.lazyfs.prewarm import ReadLog, load, prewarm
from strata.pg.constants import BLCKSZ, ForkNumber
from strata.pg.relfile import RelTag

REL = RelTag(1663, 5, 16384, ForkNumber.MAIN)
X = Lsn(0x1000000)


def page(rel: RelTag, blkno: int) -> bytes:
    return (f"{rel.relnode}.{int(rel.forknum)}:{blkno};".encode() * 1000)[:BLCKSZ]


class Pages:
    """The pageserver at X: every block's page is derived from its name."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[RelTag, int]]] = []
        self.fail = False

    def get_pages(self, blocks: Iterable[tuple[RelTag, int]], lsn: Lsn) -> list[bytes]:
        assert lsn == X
        todo = list(blocks)
        if self.fail:
            raise Unavailable("pageserver gone")
        self.requests.append(todo)
        return [page(rel, b) for rel, b in todo]


# --- blockstate ---------------------------------------------------------------------------
def test_readahead_grows_on_sequential_misses_and_resets_on_random_ones() -> None:
    rf = RemoteFile(REL, 0, 1000, max_window=16)
    assert rf.plan_fetch(0, 1) == [0]
    rf.mark_local(0, 1)
    assert rf.plan_fetch(1, 2) == [1, 2]  # sequential: window 2
    rf.mark_local(1, 3)
    assert rf.plan_fetch(3, 4) == [3, 4, 5, 6]
    rf.mark_local(3, 7)
    assert len(rf.plan_fetch(7, 8)) == 8
    rf.mark_local(7, 15)
    assert len(rf.plan_fetch(15, 16)) == 16
    rf.mark_local(15, 31)
    assert len(rf.plan_fetch(31, 32)) == 16  # capped
    assert rf.plan_fetch(500, 501) == [500]  # random: back to the read's size
    assert rf.plan_fetch(995, 996) == [995]
    assert rf.plan_fetch(996, 997) == [996, 997]
    assert rf.plan_fetch(998, 1000) == [998, 999]  # never past the remote part


def test_readahead_follows_a_parallel_scan_of_interleaved_chunks() -> None:
    """Three workers take 8-block chunks in turn and read them block by block, interleaved
    (a parallel seq scan): the fetches still grow to the largest window."""
    rf = RemoteFile(REL, 0, 4096, max_window=128)
    fetches = []
    for base in range(0, 4096, 24):  # three chunks at a time
        for i in range(8):
            for chunk in range(3):
                b = base + chunk * 8 + i
                if b < 4096 and (plan := rf.plan_fetch(b, b + 1)):
                    fetches.append(plan)
                    rf.mark_local(plan[0], plan[-1] + 1)
    assert rf.fully_local
    assert len(fetches) < 60, [len(f) for f in fetches]
    assert max(len(f) for f in fetches) == 128


def test_truncate_never_lets_a_cut_block_be_fetched() -> None:
    rf = RemoteFile(REL, 0, 10)
    rf.mark_local(2, 4)
    rf.truncate(3 * BLCKSZ)
    assert rf.remote_limit == 3 and rf.local_count == 1
    assert rf.missing(0, 10) == [0, 1]
    assert rf.is_local(5)  # past the cut: local (zeros or what the compute writes)
    rf.truncate(10 * BLCKSZ)  # growing again does not bring the remote blocks back
    assert rf.remote_limit == 3
    rf.mark_local(0, 2)
    assert rf.fully_local
    with pytest.raises(AssertionError, match="not local"):
        RemoteFile(REL, 0, 4).truncate(BLCKSZ + 100)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "truncate", "read"]),
                          st.integers(0, 40), st.integers(1, 6)), max_size=30))
def test_missing_blocks_model(ops: list[tuple[str, int, int]]) -> None:
    """Against a model: a block is missing iff below every cut so far and never made local."""
    rf = RemoteFile(REL, 0, 32, max_window=4)
    limit, local = 32, set[int]()
    for op, first, count in ops:
        if op == "write":
            rf.mark_local(first, first + count)
            local |= {b for b in range(first, first + count) if b < limit}
        elif op == "truncate":
            rf.truncate(first * BLCKSZ)
            limit = min(limit, first)
            local = {b for b in local if b < limit}
        else:
            fetched = rf.plan_fetch(first, first + count)
            assert all(b < limit and b not in local for b in fetched)
            rf.mark_local(first, first + count)
            local |= {b for b in range(first, first + count) if b < limit}
        assert rf.missing(0, 64) == [b for b in range(limit) if b not in local]
        assert rf.local_count == len(local)


# --- manifest -----------------------------------------------------------------------------
def test_manifest_segments_unlogged_and_tablespaces() -> None:
    rels = parse_manifest("1663 5 100 0 5\n1663 5 100 1 3\n1663 5 200 0 2\n"
                          "1663 5 200 3 2\n1664 0 1262 0 1\n1663 5 300 0 0\n")
    segs = segment_files(rels, relseg_size=2)
    main100 = RelTag(1663, 5, 100, ForkNumber.MAIN)
    init200 = RelTag(1663, 5, 200, ForkNumber.INIT)
    assert [s for s in segs if s.source == main100] == [
        SegmentFile("base/5/100", main100, 0, 2), SegmentFile("base/5/100.1", main100, 2, 2),
        SegmentFile("base/5/100.2", main100, 4, 1)]
    assert "base/5/100_fsm" in {s.path for s in segs}
    # Unlogged: the main fork is a copy of the init fork, nothing else.
    assert [(s.path, s.source) for s in segs if s.path.startswith("base/5/200")] == [
        ("base/5/200", init200), ("base/5/200_init", init200)]
    assert SegmentFile("global/1262", RelTag(1664, 0, 1262, ForkNumber.MAIN), 0, 1) in segs
    assert SegmentFile("base/5/300", RelTag(1663, 5, 300, ForkNumber.MAIN), 0, 0) in segs
    with pytest.raises(UserError, match="tablespace 16500"):
        segment_files(parse_manifest("16500 5 100 0 1\n"), 131072)


# --- operations on a store ----------------------------------------------------------------
@pytest.fixture
def fs(tmp_path: Path) -> tuple[LazyFs, Pages, Path]:
    tree = tmp_path / "tree"
    (tree / "base" / "5").mkdir(parents=True)
    remote = {}
    for name, nblocks in (("16384", 20), ("16385", 4)):
        with open(tree / "base" / "5" / name, "wb") as f:
            f.truncate(nblocks * BLCKSZ)
        rel = RelTag(1663, 5, int(name), ForkNumber.MAIN)
        remote[f"/base/5/{name}"] = RemoteFile(rel, 0, nblocks, max_window=8)
    pages = Pages()
    return LazyFs(str(tree), PageFetcher(pages, X), remote), pages, tree


def test_reads_fetch_once_in_batches_then_come_from_the_store(
        fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, tree = fs
    fh = ops.open("/base/5/16384", os.O_RDONLY)
    assert ops.getattr("/base/5/16384")["st_size"] == 20 * BLCKSZ
    assert ops.read("/base/5/16384", BLCKSZ, 3 * BLCKSZ, fh) == page(REL, 3)
    assert ops.read("/base/5/16384", 2 * BLCKSZ, 4 * BLCKSZ, fh) == page(REL, 4) + page(REL, 5)
    assert [len(r) for r in pages.requests] == [1, 2]  # sequential: readahead of 2
    assert ops.read("/base/5/16384", BLCKSZ, 3 * BLCKSZ, fh) == page(REL, 3)
    assert len(pages.requests) == 2  # local now
    assert (tree / "base/5/16384").read_bytes()[3 * BLCKSZ:4 * BLCKSZ] == page(REL, 3)
    assert ops.read("/base/5/16384", BLCKSZ, 20 * BLCKSZ, fh) == b""  # past the end
    ops.release("/base/5/16384", fh)


def test_writes_win_over_fetches_and_partial_writes_fetch_first(
        fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, _ = fs
    fh = ops.open("/base/5/16384", os.O_RDWR)
    new = b"N" * BLCKSZ
    assert ops.write(None, new, 7 * BLCKSZ, fh) == BLCKSZ
    assert not pages.requests  # a whole-block write needs nothing from the pageserver
    assert ops.read(None, BLCKSZ, 7 * BLCKSZ, fh) == new
    assert ops.read(None, BLCKSZ, 6 * BLCKSZ, fh) == page(REL, 6)
    assert ops.read(None, 3 * BLCKSZ, 6 * BLCKSZ, fh) == page(REL, 6) + new + page(REL, 8)
    ops.write(None, b"xy", 10 * BLCKSZ + 100, fh)  # partial: block 10 fetched first
    expected = bytearray(page(REL, 10))
    expected[100:102] = b"xy"
    assert ops.read(None, BLCKSZ, 10 * BLCKSZ, fh) == bytes(expected)
    # Sparse extension: a gap reads as zeros and is never fetched.
    ops.write(None, new, 30 * BLCKSZ, fh)
    assert ops.getattr(None, fh)["st_size"] == 31 * BLCKSZ
    before = len(pages.requests)
    assert ops.read(None, BLCKSZ, 25 * BLCKSZ, fh) == bytes(BLCKSZ)
    assert len(pages.requests) == before


def test_truncate_unlink_rename_and_recreate_never_fetch_cut_blocks(
        fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, tree = fs
    ops.truncate("/base/5/16384", 5 * BLCKSZ)
    fh = ops.open("/base/5/16384", os.O_RDWR)
    ops.truncate(None, 12 * BLCKSZ, fh)  # regrow: blocks 5.. are zeros, not old pages
    assert ops.read(None, BLCKSZ, 8 * BLCKSZ, fh) == bytes(BLCKSZ)
    assert all(b < 5 for req in pages.requests for _, b in req)
    assert ops.read(None, BLCKSZ, 4 * BLCKSZ, fh) == page(REL, 4)
    ops.truncate(None, 2 * BLCKSZ + 10, fh)  # inside a block: fetched, then cut
    assert ops.read(None, BLCKSZ, 2 * BLCKSZ, fh) == page(REL, 2)[:10]
    ops.release(None, fh)

    other = RelTag(1663, 5, 16385, ForkNumber.MAIN)
    ops.rename("/base/5/16385", "/base/5/99")
    fh = ops.open("/base/5/99", os.O_RDONLY)
    assert ops.read(None, BLCKSZ, 0, fh) == page(other, 0)  # the remote part moved along
    ops.release(None, fh)
    ops.unlink("/base/5/99")
    assert "/base/5/99" not in ops.remote and "/base/5/16385" not in ops.remote
    assert sorted(ops.readdir("/base/5", 0)) == [".", "..", "16384"]
    (tree / "base/5/99").write_bytes(b"")  # re-created: purely local
    fh = ops.open("/base/5/99", os.O_RDWR)
    ops.truncate(None, 4 * BLCKSZ, fh)
    assert ops.read(None, BLCKSZ, 0, fh) == bytes(BLCKSZ)
    ops.release(None, fh)
    assert ops.statfs("/")["f_bsize"] > 0


def test_a_failed_fetch_is_an_io_error_and_leaves_the_block_remote(
        fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, _ = fs
    fh = ops.open("/base/5/16384", os.O_RDONLY)
    pages.fail = True
    with pytest.raises(mfusepy.FuseOSError) as info:
        ops.read(None, BLCKSZ, 0, fh)
    assert info.value.errno == errno.EIO
    pages.fail = False
    assert ops.read(None, BLCKSZ, 0, fh) == page(REL, 0)


# --- segment files created on first use (layout.py) ---------------------------------------
@pytest.fixture
def pending_fs(tmp_path: Path) -> tuple[LazyFs, Pages, Path]:
    """A store whose segment files are all still pending, beside one local file."""
    tree = tmp_path / "tree"
    (tree / "base" / "5").mkdir(parents=True)
    (tree / "base" / "5" / "PG_VERSION").write_text("15\n")
    files, remote = {}, {}
    for name, nblocks in (("16384", 20), ("16385", 4), ("16386", 0)):
        files[f"/base/5/{name}"] = nblocks * BLCKSZ
        if nblocks:
            rel = RelTag(1663, 5, int(name), ForkNumber.MAIN)
            remote[f"/base/5/{name}"] = RemoteFile(rel, 0, nblocks, max_window=8)
    layout = Layout(str(tree), files, os.getuid(), os.getgid())
    pages = Pages()
    return LazyFs(str(tree), PageFetcher(pages, X), remote, layout), pages, tree


def test_pending_segment_files_look_created_to_every_operation(
        pending_fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, tree = pending_fs
    names = [".", "..", "PG_VERSION", "16384", "16385", "16386"]
    assert sorted(ops.readdir("/base/5", 0)) == sorted(names)
    assert sorted(os.listdir(tree / "base/5")) == ["PG_VERSION"]  # listing creates nothing
    assert ops.getattr("/base/5/16384")["st_size"] == 20 * BLCKSZ
    assert (tree / "base/5/16384").stat().st_size == 20 * BLCKSZ  # created on first use
    fh = ops.open("/base/5/16385", os.O_RDONLY)
    assert ops.read(None, BLCKSZ, 0, fh) == page(RelTag(1663, 5, 16385, ForkNumber.MAIN), 0)
    ops.release(None, fh)
    with pytest.raises(FileExistsError):
        ops.create("/base/5/16386", 0o600, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with pytest.raises(FileExistsError):
        ops.mkdir("/base/5/16386", 0o700)
    ops.unlink("/base/5/16386")
    assert "16386" not in ops.readdir("/base/5", 0)
    assert ops.layout.complete
    assert sorted(ops.readdir("/base/5", 0)) == sorted(n for n in names if n != "16386")


def test_pending_files_count_in_rmdir_and_move_with_rename(
        pending_fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, tree = pending_fs
    with pytest.raises(OSError) as info:
        ops.rmdir("/base/5")
    assert info.value.errno == errno.ENOTEMPTY
    assert ops.layout.complete  # rmdir created what was pending under base/5
    ops.rename("/base/5", "/base/7")
    fh = ops.open("/base/7/16384", os.O_RDONLY)
    assert ops.read(None, BLCKSZ, 19 * BLCKSZ, fh) == page(REL, 19)  # remote part moved
    ops.release(None, fh)
    assert (tree / "base/7/16384").stat().st_size == 20 * BLCKSZ


def test_concurrent_first_uses_create_each_file_once(
        pending_fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, tree = pending_fs
    names = ["16384", "16385", "16386"] * 50
    sizes: list[dict[str, int]] = [{}, {}, {}, {}]

    def look(out: dict[str, int]) -> None:
        for name in names:
            out[name] = ops.getattr(f"/base/5/{name}")["st_size"]

    threads = [threading.Thread(target=look, args=(out,)) for out in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ops.layout.complete
    assert sizes == [{"16384": 20 * BLCKSZ, "16385": 4 * BLCKSZ, "16386": 0}] * 4
    for name, size in sizes[0].items():
        st = (tree / "base/5" / name).stat()
        assert (st.st_size, st.st_mode & 0o777, st.st_uid) == (size, 0o600, os.getuid())
    assert not pages.requests  # creating a file fetches nothing


# --- prewarm (prewarm.py) -------------------------------------------------------------------
def test_read_log_keeps_the_first_distinct_blocks_and_saves_them_once(tmp_path: Path,
        pending_fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, _, _ = pending_fs
    ops.reads = ReadLog(tmp_path / "prewarm", limit=6)
    fh = ops.open("/base/5/16384", os.O_RDONLY)
    ops.read(None, BLCKSZ, 5 * BLCKSZ, fh)
    ops.read(None, 2 * BLCKSZ, 2 * BLCKSZ, fh)  # blocks 2, 3 (+ readahead: not noted)
    ops.read(None, BLCKSZ, 5 * BLCKSZ, fh)  # again: noted once
    fh2 = ops.open("/base/5/16385", os.O_RDWR)
    ops.write(None, b"w" * 4 * BLCKSZ, 0, fh2)  # the whole file: fully local
    ops.read(None, BLCKSZ, BLCKSZ, fh2)  # ... and its reads are still noted
    ops.read(None, BLCKSZ, 9 * BLCKSZ, fh)
    ops.read(None, BLCKSZ, 7 * BLCKSZ, fh)  # the 6th block: the list is full
    ops.read(None, BLCKSZ, 11 * BLCKSZ, fh)  # past the limit: not noted
    ops.release("/base/5/16384", fh)
    ops.release("/base/5/16385", fh2)
    for _ in range(100):  # the list is full: saved by a thread
        if (tmp_path / "prewarm").exists():
            break
        threading.Event().wait(0.05)
    assert (tmp_path / "prewarm").read_text() == "/base/5/16384 5,2,3,9,7\n/base/5/16385 1\n"
    assert load(tmp_path / "prewarm") == [("/base/5/16384", [5, 2, 3, 9, 7]),
                                          ("/base/5/16385", [1])]
    (tmp_path / "prewarm").unlink()
    ops.reads.save()  # saved already: not again
    assert not (tmp_path / "prewarm").exists()
    empty = ReadLog(tmp_path / "empty")
    empty.save()  # nothing read: nothing written (a good list is never replaced by none)
    assert not (tmp_path / "empty").exists()
    (tmp_path / "bad").write_text("/base/5/16384 1,x\n/base/5/16385 3\nnonsense\n")
    assert load(tmp_path / "bad") == [("/base/5/16385", [3])]
    assert load(tmp_path / "missing") == []


def test_prewarm_fetches_what_is_still_remote_and_never_overwrites_a_write(
        pending_fs: tuple[LazyFs, Pages, Path]) -> None:
    ops, pages, tree = pending_fs
    fh = ops.open("/base/5/16384", os.O_RDWR)
    ops.read(None, BLCKSZ, 0, fh)  # block 0 (and readahead) local already
    written = b"w" * BLCKSZ
    ops.write(None, written, 9 * BLCKSZ, fh)
    pages.requests.clear()
    plan = [("/base/5/16384", [0, 9, *range(10, 20)]), ("/base/5/16385", [3, 2]),
            ("/base/5/gone", [0]), ("/base/5/16386", [0])]
    assert prewarm(ops, plan) == 12
    # One GetPages across the files (BATCH_BLOCKS at a time), what is local left out.
    assert pages.requests == [[(REL, b) for b in range(10, 20)]
                              + [(RelTag(1663, 5, 16385, ForkNumber.MAIN), b) for b in (3, 2)]]
    pages.requests.clear()
    assert ops.read(None, BLCKSZ, 9 * BLCKSZ, fh) == written
    assert ops.read(None, 10 * BLCKSZ, 10 * BLCKSZ, fh) == b"".join(
        page(REL, b) for b in range(10, 20))
    assert pages.requests == []  # all local
    assert (tree / "base/5/16385").read_bytes()[2 * BLCKSZ:4 * BLCKSZ] == page(
        RelTag(1663, 5, 16385, ForkNumber.MAIN), 2) + page(RelTag(1663, 5, 16385,
                                                                   ForkNumber.MAIN), 3)
    ops.release("/base/5/16384", fh)
    pages.fail = True  # an unreachable pageserver ends the prewarm, quietly
    assert prewarm(ops, [("/base/5/16385", [0, 1])]) == 0


def test_prewarm_batches_span_files(pending_fs: tuple[LazyFs, Pages, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ops, pages, _ = pending_fs
    monkeypatch.setattr(prewarm_module, "BATCH_BLOCKS", 4)
    other = RelTag(1663, 5, 16385, ForkNumber.MAIN)
    assert prewarm(ops, [("/base/5/16384", [0, 1, 2]), ("/base/5/16385", [0, 1, 2])]) == 6
    assert pages.requests == [[(REL, 0), (REL, 1), (REL, 2), (other, 0)],
                              [(other, 1), (other, 2)]]

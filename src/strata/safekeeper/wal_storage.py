"""`WalStorage`: one timeline's WAL on a safekeeper, in PostgreSQL-named segment files.

Segment `N` is the file `segment_file_name(N)` (timeline 1) and holds the WAL bytes
[N * seg_size, (N + 1) * seg_size) at their offsets in the segment, as PostgreSQL's own
`pg_wal` does, so `pg_waldump` reads it. The bytes of the timeline's first segment before
the timeline start LSN are never served.

**Preallocated segments.** A segment is created full size, all zeros, fdatasynced, under a
temporary name (`<name>.___prepared`) and then renamed into place by the writer, which
fsyncs the directory before it acknowledges anything in it (the next `flush`). So a WAL
`fdatasync` never changes a file's size: it writes the data only, not the inode and its
buffer list as an appending file needs (ext4 without a journal here: 2.6 block requests a
call instead of 1.5-1.7, docs/safekeeper.md). The next segment is prepared ahead in a
worker thread as soon as the writer starts a segment, so no commit waits for 16 MB of
zeros; if it is not ready when needed the writer waits for it, and with none prepared
(after a truncation, a failed preparation, or a timeline created before preallocation) it
creates one itself. A new timeline's first segment is created with the timeline
(`create_end_segment`, off the event loop). A segment
file from before preallocation (shorter than the segment size) is filled up with zeros
the first time it is written to. A crash (or `close`) can leave a `*.___prepared` file: it
is removed when the storage is opened.

**The end of the WAL is not the files' size.** The files end where the last segment ends,
zeros after the WAL. `end_lsn` is exact while the storage is in use (the end of what was
written), but right after opening it is only an upper bound: the end of the contiguous
segment files. The owner must find the real end by decoding (`find_valid_end` treats
zeros as the end of WAL; `Timeline._recover`) and `truncate` there before writing.

**Nothing stale past the end.** Every byte of a segment at or past the end of the WAL is
zero, except what was written after the last flush: `truncate` zeroes the cut part of its
segment (every nonzero byte up to the old end, which after opening means up to the
segment's end) and fdatasyncs it before it unlinks the later segments. A record cut by a
new term can therefore never be decoded again after a restart, even when the new WAL ends
exactly where a cut record began and the cut record's prev-link matches.

Durability (docs/safekeeper-protocol.md, "What the safekeeper must do"): `write` only
writes; `flush` fdatasyncs every file written since the last flush and fsyncs the
directory when a segment was renamed into place; `truncate` and `remove_below` fsync
before returning.

After a crash the files may hold, after the last flush, zeros, a torn record or garbage;
`find_valid_end` decodes the records (CRC included) from the first one held and returns
where the valid WAL ends (it checks all the WAL held, so a damaged byte anywhere in it is
found at restart). Invalid WAL below the durable commit LSN is corruption
(`CorruptionError` naming the segment file and offset): that WAL was fsynced and
acknowledged, so the safekeeper must not serve or vote with it.

Synchronous file I/O; the timeline driver runs the slow calls in a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from strata.common.durable import fsync_dir
from strata.common.errors import CorruptionError, NotFound
from strata.common.failpoint import failpoint
from strata.common.lsn import Lsn, parse_segment_file_name, segment_file_name
from strata.pg.walreader import WalCorruption, WalStreamDecoder

log = logging.getLogger(__name__)

_MAX_OPEN_FILES = 8  # per timeline; written (unflushed) files stay open regardless
_SCAN_CHUNK_BYTES = 1 << 20
PREPARED_SUFFIX = ".___prepared"  # a segment being zero-filled, not yet renamed into place
_ZEROS = bytes(1 << 20)  # the zero-fill's write unit (segments are multiples of 1 MB)
_ZERO_VIEW = memoryview(_ZEROS)  # slices without copies
_PREPARER: ThreadPoolExecutor | None = None  # shared by every timeline of the process
_PREPARER_LOCK = threading.Lock()


def _preparer() -> ThreadPoolExecutor:
    global _PREPARER
    with _PREPARER_LOCK:
        if _PREPARER is None:
            _PREPARER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sk-wal-prepare")
        return _PREPARER


def zero_fill(path: Path, size: int, cancel: threading.Event | None = None,
              failpoint_name: str | None = None) -> bool:
    """Create `path` as `size` zero bytes, written (not a sparse hole or unwritten extents,
    whose later writes would change the file's metadata again) and fdatasynced. False if
    `cancel` was set first (the file is then incomplete: the caller removes it).

    `failpoint_name` is hit after the first write (the preparation thread passes
    `sk-wal-prepare-mid-fill`: a crash while preparing)."""
    step = min(len(_ZEROS), max(size // 4, 1))  # 1 MB; at least 4 writes (a cancel is seen)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, step):
            if cancel is not None and cancel.is_set():
                return False
            take = min(step, size - offset)
            written = os.pwrite(fd, _ZERO_VIEW[:take], offset)
            assert written == take, (written, take, path)  # regular files write fully
            if offset == 0 and failpoint_name is not None:
                failpoint(failpoint_name)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return True


@dataclass(slots=True)
class _Prepared:
    """A segment being (or already) zero-filled under its temporary name, off the loop."""

    segno: int
    path: Path
    future: Future[bool]
    cancel: threading.Event


@dataclass(frozen=True, slots=True)
class Cut:
    """What `truncate` did: nonzero bytes zeroed after the cut (in its segment) and later
    segment files removed."""

    zeroed_bytes: int
    segments_removed: int


class WalStorage:
    """The WAL of one timeline in `directory`, from `wal_start_lsn` to `end_lsn` (right after
    opening, `end_lsn` is an upper bound: see the module docstring)."""

    def __init__(self, directory: Path, seg_size: int, timeline_start_lsn: Lsn) -> None:
        self.directory = directory
        self.seg_size = seg_size
        self.timeline_start_lsn = timeline_start_lsn
        self._fds: OrderedDict[int, int] = OrderedDict()  # segno -> fd, least recent first
        self._dirty: set[int] = set()  # written since the last flush
        self._dir_dirty = False  # a segment file was renamed into place since the last flush
        self._writing_segno = -1  # the segment the last write went to (prepare after it)
        self._prepared: _Prepared | None = None  # the next segment, zero-filled ahead
        self.segments_prepared = 0  # segments taken from the preparation thread
        self.segments_created = 0  # segments the writer had to zero-fill itself
        self._remove_stray_prepared()
        self.wal_start_lsn, self.end_lsn = self._scan_files()

    # --- files ----------------------------------------------------------------------------
    def segment_path(self, segno: int) -> Path:
        return self.directory / segment_file_name(segno, 1, self.seg_size)

    def _prepared_path(self, segno: int) -> Path:
        return self.directory / (segment_file_name(segno, 1, self.seg_size) + PREPARED_SUFFIX)

    def _remove_stray_prepared(self) -> None:
        """A crash while a segment was being prepared left its temporary file: never WAL."""
        for path in self.directory.glob("*" + PREPARED_SUFFIX):
            log.info("removing %s, a WAL segment whose preparation did not finish", path.name)
            path.unlink()

    def _segments(self) -> list[int]:
        segnos = []
        for path in self.directory.iterdir():
            if len(path.name) == 24 and all(c in "0123456789ABCDEF" for c in path.name):
                tli, segno = parse_segment_file_name(path.name, self.seg_size)
                if tli == 1:
                    segnos.append(segno)
        return sorted(segnos)

    def _scan_files(self) -> tuple[Lsn, Lsn]:
        """(first byte held, end of the contiguous segment files): an upper bound of the
        WAL's end, which decoding finds (zeros follow the WAL in a preallocated segment)."""
        segnos = self._segments()
        if not segnos:
            return self.timeline_start_lsn, self.timeline_start_lsn
        first_segno = self.timeline_start_lsn.value // self.seg_size
        if segnos[0] < first_segno:
            raise CorruptionError(f"WAL segment {segment_file_name(segnos[0], 1, self.seg_size)}"
                                  f" lies before the timeline start {self.timeline_start_lsn}",
                                  path=str(self.segment_path(segnos[0])))
        start = max(self.timeline_start_lsn, Lsn(segnos[0] * self.seg_size))
        end = start
        for expected, segno in enumerate(segnos, segnos[0]):
            if segno != expected:
                break  # a file after a missing one: a torn tail, cut by recovery
            size = self.segment_path(segno).stat().st_size
            if size > self.seg_size:
                raise CorruptionError(f"WAL segment is {size} bytes, larger than the segment "
                                      f"size {self.seg_size}", path=str(self.segment_path(segno)))
            end = max(end, Lsn(segno * self.seg_size + size))
            if size < self.seg_size:
                break  # a segment from before preallocation: later files are beyond its end
        return start, end

    def _fd(self, segno: int, *, create: bool) -> int:
        fd = self._fds.get(segno)
        if fd is not None:
            self._fds.move_to_end(segno)
            return fd
        path = self.segment_path(segno)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as err:
            if not create:
                raise NotFound(f"WAL segment {path.name} is not on this safekeeper") from err
            self._install(segno)
            fd = os.open(path, os.O_RDWR)
        self._fds[segno] = fd
        self._close_idle()
        return fd

    def _close_idle(self) -> None:
        if len(self._fds) <= _MAX_OPEN_FILES:
            return  # the usual case: no list of the open files per flush
        for segno in list(self._fds):
            if len(self._fds) <= _MAX_OPEN_FILES:
                break
            if segno not in self._dirty:
                os.close(self._fds.pop(segno))

    def close(self) -> None:
        """Close the files. A segment being prepared is stopped (its file stays, for the
        next open to remove, or for a deletion to count and remove with the directory)."""
        self._drop_prepared(remove=False)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._dirty.clear()

    # --- preallocation --------------------------------------------------------------------
    def _prepare(self, segno: int) -> None:
        """Start zero-filling segment `segno` in the worker thread, unless it exists or is
        being prepared already (one at a time: an unused one for another segment, left by a
        truncation, is dropped once it is done)."""
        prepared = self._prepared
        if prepared is not None:
            if prepared.segno == segno or not prepared.future.done():
                return
            self._drop_prepared()
        if self.segment_path(segno).exists():
            return
        path = self._prepared_path(segno)
        cancel = threading.Event()
        future = _preparer().submit(zero_fill, path, self.seg_size, cancel,
                                    "sk-wal-prepare-mid-fill")
        self._prepared = _Prepared(segno, path, future, cancel)

    def _drop_prepared(self, *, remove: bool = True) -> None:
        """Forget the prepared segment: stop its zero-fill, wait for it, remove its file."""
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return
        prepared.cancel.set()
        try:
            prepared.future.result()
        except OSError as err:
            log.info("preparing WAL segment %s failed (%s); it was not needed",
                     prepared.path.name, err)
        if remove:
            prepared.path.unlink(missing_ok=True)

    def create_end_segment(self) -> None:
        """Put the segment holding `end_lsn` in place now, durably, if it is missing: a new
        timeline's first segment, zero-filled where the caller runs (`Timeline.create`, in
        a worker thread) instead of by its first write on the event loop."""
        segno = self.end_lsn.value // self.seg_size
        if not self.segment_path(segno).exists():
            self._install(segno, why="the timeline's first")
            self.flush()  # the directory fsync: the name is durable too

    def _install(self, segno: int, why: str = "in the writer (none was prepared)") -> None:
        """Put segment `segno` in place, full size and zero-filled (durable, except its name
        until the next flush fsyncs the directory): the prepared one (waiting for it if
        its zero-fill is still running), else one zero-filled here."""
        path = self.segment_path(segno)
        prepared = self._prepared
        if prepared is not None and prepared.segno == segno:
            self._prepared = None
            try:
                done = prepared.future.result()
                assert done, prepared  # only close() cancels
                os.rename(prepared.path, path)
                self.segments_prepared += 1
                self._dir_dirty = True
                return
            except OSError as err:
                log.warning("preparing WAL segment %s failed (%s); creating it now",
                            path.name, err)
        temp = self._prepared_path(segno)
        zero_fill(temp, self.seg_size)
        os.rename(temp, path)
        self.segments_created += 1
        self._dir_dirty = True
        log.info("created WAL segment %s %s", path.name, why)

    def _start_segment(self, segno: int, fd: int) -> None:
        """The first write into `segno` since opening (or a truncation): a segment from
        before preallocation is filled up to full size now; the next one is prepared."""
        size = os.fstat(fd).st_size
        if size < self.seg_size:  # written by a version that did not preallocate
            for offset in range(size, self.seg_size, len(_ZEROS)):
                take = min(len(_ZEROS), self.seg_size - offset)
                written = os.pwrite(fd, _ZERO_VIEW[:take], offset)
                assert written == take, (written, take, segno)
            os.fdatasync(fd)
            log.info("filled WAL segment %s up to the segment size (from %d bytes)",
                     self.segment_path(segno).name, size)
        self._prepare(segno + 1)

    # --- writing --------------------------------------------------------------------------
    def write(self, lsn: Lsn, data: bytes) -> None:
        """Append `data` at `lsn`, which must be the current end. Not durable until flush."""
        assert lsn == self.end_lsn, (lsn, self.end_lsn)
        pos = lsn.value
        view = memoryview(data)
        while view:
            segno, offset = divmod(pos, self.seg_size)
            take = min(len(view), self.seg_size - offset)
            fd = self._fd(segno, create=True)
            if segno != self._writing_segno:  # once a segment: size check, prepare the next
                self._start_segment(segno, fd)
                self._writing_segno = segno
            written = os.pwrite(fd, view[:take], offset)
            assert written == take, (written, take, segno)  # regular files write fully
            self._dirty.add(segno)
            view = view[take:]
            pos += take
        self.end_lsn = Lsn(pos)

    def flush(self) -> None:
        """fdatasync every segment written since the last flush (and fsync the directory if
        a segment was renamed into place). The segments are preallocated, so fdatasync
        writes the data only (no size or block allocation to make durable), and unlike
        fsync it skips the timestamps, as PostgreSQL's default `wal_sync_method` (A/B:
        docs/safekeeper.md, "What it costs per commit")."""
        for segno in sorted(self._dirty):
            os.fdatasync(self._fds[segno])
        self._dirty.clear()
        if self._dir_dirty:
            fsync_dir(self.directory)
            self._dir_dirty = False
        self._close_idle()

    def truncate(self, lsn: Lsn) -> Cut:
        """Remove the WAL at and after `lsn`, durably: zero the rest of its segment (every
        nonzero byte up to the current `end_lsn`, which right after opening is the
        segment's end), fdatasync it, then unlink the later segments and fsync the
        directory. The zeroing comes first: a cut record must never be read again."""
        assert self.wal_start_lsn <= lsn, (self.wal_start_lsn, lsn)
        self.flush()
        segno, offset = divmod(lsn.value, self.seg_size)
        zeroed = 0
        if self.segment_path(segno).exists():
            limit = min(self.end_lsn.value - segno * self.seg_size, self.seg_size)
            zeroed = self._zero_tail(self._fd(segno, create=False), offset, limit)
        removed = 0
        for later in self._segments():
            if later > segno:
                fd = self._fds.pop(later, None)
                if fd is not None:
                    os.close(fd)
                self.segment_path(later).unlink()
                removed += 1
        if removed:
            fsync_dir(self.directory)
        self.end_lsn = min(self.end_lsn, lsn)
        self._writing_segno = -1  # the next write prepares the segment after its own again
        return Cut(zeroed, removed)

    def _zero_tail(self, fd: int, offset: int, limit: int) -> int:
        """Zero (durably) the nonzero bytes of the segment open as `fd` in [offset, limit);
        how many bytes were overwritten (up to the last nonzero one)."""
        last = offset  # the end of the last nonzero byte found
        pos = offset
        while pos < limit:
            chunk = os.pread(fd, min(_SCAN_CHUNK_BYTES, limit - pos), pos)
            if not chunk:
                break  # a short segment from before preallocation
            kept = len(chunk.rstrip(b"\0"))
            if kept:
                last = pos + kept
            pos += len(chunk)
        if last == offset:
            return 0
        for at in range(offset, last, len(_ZEROS)):
            take = min(len(_ZEROS), last - at)
            written = os.pwrite(fd, _ZERO_VIEW[:take], at)
            assert written == take, (written, take, at)
        os.fdatasync(fd)
        return last - offset

    def remove_below(self, horizon: Lsn) -> int:
        """Delete the segments that end at or below `horizon`; never the one holding the
        last byte of the WAL (nor a later, prepared one). Returns how many were removed."""
        removed = 0
        last_needed = max(self.end_lsn.value - 1, self.wal_start_lsn.value) // self.seg_size
        for segno in self._segments():
            if segno >= last_needed or (segno + 1) * self.seg_size > horizon.value:
                break
            fd = self._fds.pop(segno, None)
            if fd is not None:
                os.close(fd)
            self._dirty.discard(segno)
            self.segment_path(segno).unlink()
            removed += 1
            self.wal_start_lsn = max(self.wal_start_lsn, Lsn((segno + 1) * self.seg_size))
        if removed:
            fsync_dir(self.directory)
        return removed

    # --- reading --------------------------------------------------------------------------
    def read(self, start: Lsn, end: Lsn) -> bytes:
        """The WAL bytes [start, end); `NotFound` if part of it was removed."""
        if start < self.wal_start_lsn:
            raise NotFound(f"WAL from {start} was removed from this safekeeper (it holds "
                           f"{self.wal_start_lsn} to {self.end_lsn}); the pageserver made it "
                           "durable already")
        assert start <= end <= self.end_lsn, (start, end, self.end_lsn)
        out = bytearray()
        pos = start.value
        while pos < end.value:
            segno, offset = divmod(pos, self.seg_size)
            take = min(end.value - pos, self.seg_size - offset)
            chunk = os.pread(self._fd(segno, create=False), take, offset)
            if len(chunk) != take:
                raise CorruptionError(f"WAL segment is shorter than expected: wanted {take} "
                                      f"bytes at {Lsn(pos)}, got {len(chunk)}",
                                      path=str(self.segment_path(segno)), offset=offset)
            out += chunk
            pos += take
        return bytes(out)

    # --- recovery -------------------------------------------------------------------------
    def find_valid_end(self, durable_lsn: Lsn, system_id: int) -> Lsn:
        """The end of the last valid record held (all of it is checked, from `wal_start_lsn`).

        Records are decoded and checked (page headers, CRC, prev-links); the first invalid
        or incomplete one ends the WAL. Ending below `durable_lsn` (the durable commit LSN,
        whose WAL was fsynced before it was persisted) is corruption. After segments were
        removed the scan starts at a segment start, where the page header says how much of
        a record to skip."""
        start = self.wal_start_lsn
        decoder = WalStreamDecoder(start, self.seg_size,
                                   at_record_start=start == self.timeline_start_lsn,
                                   zero_is_end=True, sysid=system_id)
        valid_end = start
        pos = start
        problem = "the WAL files end there"
        while pos < self.end_lsn:
            chunk_end = min(self.end_lsn, pos + _SCAN_CHUNK_BYTES)
            decoder.feed(self.read(pos, chunk_end))
            pos = chunk_end
            try:
                for record in decoder:
                    valid_end = record.end
            except WalCorruption as err:
                self._check_durable(valid_end, durable_lsn, err.message, err.lsn)
                problem = err.message
                break
            if decoder.end_of_wal is not None:
                problem = f"zeroed WAL at {decoder.end_of_wal}"
                break
        self._check_durable(valid_end, durable_lsn, problem, valid_end.value)
        # A switch record "ends" at its segment end, which may not be written yet.
        return min(valid_end, self.end_lsn)

    def _check_durable(self, valid_end: Lsn, durable_lsn: Lsn, problem: str, at: int) -> None:
        if valid_end >= durable_lsn:
            return
        segno, offset = divmod(at, self.seg_size)
        raise CorruptionError(f"WAL is damaged below the durable commit LSN {durable_lsn}: "
                              f"valid records end at {valid_end} ({problem}); this safekeeper "
                              "must not serve the timeline (restore it from a peer)",
                              path=str(self.segment_path(segno)), offset=offset)

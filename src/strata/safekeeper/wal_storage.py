"""`WalStorage`: one timeline's WAL on a safekeeper, in PostgreSQL-named segment files.

Segment `N` is the file `segment_file_name(N)` (timeline 1) and holds the WAL bytes
[N * seg_size, (N + 1) * seg_size) at their offsets in the segment, as PostgreSQL's own
`pg_wal` does, so `pg_waldump` reads it. Files are not preallocated: a segment's size is
how far it has been written. The bytes of the timeline's first segment before the timeline
start LSN are a hole (never written, read as zeros and never served).

Durability (docs/safekeeper-protocol.md, "What the safekeeper must do"): `write` only
writes; `flush` fdatasyncs every file written since the last flush (data and size) and
fsyncs the directory when a segment was created; `truncate` and `remove_below` fsync
before returning.

After a crash the files may end anywhere after the last flush, possibly with zeros or a torn
record; `find_valid_end` decodes the records (CRC included) from the first one held and
returns where the valid WAL ends (it checks all the WAL held, so a damaged byte anywhere in
it is found at restart). Invalid WAL below the durable commit LSN is corruption
(`CorruptionError` naming the segment file and offset): that WAL was fsynced and
acknowledged, so the safekeeper must not serve or vote with it.

Synchronous file I/O; the timeline driver runs the slow calls in a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from strata.common.durable import fsync_dir
from strata.common.errors import CorruptionError, NotFound
from strata.common.lsn import Lsn, parse_segment_file_name, segment_file_name
from strata.pg.walreader import WalCorruption, WalStreamDecoder

log = logging.getLogger(__name__)

_MAX_OPEN_FILES = 8  # per timeline; written (unflushed) files stay open regardless
_SCAN_CHUNK_BYTES = 1 << 20


class WalStorage:
    """The WAL of one timeline in `directory`, from `wal_start_lsn` to `end_lsn`."""

    def __init__(self, directory: Path, seg_size: int, timeline_start_lsn: Lsn) -> None:
        self.directory = directory
        self.seg_size = seg_size
        self.timeline_start_lsn = timeline_start_lsn
        self._fds: OrderedDict[int, int] = OrderedDict()  # segno -> fd, least recent first
        self._dirty: set[int] = set()  # written since the last flush
        self._dir_dirty = False  # a segment file was created since the last flush
        self.wal_start_lsn, self.end_lsn = self._scan_files()

    # --- files ----------------------------------------------------------------------------
    def segment_path(self, segno: int) -> Path:
        return self.directory / segment_file_name(segno, 1, self.seg_size)

    def _segments(self) -> list[int]:
        segnos = []
        for path in self.directory.iterdir():
            if len(path.name) == 24 and all(c in "0123456789ABCDEF" for c in path.name):
                tli, segno = parse_segment_file_name(path.name, self.seg_size)
                if tli == 1:
                    segnos.append(segno)
        return sorted(segnos)

    def _scan_files(self) -> tuple[Lsn, Lsn]:
        """(first byte held, end of the contiguous bytes on disk) from the files present."""
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
                break  # later files are beyond a torn end
        return start, end

    def _fd(self, segno: int, *, create: bool) -> int:
        fd = self._fds.get(segno)
        if fd is not None:
            self._fds.move_to_end(segno)
            return fd
        path = self.segment_path(segno)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            if create and not path.exists():
                self._dir_dirty = True
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError as err:
            raise NotFound(f"WAL segment {path.name} is not on this safekeeper") from err
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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._dirty.clear()

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
            written = os.pwrite(fd, view[:take], offset)
            assert written == take, (written, take, segno)  # regular files write fully
            self._dirty.add(segno)
            view = view[take:]
            pos += take
        self.end_lsn = Lsn(pos)

    def flush(self) -> None:
        """fdatasync every segment written since the last flush (and fsync the directory if
        needed). fdatasync makes the bytes and the file's new size durable (the size is
        what reading them needs) without the timestamps' update that fsync also waits for,
        as PostgreSQL's default `wal_sync_method` (A/B: docs/safekeeper.md, "What it costs
        per commit")."""
        for segno in sorted(self._dirty):
            os.fdatasync(self._fds[segno])
        self._dirty.clear()
        if self._dir_dirty:
            fsync_dir(self.directory)
            self._dir_dirty = False
        self._close_idle()

    def truncate(self, lsn: Lsn) -> None:
        """Remove the WAL at and after `lsn`, durably."""
        assert self.wal_start_lsn <= lsn, (self.wal_start_lsn, lsn)
        self.flush()
        segno, offset = divmod(lsn.value, self.seg_size)
        for later in self._segments():
            if later > segno:
                fd = self._fds.pop(later, None)
                if fd is not None:
                    os.close(fd)
                self.segment_path(later).unlink()
        if self.segment_path(segno).exists():
            fd = self._fd(segno, create=False)
            os.ftruncate(fd, offset)
            os.fsync(fd)
        fsync_dir(self.directory)
        self.end_lsn = min(self.end_lsn, lsn)

    def remove_below(self, horizon: Lsn) -> int:
        """Delete the segments that end at or below `horizon`; never the last one (its size
        tells where the WAL ends). Returns how many were removed."""
        removed = 0
        segnos = self._segments()
        for segno in segnos[:-1]:
            if (segno + 1) * self.seg_size > horizon.value:
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

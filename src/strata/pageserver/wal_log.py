"""The pageserver's own durable log of raw WAL bytes (development mode, architecture D7).

Without safekeepers the pageserver is the compute's synchronous standby, and the
WAL it reports as flushed must survive a pageserver crash. This log keeps the
bytes exactly as PostgreSQL wrote them, in segment files named and laid out like
`pg_wal` (`%08X%08X%08X`, byte `lsn % seg_size` of segment `lsn // seg_size`),
so the files can be checked with pg_waldump or compared with the compute's own.
It does not decode records.

Layout of the directory:
- `wal_log.meta`: `start_lsn` and `seg_size`, rewritten atomically (temp, fsync,
  rename, fsync directory) when the log is created or truncated at the front.
- segment files, not preallocated: the first one may be sparse before
  `start_lsn`; every segment but the last is complete (`seg_size` bytes). The end
  of the log on reopen is therefore the size of the highest segment.

Durability: `fsync()` makes everything appended so far durable and moves
`flush_lsn` (`publish()` moves it without an fsync, for a log whose tail can be fetched
again, see there). After a process crash the bytes written before it survive even if
not fsynced; they are bytes the compute sent, so keeping them is correct (they
are not reported as flushed until the next `fsync()`). After a machine crash a
file system may leave the unfsynced tail of the last segment short or
zero-filled; a consumer that must be certain verifies records past the last
flush it was told about (a record decoder stops at the first invalid record).

The last `TAIL_BYTES` (1 MB) appended are also kept in memory: ingest reads the bytes the
receiver has just appended, and a read within that tail opens no file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from strata.common.durable import fsync_dir, write_atomic
from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import (
    DEFAULT_WAL_SEGMENT_SIZE,
    Lsn,
    check_segment_size,
    parse_segment_file_name,
    segment_file_name,
)

log = logging.getLogger(__name__)

META_FILE = "wal_log.meta"
TIMELINE = 1  # Strata computes always run on PostgreSQL timeline 1 (architecture D5)
# The last bytes appended are kept in memory too, so that `read` of what was just received
# (ingest follows the receiver closely) needs no file open and read.
TAIL_BYTES = 1 << 20


class WalLog:
    """Append-only WAL bytes from `start_lsn` to `end_lsn`; durable up to `flush_lsn`."""

    def __init__(self, directory: Path, start_lsn: Lsn, end_lsn: Lsn, seg_size: int) -> None:
        self.directory = directory
        self.seg_size = seg_size
        self._start = start_lsn.value
        self._end = end_lsn.value
        self._flush = end_lsn.value  # what is on disk at open counts as durable, see above
        self._fd: int | None = None  # the open segment, the one holding `_end`
        self._fd_segno = -1
        self._unsynced_fds: list[int] = []  # full segments closed but not yet fsynced
        # remove_below and reload_end both list and change the segment files (threads)
        self._files_lock = threading.Lock()
        # The chunks appended last, (lsn, bytes), contiguous up to `_end`, about TAIL_BYTES
        # in all. Appends extend the list; trimming replaces it (a reader in another
        # thread keeps a consistent snapshot).
        self._tail: list[tuple[int, bytes]] = []
        self._tail_bytes = 0
        self.tail_bytes = TAIL_BYTES

    # --- open ---------------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, start_lsn: Lsn, *,
               seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> WalLog:
        """A new empty log whose first byte will be at `start_lsn`."""
        check_segment_size(seg_size)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / META_FILE).exists():
            raise UserError(f"a WAL log already exists in {directory}; open it instead")
        _write_meta(directory, start_lsn, seg_size)
        log.info("created WAL log in %s at %s (segment size %d)", directory, start_lsn,
                 seg_size)
        return cls(directory, start_lsn, start_lsn, seg_size)

    @classmethod
    def open(cls, directory: Path) -> WalLog:
        """Reopen an existing log; its end is found from the segment files."""
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            start_lsn, seg_size = Lsn.parse(meta["start_lsn"]), int(meta["seg_size"])
            check_segment_size(seg_size)
        except FileNotFoundError as err:
            raise UserError(f"no WAL log in {directory} ({META_FILE} missing); "
                            "create one with WalLog.create") from err
        except (ValueError, KeyError, TypeError, UserError) as err:
            raise CorruptionError(f"unreadable WAL log metadata: {err}",
                                  path=str(meta_path)) from err
        end = _find_end(directory, start_lsn, seg_size)
        log.info("opened WAL log in %s: %s..%s", directory, start_lsn, end)
        return cls(directory, start_lsn, end, seg_size)

    @classmethod
    def open_or_create(cls, directory: Path, start_lsn: Lsn, *,
                       seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> WalLog:
        if (directory / META_FILE).exists():
            return cls.open(directory)
        return cls.create(directory, start_lsn, seg_size=seg_size)

    # --- positions ----------------------------------------------------------------
    @property
    def start_lsn(self) -> Lsn:
        return Lsn(self._start)

    @property
    def end_lsn(self) -> Lsn:
        """End of the bytes appended (written, maybe not yet durable)."""
        return Lsn(self._end)

    @property
    def flush_lsn(self) -> Lsn:
        """End of the bytes made durable by `fsync()`."""
        return Lsn(self._flush)

    def segment_path(self, segno: int) -> Path:
        return self.directory / segment_file_name(segno, TIMELINE, self.seg_size)

    # --- write --------------------------------------------------------------------
    def append(self, lsn: Lsn, data: bytes) -> None:
        """Append `data`, which must start exactly at `end_lsn`."""
        if lsn.value != self._end:
            raise UserError(f"WAL append at {lsn} but the log in {self.directory} ends at "
                            f"{self.end_lsn}; WAL must arrive without gaps or overlap")
        pos = 0
        while pos < len(data):
            segno, offset = divmod(self._end, self.seg_size)
            fd = self._segment_fd(segno)
            n = min(len(data) - pos, self.seg_size - offset)
            written = os.pwrite(fd, data[pos:pos + n], offset)
            assert written == n, (written, n, segno, offset)  # regular files write fully
            pos += n
            self._end += n
        if data:
            self._keep_tail(lsn.value, bytes(data))

    def _keep_tail(self, lsn: int, data: bytes) -> None:
        tail = self._tail
        tail.append((lsn, data))
        self._tail_bytes += len(data)
        if self._tail_bytes - len(tail[0][1]) >= self.tail_bytes:
            drop = 0
            while self._tail_bytes - len(tail[drop][1]) >= self.tail_bytes:
                self._tail_bytes -= len(tail[drop][1])
                drop += 1
            self._tail = tail[drop:]

    def _segment_fd(self, segno: int) -> int:
        if self._fd_segno == segno:
            assert self._fd is not None
            return self._fd
        if self._fd is not None:
            # Finished segment: fsync it with the next fsync(), then close it.
            self._unsynced_fds.append(self._fd)
        path = self.segment_path(segno)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._fd_segno = segno
        fsync_dir(self.directory)  # the new file's name must survive too
        return self._fd

    def fsync(self) -> Lsn:
        """Make everything appended durable; returns the new `flush_lsn`."""
        end = self._end
        for fd in self._unsynced_fds:
            os.fsync(fd)
            os.close(fd)
        self._unsynced_fds.clear()
        if self._fd is not None and end > self._flush:
            os.fdatasync(self._fd)
        assert end >= self._flush, (end, self._flush)
        self._flush = end
        return Lsn(end)

    def publish(self) -> Lsn:
        """Move `flush_lsn` to the end without any fsync: for a log whose bytes past the
        consumer's durable point can be fetched again (the pageserver following the
        safekeepers: they keep WAL until the pageserver's durable LSN passes it). Finished
        segments are closed unsynced. Such a log's tail is not trusted after a restart: its
        owner cuts it back to where ingest resumes (`TimelineWal.start`)."""
        for fd in self._unsynced_fds:
            os.close(fd)
        self._unsynced_fds.clear()
        self._flush = self._end
        return Lsn(self._end)

    def sync_all(self) -> Lsn:
        """fsync every segment file of the log (after `publish()` left them unsynced)."""
        self.fsync()  # closes the finished segments' descriptors
        if self._end == self._start:
            return self.flush_lsn
        for segno in range(self._start // self.seg_size, (self._end - 1) // self.seg_size + 1):
            fd = os.open(self.segment_path(segno), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.flush_lsn

    # --- another process appends (walreceiver_proc) ------------------------------
    def advance_to(self, lsn: Lsn) -> None:
        """Another process appended and fsynced this log up to `lsn`; this object
        only reads and trims it."""
        assert self._fd is None, "this WalLog appends itself"
        if lsn.value > self._end:
            self._end = self._flush = lsn.value

    def reload_end(self) -> Lsn:
        """Take the end from the segment files, after the process that appended to
        them exited (what it wrote counts as durable, as on `open`)."""
        assert self._fd is None, "this WalLog appends itself"
        with self._files_lock:
            end = _find_end(self.directory, self.start_lsn, self.seg_size).value
        assert end >= self._flush, (Lsn(end), self.flush_lsn)
        self._end = self._flush = end
        return Lsn(end)

    # --- read ---------------------------------------------------------------------
    def read(self, start_lsn: Lsn, end_lsn: Lsn) -> bytes:
        """The bytes [start_lsn, end_lsn), which must lie within the log."""
        start, end = start_lsn.value, end_lsn.value
        if start < self._start or end > self._end or start > end:
            raise UserError(f"WAL range {start_lsn}..{end_lsn} is not in the log "
                            f"({self.start_lsn}..{self.end_lsn}) in {self.directory}")
        cached = _read_tail(self._tail, start, end)
        if cached is not None:
            return cached
        parts = []
        pos = start
        while pos < end:
            segno, offset = divmod(pos, self.seg_size)
            n = min(end - pos, self.seg_size - offset)
            path = self.segment_path(segno)
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(n)
            if len(chunk) != n:
                raise CorruptionError(f"WAL segment is short: wanted {n} bytes for "
                                      f"{Lsn(pos)}, found {len(chunk)}", path=str(path),
                                      offset=offset)
            parts.append(chunk)
            pos += n
        return b"".join(parts)

    # --- trim ---------------------------------------------------------------------
    def remove_below(self, lsn: Lsn) -> int:
        """Delete whole segments that end at or below `lsn` (never the one being
        written). Returns how many were removed; `start_lsn` moves up accordingly."""
        with self._files_lock:
            return self._remove_below(lsn)

    def _remove_below(self, lsn: Lsn) -> int:
        keep_from_segno = min(lsn.value, self._flush) // self.seg_size
        first_segno = self._start // self.seg_size
        if keep_from_segno <= first_segno:
            return 0
        new_start = keep_from_segno * self.seg_size
        # Move the start first: a crash between the two steps leaves stray old
        # files, never a log that claims bytes it has lost.
        _write_meta(self.directory, Lsn(new_start), self.seg_size)
        self._start = new_start
        removed = 0
        for segno in range(first_segno, keep_from_segno):
            try:
                self.segment_path(segno).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        fsync_dir(self.directory)
        log.info("removed %d WAL segments below %s from %s", removed, self.start_lsn,
                 self.directory)
        return removed

    def close(self) -> None:
        for fd in self._unsynced_fds:
            os.close(fd)
        self._unsynced_fds.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._fd_segno = -1


def _read_tail(tail: list[tuple[int, bytes]], start: int, end: int) -> bytes | None:
    """The bytes [start, end) from the in-memory tail, or None if it does not hold them all."""
    if not tail or start < tail[0][0] or start == end:
        return None
    parts: list[bytes] = []
    for i in range(len(tail) - 1, -1, -1):  # the newest first: reads are near the end
        lsn, data = tail[i]
        if lsn >= end:
            continue  # appended after what is asked for
        parts.append(data[max(start - lsn, 0):end - lsn])
        if lsn <= start:
            break
    parts.reverse()
    out = b"".join(parts)
    return out if len(out) == end - start else None


def _write_meta(directory: Path, start_lsn: Lsn, seg_size: int) -> None:
    write_atomic(directory / META_FILE,
                 json.dumps({"start_lsn": str(start_lsn), "seg_size": seg_size}).encode())


def _find_end(directory: Path, start_lsn: Lsn, seg_size: int) -> Lsn:
    """The end of the log: the highest segment's size, checking there are no holes."""
    segnos = []
    for entry in directory.iterdir():
        if len(entry.name) == 24 and entry.name.isalnum():
            try:
                tli, segno = parse_segment_file_name(entry.name, seg_size)
            except UserError:
                continue
            if tli == TIMELINE:
                segnos.append(segno)
    first = start_lsn.value // seg_size
    segnos = sorted(s for s in segnos if s >= first)  # older strays: left from a trim
    if not segnos:
        return start_lsn
    if segnos != list(range(first, segnos[-1] + 1)):
        raise CorruptionError(f"WAL log segments are not contiguous from {start_lsn}: "
                              f"{[segment_file_name(s, TIMELINE, seg_size) for s in segnos]}",
                              path=str(directory))
    for segno in segnos[:-1]:
        path = directory / segment_file_name(segno, TIMELINE, seg_size)
        size = path.stat().st_size
        if size != seg_size:
            raise CorruptionError(f"WAL segment before the last one has {size} bytes, "
                                  f"expected {seg_size}", path=str(path))
    last = segnos[-1]
    size = (directory / segment_file_name(last, TIMELINE, seg_size)).stat().st_size
    end = last * seg_size + size
    if end < start_lsn.value:
        # The first segment's file exists but nothing past start_lsn was written.
        return start_lsn
    return Lsn(end)

"""The LSN-time index of a timeline: when each commit happened, for point-in-time reads.

Ingest records (end LSN, commit timestamp in microseconds since the Unix epoch) for each
commit record, in LSN order. `find(ts)` answers "the end LSN of the last commit at or
before ts" (branch at a time, the PITR part of the GC cutoff). Commit timestamps are not
strictly ordered in WAL (a commit can get its timestamp before an earlier-LSN one), so
the search runs over the prefix maximum of the timestamps: the answer is the last entry
whose timestamp and every earlier one are <= ts.

The index is kept in memory and appended to the file `lsn_time` (packed u64 LSN, u64
timestamp, little-endian) up to disk_consistent_lsn at each flush. Loading drops a torn
last entry and entries above disk_consistent_lsn (ingest re-feeds that WAL).
"""

from __future__ import annotations

import bisect
import os
import struct
from pathlib import Path

LSN_TIME_FILE = "lsn_time"
_ENTRY = struct.Struct("<QQ")
_INF = (1 << 64) - 1


class LsnTimeIndex:
    """(lsn, ts_us) entries with lsn increasing, persisted to `directory/lsn_time`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LSN_TIME_FILE
        self._entries: list[tuple[int, int]] = []  # (lsn, ts_us), lsn increasing
        self._prefix_max: list[int] = []  # max timestamp of entries [0, i]
        self._persisted = 0  # entries already in the file

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, upto: int) -> None:
        """Read the file, keeping entries at or below `upto` (disk_consistent_lsn); the
        file is cut back to them if it holds more or ends in a torn entry."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        keep = 0
        for off in range(0, len(data) - len(data) % _ENTRY.size, _ENTRY.size):
            lsn, ts = _ENTRY.unpack_from(data, off)
            if lsn > upto:
                break
            self._append(lsn, ts)
            keep = off + _ENTRY.size
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        self._persisted = len(self._entries)

    def put(self, lsn: int, ts_us: int) -> None:
        """The commit ending at `lsn` has timestamp `ts_us`; an LSN at or below the last
        entry's (WAL re-fed after a restart, or a duplicate) is ignored."""
        if self._entries and lsn <= self._entries[-1][0]:
            return
        self._append(lsn, ts_us)

    def _append(self, lsn: int, ts_us: int) -> None:
        prev_max = self._prefix_max[-1] if self._prefix_max else 0
        self._entries.append((lsn, ts_us))
        self._prefix_max.append(max(prev_max, ts_us))

    def find(self, ts_us: int, max_lsn: int = _INF) -> int | None:
        """End LSN of the last commit at or before `ts_us` among entries at or below
        `max_lsn`, or None if there is none."""
        limit = bisect.bisect_right(self._entries, (max_lsn, _INF))
        i = bisect.bisect_right(self._prefix_max, ts_us, 0, limit) - 1
        return self._entries[i][0] if i >= 0 else None

    def persist(self, upto: int) -> None:
        """Append the entries at or below `upto` not yet in the file, then fsync."""
        start = self._persisted
        end = bisect.bisect_right(self._entries, (upto, _INF), lo=start)
        if end == start:
            return
        data = b"".join(_ENTRY.pack(lsn, ts) for lsn, ts in self._entries[start:end])
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._persisted = end

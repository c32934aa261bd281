"""Which blocks of one relation segment file still come from the pageserver (no I/O).

A segment file that existed at the start LSN X starts with `remote_limit` = its size in
blocks at X and no block local. A block below `remote_limit` that is not local is read
from the pageserver at X (exact, because every later change was made by this compute and
is local, D6). A write makes the blocks it covers local; a truncate lowers
`remote_limit` for good, so a block at or past a local truncate is never fetched again
(it reads as what the compute wrote since, or zeros). A re-created file has no
`RemoteFile` at all.

Readahead: the file remembers a few streams, each the end of what its last fetch
brought in and its window. A miss at (or a little past) a stream's end continues that
stream and doubles its window (up to `max_window` blocks); any other miss starts a new
stream at the size of the read. Several streams, and the slack past a stream's end,
are for parallel sequential scans: their workers take chunks of a relation in turn
(`table_block_parallelscan_nextpage`, tableam.c), so no single reader is sequential.
"""

from __future__ import annotations

import threading

from strata.pg.constants import BLCKSZ
from strata.pg.relfile import RelTag

DEFAULT_MAX_WINDOW = 128  # blocks (1 MiB): a GetPages batch holds up to 256
MAX_STREAMS = 8
STREAM_SLACK = 16  # blocks past a stream's end that still continue it


class RemoteFile:
    """One segment file's remote part. Callers hold `lock` around every method."""

    def __init__(self, source: RelTag, first_block: int, nblocks: int,
                 max_window: int = DEFAULT_MAX_WINDOW) -> None:
        assert nblocks >= 0 and first_block >= 0, (nblocks, first_block)
        self.source = source
        """The fork pages come from (the init fork for an unlogged relation's main fork)."""
        self.first_block = first_block
        """Block number, in the relation, of this segment's block 0."""
        self.remote_limit = nblocks
        self.present = bytearray(nblocks)
        self.local_count = 0
        self.max_window = max_window
        self._streams: dict[int, int] = {}  # end of a stream's last fetch -> its window
        self.lock = threading.Lock()

    def is_local(self, blkno: int) -> bool:
        """True when the block's content is in the local store (or never remote)."""
        return blkno >= self.remote_limit or self.present[blkno] == 1

    def missing(self, first: int, end: int) -> list[int]:
        """Blocks in [first, end) that must be fetched before they can be read."""
        end = min(end, self.remote_limit)
        present = self.present
        return [b for b in range(first, end) if not present[b]]

    def plan_fetch(self, first: int, end: int) -> list[int]:
        """Blocks to fetch for a read of [first, end): the missing ones plus readahead."""
        wanted = self.missing(first, end)
        if not wanted:
            return []
        window = end - first
        for stream_end, stream_window in self._streams.items():
            if stream_end <= first < stream_end + STREAM_SLACK:
                del self._streams[stream_end]
                window = min(max(stream_window * 2, window), self.max_window)
                break
        ahead_end = max(end, first + window)
        self._streams[ahead_end] = window
        if len(self._streams) > MAX_STREAMS:
            del self._streams[next(iter(self._streams))]  # the oldest
        if ahead_end > end:
            wanted += self.missing(end, ahead_end)
        return wanted

    def mark_local(self, first: int, end: int) -> None:
        """Blocks [first, end) now hold their content locally (written or fetched)."""
        present = self.present
        for b in range(first, min(end, self.remote_limit)):
            if not present[b]:
                present[b] = 1
                self.local_count += 1

    def truncate(self, size_bytes: int) -> None:
        """The file was cut to `size_bytes`: nothing at or past the cut is fetched again.

        A cut inside a block keeps that block remote-capable only if it is local already;
        the caller makes a partial last block local before cutting."""
        limit = size_bytes // BLCKSZ
        if size_bytes % BLCKSZ:
            assert limit >= self.remote_limit or self.present[limit], (
                f"cut at {size_bytes} bytes inside block {limit}, which is not local")
            limit += 1
        if limit < self.remote_limit:
            self.local_count -= sum(self.present[limit:self.remote_limit])
            self.remote_limit = limit
            del self.present[limit:]

    @property
    def fully_local(self) -> bool:
        return self.local_count == self.remote_limit

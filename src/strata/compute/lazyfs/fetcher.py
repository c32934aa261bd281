"""Pages of relation blocks at the compute's start LSN, fetched from the pageserver.

One `PageFetcher` serves every thread of the file system through one pipelined
pagestream connection (`PageClientSync`): a read's blocks and its readahead go out as
GetPages batches of up to `pagestream.MAX_BATCH_PAGES` blocks. When pg_control says data
checksums are on, each page gets its checksum set for its block number, as a full
basebackup does (WAL images carry a stale one, D2).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from strata.common.lsn import Lsn
from strata.pg.checksum import with_checksum
from strata.pg.constants import BLCKSZ
from strata.pg.relfile import RelTag


class PageSource(Protocol):
    def get_pages(self, blocks: Iterable[tuple[RelTag, int]], lsn: Lsn) -> list[bytes]: ...


class PageFetcher:
    """GetPage@LSN for the file system, with counters for the bench and the tests."""

    def __init__(self, source: PageSource, lsn: Lsn, *, checksums: bool = False) -> None:
        self.source = source
        self.lsn = lsn
        self.checksums = checksums
        self._lock = threading.Lock()
        self.requests = 0
        self.pages = 0

    def fetch(self, rel: RelTag, blknos: list[int]) -> list[bytes]:
        """Pages of `rel` at the start LSN, in the order of `blknos` (relation block numbers)."""
        return self.fetch_blocks([(rel, b) for b in blknos])

    def fetch_blocks(self, blocks: list[tuple[RelTag, int]]) -> list[bytes]:
        """Pages of blocks of any relations at the start LSN, in order (one GetPages per
        `pagestream.MAX_BATCH_PAGES` blocks; the prewarm's batches span files)."""
        pages = self.source.get_pages(blocks, self.lsn)
        assert len(pages) == len(blocks), (len(pages), len(blocks))
        for page in pages:
            assert len(page) == BLCKSZ, (blocks[0], len(page))
        if self.checksums:
            pages = [with_checksum(p, b) for p, (_, b) in zip(pages, blocks, strict=True)]
        with self._lock:
            self.requests += 1
            self.pages += len(blocks)
        return pages

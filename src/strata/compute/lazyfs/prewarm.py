"""The blocks a lazy compute reads first, remembered for its next start (issue 13).

A lazy compute's first connection builds its caches from the catalogs: ~350 pages in ~200
GetPage round trips, each one a FUSE read that waits for the pageserver, which made the
first query after `strata endpoint start` the slowest part of the start after the CLI's
own. The same pages are read at every start (the startup's and the first connection's
catalog reads, then the application's first queries), so the FUSE server remembers
them:

* `ReadLog` notes the first `RECORD_BLOCKS` distinct blocks of remote segment files that
  PostgreSQL reads (whether they were fetched or already local), in order, and saves
  them to the endpoint's prewarm file (`--prewarm-file`, `endpoints/NAME/prewarm`) once
  it has that many, or as the server exits;
* `prewarm` runs in a thread of the next start's FUSE server as soon as its store is
  planned (before PostgreSQL starts): it fetches the listed blocks that are still
  remote, `BATCH_BLOCKS` at a time in one GetPages across files (on the connection the
  reads use, pipelined with them), and installs them the way a read does
  (`LazyFs._install`: a block written, or truncated away, meanwhile is left alone). A
  read that comes first fetches its block itself; the prewarm then skips it. Paths
  that no longer exist (a table rewritten since) are skipped. The file is a hint: a
  missing or unreadable one means no prewarm.

Format: one line per file, `PATH BLOCK,BLOCK,...` (segment-relative block numbers, in
the order of their first read), e.g. `/base/16384/1259 0,1,2`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from strata.common.durable import write_atomic

if TYPE_CHECKING:
    from strata.compute.lazyfs.blockstate import RemoteFile
    from strata.compute.lazyfs.fs import LazyFs

log = logging.getLogger(__name__)

RECORD_BLOCKS = 1024  # 8 MiB; a first query at 22 MB and at 5 GB read ~350
BATCH_BLOCKS = 64  # per GetPages, across files: a read that comes meanwhile waits for
# one batch at most on the shared connection
_MAX_READ_BLOCKS = 32  # of one read: more is a scan, not the working set


class ReadLog:
    """The first `limit` distinct blocks read from remote segment files, in order."""

    def __init__(self, path: Path, limit: int = RECORD_BLOCKS) -> None:
        self.path = path
        self.limit = limit
        self.full = False
        self.saved = False
        self._seen: set[tuple[str, int]] = set()
        self._order: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def note(self, path: str, first: int, end: int) -> None:
        """A read of blocks [first, end) of the remote segment file at `path`."""
        if self.full:
            return
        with self._lock:
            for blkno in range(first, min(end, first + _MAX_READ_BLOCKS)):
                key = (path, blkno)
                if key not in self._seen and len(self._order) < self.limit:
                    self._seen.add(key)
                    self._order.append(key)
            if len(self._order) >= self.limit and not self.full:
                self.full = True
                # Not in the reader's way: the save fsyncs.
                threading.Thread(target=self.save, daemon=True, name="prewarm-save").start()

    def save(self) -> None:
        """Write the list to `path` (once; nothing when no block was read)."""
        with self._lock:
            if self.saved or not self._order:
                return
            self.saved = True
            by_path: dict[str, list[int]] = {}
            for path, blkno in self._order:
                by_path.setdefault(path, []).append(blkno)
        text = "".join(f"{path} {','.join(map(str, blocks))}\n"
                       for path, blocks in by_path.items())
        try:
            write_atomic(self.path, text.encode())
        except OSError as err:
            log.warning("could not save the blocks read first to %s: %s", self.path, err)


def load(path: Path) -> list[tuple[str, list[int]]]:
    """The prewarm file's (path, blocks) in order; [] when it is missing or unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return []
    plan = []
    for line in text.splitlines():
        name, _, blocks = line.partition(" ")
        try:
            numbers = [int(b) for b in blocks.split(",")]
        except ValueError:
            log.warning("prewarm file %s: ignoring the line %r", path, line[:80])
            continue
        if name.startswith("/") and all(b >= 0 for b in numbers):
            plan.append((name, numbers))
    return plan


def prewarm(ops: LazyFs, plan: list[tuple[str, list[int]]]) -> int:
    """Fetch and install the planned blocks that are still remote, in GetPages of
    `BATCH_BLOCKS` blocks across files; returns how many it fetched. Errors end the
    prewarm (logged), never the file system."""
    started = time.monotonic()
    fetched = 0
    todo: list[tuple[str, RemoteFile, int]] = []
    for path, blocks in plan:
        rf = ops.remote_file(path)
        if rf is not None:  # else gone, re-created, or never remote
            todo.extend((path, rf, b) for b in blocks)
    try:
        for i in range(0, len(todo), BATCH_BLOCKS):
            wanted: dict[str, tuple[RemoteFile, list[int]]] = {}
            for path, rf, blkno in todo[i:i + BATCH_BLOCKS]:
                with rf.lock:
                    if rf.is_local(blkno):
                        continue  # a read fetched it first, or it was written
                wanted.setdefault(path, (rf, []))[1].append(blkno)
            fds: list[int] = []
            try:
                batch = []
                for path, (rf, blocks) in wanted.items():
                    fds.append(os.open(ops.store_path(path), os.O_RDWR))
                    batch.append((rf, fds[-1], blocks))
                if batch:
                    fetched += ops.install_fetched(batch)
            finally:
                for fd in fds:
                    os.close(fd)
    except Exception as err:  # noqa: BLE001  # a hint: the reads fetch what is missing
        log.warning("prewarm stopped after %d blocks: %s", fetched, err)
    log.info("prewarm: fetched %d of %d listed blocks in %.3f s", fetched,
             sum(len(b) for _, b in plan), time.monotonic() - started)
    return fetched

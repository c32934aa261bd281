"""The FUSE file system over `base/` and `global/` of a lazy compute (D6).

Every file and directory the compute sees is a real one in a local directory (the store
tree), so sizes, listings, renames, unlinks, permissions and `statfs` are those of local
disk. A segment file that existed at the start LSN X was created there as a sparse file
of its size at X and has a `RemoteFile`: reading one of its blocks that is not local yet
fetches it (plus readahead) from the pageserver at X and writes it into the store file
first, so later reads are local. Writes go to the store file synchronously (the kernel
does not cache writes, `writeback_cache` is off): a write error such as a full disk is
returned to PostgreSQL, and `fsync` returns once the store file is fsynced. Written
blocks are never evicted: the store lives as long as the compute.

Invariants, each kept under the file's `RemoteFile.lock`:
* a fetched page is installed only into a block that is still remote and not local, so
  it never overwrites a write, and nothing at or past a truncate is ever fetched;
* a partial write or a truncate inside a remote block fetches that block first;
* a file created, or renamed over, by the compute has no remote part.

The segment files themselves do not exist in the store until first used: each operation
on a path creates its file first (`layout.py`, `Layout.ready`), and a listing shows those
not created yet, so every operation sees the full layout.

PostgreSQL reads and writes whole 8 KB blocks (md.c); anything else works too, only
slower. Operations PostgreSQL never uses on these directories (symlinks, hard links,
extended attributes, locks) are refused with EPERM/ENOTSUP by the binding's defaults.
There is no `flush` (the `close` of a file): writes are already in the store file, so
there is nothing to do, and without one libfuse answers the kernel's first FLUSH with
ENOSYS, after which the kernel sends none (`close` returns 0): one round trip to this
process less per close (~7,000 in the regression suite's quick schedule, 11% of its
operations; docs/findings.md).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import mfusepy as fuse

from strata.common.errors import StrataError
from strata.compute.lazyfs.blockstate import RemoteFile
from strata.compute.lazyfs.fetcher import PageFetcher
from strata.compute.lazyfs.layout import Layout
from strata.compute.lazyfs.prewarm import ReadLog
from strata.pg.constants import BLCKSZ

log = logging.getLogger(__name__)

_STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_blocks", "st_blksize")
_STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                   "f_ffree", "f_favail", "f_flag", "f_namemax")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # fuse_common.h (libfuse 3)


@dataclass(slots=True)
class OpenFile:
    fd: int
    remote: RemoteFile | None
    path: str


def _ceil_blocks(nbytes: int) -> int:
    return -(-nbytes // BLCKSZ)


class LazyFs(fuse.Operations):  # type: ignore[misc]  # untyped base class
    """mfusepy operations over `tree` (paths are FUSE paths: "/base/5/16384")."""

    use_ns = True

    def __init__(self, tree: str, fetcher: PageFetcher | None,
                 remote: dict[str, RemoteFile], layout: Layout | None = None) -> None:
        self.tree = tree.rstrip("/")
        self.fetcher = fetcher
        self.remote = remote
        self.layout = layout or Layout(tree, {}, os.getuid(), os.getgid())
        self._lock = threading.Lock()  # guards self.remote (the dict) and self._open
        self._open: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)
        self.fetch_errors = 0
        self.reads: ReadLog | None = None
        """Notes the blocks read first, for the next start's prewarm (prewarm.py)."""

    # --- helpers -----------------------------------------------------------------------
    def _real(self, path: str) -> str:
        """The store path of `path`, whose file now exists if the layout lists it."""
        assert path.startswith("/"), path
        self.layout.ready(path)
        return self.tree + path if path != "/" else self.tree

    def _file(self, fh: int) -> OpenFile:
        try:
            return self._open[fh]
        except KeyError:
            raise fuse.FuseOSError(errno.EBADF) from None

    def _remote(self, path: str | None, fh: int | None) -> RemoteFile | None:
        if fh is not None:
            return self._file(fh).remote
        assert path is not None, "neither a path nor a file handle"
        with self._lock:
            return self.remote.get(path)

    def _fetch(self, rf: RemoteFile, blocks: list[int]) -> list[bytes]:
        if self.fetcher is None:
            raise AssertionError(f"blocks {blocks[:4]} of {rf.source} are remote, but this "
                                 "file system has no pageserver")
        try:
            return self.fetcher.fetch(rf.source, [rf.first_block + b for b in blocks])
        except StrataError as err:
            self.fetch_errors += 1
            log.error("could not fetch %d blocks of %s from %d at %s: %s", len(blocks),
                      rf.source, rf.first_block + blocks[0], self.fetcher.lsn, err)
            raise fuse.FuseOSError(errno.EIO) from err

    def _install(self, rf: RemoteFile, fd: int, blocks: list[int],
                 pages: list[bytes]) -> dict[int, bytes]:
        """Write fetched pages into the store; returns those that did not fit (full disk)."""
        unplaced: dict[int, bytes] = {}
        with rf.lock:
            for blkno, page in zip(blocks, pages, strict=True):
                if rf.is_local(blkno):
                    continue  # written or truncated away since the fetch was planned
                try:
                    os.pwrite(fd, page, blkno * BLCKSZ)
                except OSError as err:
                    if err.errno not in _NO_SPACE:
                        raise
                    unplaced[blkno] = page
                    continue
                rf.mark_local(blkno, blkno + 1)
        return unplaced

    # --- for the prewarm (prewarm.py) -------------------------------------------------------
    def remote_file(self, path: str) -> RemoteFile | None:
        with self._lock:
            return self.remote.get(path)

    def store_path(self, path: str) -> str:
        """The store file of `path` (created first if the layout still has it pending)."""
        return self._real(path)

    def install_fetched(self, batch: list[tuple[RemoteFile, int, list[int]]]) -> int:
        """Fetch the blocks of several files (file, store fd, blocks) in one round trip and
        install those still remote; returns how many were fetched (what a full disk cannot
        take is left remote: a read fetches it again)."""
        assert self.fetcher is not None, "prewarm without a pageserver"
        wanted = [(rf.source, rf.first_block + b) for rf, _, blocks in batch for b in blocks]
        try:
            pages = self.fetcher.fetch_blocks(wanted)
        except StrataError as err:
            self.fetch_errors += 1
            log.error("could not fetch %d blocks at %s: %s", len(wanted), self.fetcher.lsn,
                      err)
            raise
        at = 0
        for rf, fd, blocks in batch:
            self._install(rf, fd, blocks, pages[at:at + len(blocks)])
            at += len(blocks)
        return len(wanted)

    def _make_local(self, rf: RemoteFile, fd: int, blocks: list[int]) -> None:
        """Fetch and install `blocks` that are still remote (before a partial overwrite)."""
        with rf.lock:
            need = [b for b in blocks if not rf.is_local(b)]
        if need and self._install(rf, fd, need, self._fetch(rf, need)):
            raise fuse.FuseOSError(errno.ENOSPC)

    @staticmethod
    def _owner() -> tuple[int, int]:
        uid, gid, _pid = fuse.fuse_get_context()
        return uid, gid

    # --- set-up ------------------------------------------------------------------------
    def init_with_config(self, conn_info: Any, config: Any) -> None:
        if conn_info is not None:
            # No kernel readahead: it would turn every random 8 KB miss into a 128 KB
            # fetch from the pageserver. Sequential reads get ours (blockstate.py).
            conn_info.max_readahead = 0
            # Every change comes through this mount, so a changed mtime never means
            # that cached pages are stale: without this, each write to a relation
            # dropped the kernel's cache of the whole file at the next attribute
            # refresh (fuse_common.h, FUSE_CAP_AUTO_INVAL_DATA).
            conn_info.want &= ~_FUSE_CAP_AUTO_INVAL_DATA
        if config is not None:
            # Every change goes through this mount, so the kernel may keep pages and
            # attributes across opens (each backend opens the files itself).
            config.kernel_cache = 1
            config.attr_timeout = 5.0
            config.entry_timeout = 5.0
            config.negative_timeout = 0.0
            config.hard_remove = 1  # unlink for real; open handles keep the store file
        log.info("mounted %s", self.tree)

    # --- attributes --------------------------------------------------------------------
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(self._file(fh).fd) if fh is not None else os.lstat(
            self._real(path or "/"))
        attrs: dict[str, Any] = {k: getattr(st, k) for k in _STAT_FIELDS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._real(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._real(path))
        else:
            os.utime(self._real(path), ns=times)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        rf = self._remote(path, fh)
        fd = self._file(fh).fd if fh is not None else None
        if rf is None:
            if fd is not None:
                os.ftruncate(fd, length)
            else:
                os.truncate(self._real(path or "/"), length)
            return 0
        own_fd = fd is None
        if own_fd:
            fd = os.open(self._real(path or "/"), os.O_RDWR)
        assert fd is not None
        try:
            if length % BLCKSZ:
                self._make_local(rf, fd, [length // BLCKSZ])
            with rf.lock:
                os.ftruncate(fd, length)
                rf.truncate(length)
        finally:
            if own_fd:
                os.close(fd)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.tree)
        return {k: getattr(st, k) for k in _STATVFS_FIELDS}

    # --- directories -------------------------------------------------------------------
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.layout.names(path)]

    def mkdir(self, path: str, mode: int) -> int:
        real = self._real(path)
        os.mkdir(real, mode)
        os.chown(real, *self._owner())
        return 0

    def rmdir(self, path: str) -> int:
        self.layout.ready_under(path)  # a directory with pending files is not empty
        os.rmdir(self._real(path))
        self._forget_under(path)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        dfd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return 0

    def _forget_under(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        with self._lock:
            for key in [k for k in self.remote if k.startswith(prefix)]:
                del self.remote[key]

    # --- names -------------------------------------------------------------------------
    def unlink(self, path: str) -> int:
        os.unlink(self._real(path))
        with self._lock:
            self.remote.pop(path, None)
        return 0

    def rename(self, old: str, new: str) -> int:
        self.layout.ready_under(old)
        self.layout.ready_under(new)
        os.rename(self._real(old), self._real(new))
        with self._lock:
            self.remote.pop(new, None)  # the file renamed over is gone
            if old in self.remote:
                self.remote[new] = self.remote.pop(old)
            prefix = old.rstrip("/") + "/"
            for key in [k for k in self.remote if k.startswith(prefix)]:
                self.remote[new.rstrip("/") + "/" + key[len(prefix):]] = self.remote.pop(key)
        return 0

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    # --- files -------------------------------------------------------------------------
    def _register(self, path: str, fd: int) -> int:
        fh = next(self._fh)
        with self._lock:
            self._open[fh] = OpenFile(fd, self.remote.get(path), path)
        return fh

    def open(self, path: str, flags: int) -> int:
        # The store file is always opened read-write: a read may install fetched pages.
        fd = os.open(self._real(path), os.O_RDWR)
        fh = self._register(path, fd)
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fh)
        return fh

    def create(self, path: str, mode: int, flags: int) -> int:
        real = self._real(path)
        fd = os.open(real, os.O_RDWR | os.O_CREAT | (flags & os.O_EXCL), mode & 0o7777)
        try:
            os.fchown(fd, *self._owner())
            if os.fstat(fd).st_size == 0:
                # A (re-)created file: nothing of it is ever fetched from the pageserver.
                with self._lock:
                    self.remote.pop(path, None)
        except BaseException:
            os.close(fd)
            raise
        return self._register(path, fd)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        of = self._file(fh)
        rf = of.remote
        if rf is None or size == 0:
            return os.pread(of.fd, size, offset)
        first, end = offset // BLCKSZ, _ceil_blocks(offset + size)
        if self.reads is not None:
            self.reads.note(of.path, first, end)
        if rf.fully_local:
            return os.pread(of.fd, size, offset)
        with rf.lock:
            wanted = rf.plan_fetch(first, end)
        if not wanted:
            return os.pread(of.fd, size, offset)
        unplaced = self._install(rf, of.fd, wanted, self._fetch(rf, wanted))
        data = os.pread(of.fd, size, offset)
        if not unplaced:
            return data
        # The store is full: serve the pages that did not fit from memory.
        out = bytearray(data)
        for blkno, page in unplaced.items():
            lo, hi = max(blkno * BLCKSZ, offset), min((blkno + 1) * BLCKSZ, offset + len(out))
            if lo < hi:
                out[lo - offset:hi - offset] = page[lo - blkno * BLCKSZ:hi - blkno * BLCKSZ]
        return bytes(out)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        of = self._file(fh)
        rf = of.remote
        if rf is None or rf.fully_local:
            return os.pwrite(of.fd, data, offset)
        end_byte = offset + len(data)
        first, end = offset // BLCKSZ, _ceil_blocks(end_byte)
        edges = sorted({b for b, partial in ((first, offset % BLCKSZ != 0),
                                             (end - 1, end_byte % BLCKSZ != 0)) if partial})
        if edges:
            self._make_local(rf, of.fd, edges)
        with rf.lock:
            written = os.pwrite(of.fd, data, offset)
            rf.mark_local(first, _ceil_blocks(offset + written))
        return written

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        fd = self._file(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        with self._lock:
            of = self._open.pop(fh, None)
        if of is not None:
            os.close(of.fd)
        return 0

    def destroy(self, path: str) -> None:
        with self._lock:
            for of in self._open.values():
                os.close(of.fd)
            self._open.clear()
        if self.fetcher is not None:
            log.info("unmounted %s: fetched %d pages in %d requests", self.tree,
                     self.fetcher.pages, self.fetcher.requests)

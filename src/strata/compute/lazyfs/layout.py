"""Which segment files of the basebackup's relation list are not yet created in the store.

The store gets every segment file of `strata_lazy_rels` as a sparse file of its size at X
(`manifest.py`), created when first used rather than before the mount: creating all
~1,250 files of an empty database took 0.3 s of the start on a quiet machine and over a
second on a busy one (each `open(O_CREAT)` waits for the file system's journal), and
creating them in a background thread instead slowed what ran meanwhile just as much (the
safekeepers' fsyncs of the walproposer's election share that journal), while PostgreSQL
needs only a few dozen of them to start and answer a first query. Every operation on a
path first creates that path's file if it is still pending (`ready`; the kernel looks a
name up, which is `getattr`, before any other operation on it), so PostgreSQL never
sees the difference:

* a path leaves `pending` only after its file exists (under `Layout`'s lock), so an
  operation that finds it not pending finds the file;
* a listing shows the pending names too (`names`: PostgreSQL's start scans the database
  directories for temporary and unlogged files by name);
* `rmdir` and `rename` of a directory first create everything pending under it
  (`ready_under`), so `ENOTEMPTY` and the moved contents are those of the full layout.

A pending file costs nothing but its entry here; `ready` on a path that is not pending
is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
from pathlib import Path

from strata.common.errors import UserError
from strata.compute.lazyfs import MANIFEST_NAME, TREE
from strata.compute.lazyfs.blockstate import DEFAULT_MAX_WINDOW, RemoteFile
from strata.compute.lazyfs.manifest import parse_manifest, segment_files
from strata.pg.constants import BLCKSZ
from strata.pg.controlfile import ControlFileData

log = logging.getLogger(__name__)


class Layout:
    """Sparse files still to create under `tree` (FUSE path -> size in bytes), owned by
    `uid`/`gid` with mode 0600, as PostgreSQL's own files."""

    def __init__(self, tree: str, files: dict[str, int], uid: int, gid: int) -> None:
        self._tree = tree.rstrip("/")
        self._uid, self._gid = uid, gid
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._by_dir: dict[str, set[str]] = {}
        for path, size in files.items():
            assert path.startswith("/") and size >= 0, (path, size)
            self._pending[path] = size
            parent, name = posixpath.split(path)
            self._by_dir.setdefault(parent, set()).add(name)

    @property
    def complete(self) -> bool:
        return not self._pending

    def ready(self, path: str) -> None:
        """Create `path`'s file if it is still pending."""
        # A path leaves `_pending` only after its file exists, and never comes back: one
        # not found here without the lock has its file.
        if path not in self._pending:
            return
        with self._lock:
            self._create(path)

    def ready_under(self, path: str) -> None:
        """Create `path` and every pending file below it (before rmdir or rename)."""
        if not self._pending:
            return
        prefix = path.rstrip("/") + "/"
        with self._lock:
            self._create(path)
            for parent in [d for d in self._by_dir if (d + "/").startswith(prefix)]:
                for name in sorted(self._by_dir.get(parent, ())):
                    self._create(posixpath.join(parent, name))

    def names(self, path: str) -> list[str]:
        """The entries of directory `path`: those in the store and those still pending."""
        with self._lock:
            pending = self._by_dir.get(path.rstrip("/") or "/", set())
            real = os.listdir(self._tree + path if path != "/" else self._tree)
            return real + sorted(pending.difference(real))

    def _create(self, path: str) -> bool:
        """Under the lock: the file, then it leaves `pending`. False if it was not pending."""
        size = self._pending.get(path)
        if size is None:
            return False
        fd = os.open(self._tree + path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fchown(fd, self._uid, self._gid)
        finally:
            os.close(fd)
        del self._pending[path]
        parent, name = posixpath.split(path)
        self._by_dir[parent].discard(name)
        if not self._by_dir[parent]:
            del self._by_dir[parent]
        return True


def plan_layout(store: Path, max_window: int = DEFAULT_MAX_WINDOW
                ) -> tuple[dict[str, RemoteFile], ControlFileData, Layout]:
    """The remote parts of the manifest's segment files in `store/tree`, the cluster's
    control file, and the `Layout` that creates those files (nothing is created here)."""
    tree = store / TREE
    control_path = tree / "global" / "pg_control"
    control = ControlFileData.from_bytes(control_path.read_bytes(), path=str(control_path))
    manifest = store / MANIFEST_NAME
    rels = parse_manifest(manifest.read_text(), str(manifest))
    owner = os.stat(tree)
    remote: dict[str, RemoteFile] = {}
    files: dict[str, int] = {}
    parents: set[str] = set()
    for seg in segment_files(rels, control.relseg_size):
        path = "/" + seg.path
        files[path] = seg.nblocks * BLCKSZ
        parents.add(posixpath.dirname(seg.path))
        if seg.nblocks:
            remote[path] = RemoteFile(seg.source, seg.first_block, seg.nblocks, max_window)
    for parent in sorted(parents):
        if not (tree / parent).is_dir():
            raise UserError(f"the lazy basebackup lists files in {parent} but has no such "
                            "directory: the basebackup is inconsistent")
    # A file the basebackup already has (it never should) would fail O_EXCL later, in an
    # operation of PostgreSQL's: refuse it now.
    for parent in sorted(parents):
        clash = [p for p in os.listdir(tree / parent) if "/" + parent + "/" + p in files]
        if clash:
            raise UserError(f"the lazy basebackup has relation files {clash[:3]} in {parent}"
                            " that its relation list names too: the basebackup is "
                            "inconsistent")
    return remote, control, Layout(str(tree), files, owner.st_uid, owner.st_gid)

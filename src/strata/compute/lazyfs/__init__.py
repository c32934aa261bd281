"""The lazy-mode storage layer of a compute (architecture D6): a FUSE file system.

It serves `base/` and `global/` of a compute's data directory. Every file lives in a
local, disk-backed store (`store.py`); a relation segment file that existed at the
compute's start LSN X also has blocks that are not local yet, which are fetched from the
pageserver with GetPage@X (`fetcher.py`, batched, with readahead) the first time they are
read. Which blocks are local is decided by `blockstate.py` (no I/O); `manifest.py` turns
the basebackup's relation list into segment files, which `layout.py` creates in the
store on first use; `fs.py` is the file system and
`__main__.py` the FUSE server's process (`python -m strata.compute.lazyfs mount ...`) and
`watch.py` its watchdog's (`python -m strata.compute.lazyfs.watch ...`).

The two names below are here, not in `manifest.py` and `layout.py`, so that the CLI's
`strata.compute.lazy` reaches them without importing those modules and their dataclasses.
"""

MANIFEST_NAME = "strata_lazy_rels"
"""The basebackup's list of relation files (`manifest.py`), moved into the store."""

TREE = "tree"
"""The store's directory of files that the FUSE server serves (`layout.py`)."""

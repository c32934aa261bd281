"""The lazy file system's per-operation counters (lazyfs/opstats.py) as the FUSE binding
sees them, over a real LazyFs on a store directory (no mount)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import mfusepy
import pytest

from strata.compute.lazyfs.fs import LazyFs
from strata.compute.lazyfs.opstats import OPS, Counted, OpStats


def test_counted_ops_are_counted_and_timed(tmp_path: Path) -> None:
    stats = OpStats()
    fs = Counted(LazyFs(str(tmp_path), None, {}), stats)
    fh = fs.create("/f", 0o600, os.O_WRONLY)
    assert fs.write("/f", b"x" * 8192, 0, fh) == 8192
    assert fs.read("/f", 8192, 0, fh) == b"x" * 8192
    assert fs.read("/f", 10, 8190, fh) == b"xx"
    fs.release("/f", fh)
    with pytest.raises(mfusepy.FuseOSError) as err:
        fs.read("/f", 1, 0, fh)  # released: the failure is counted too
    assert err.value.errno == errno.EBADF
    with pytest.raises(FileNotFoundError):
        fs.getattr("/missing")  # a lookup of a name that does not exist
    assert stats.counts == {"create": 1, "write": 1, "read": 3, "release": 1, "getattr": 1}
    assert stats.errors == {("read", "EBADF"): 1, ("getattr", "ENOENT"): 1}
    assert all(stats.ns[name] > 0 for name in stats.counts)
    summary = stats.summary()
    assert summary.startswith("7 operations: ")
    assert "read 3 " in summary and "create 1 " in summary
    assert " (EBADF 1)" in summary and " (ENOENT 1)" in summary


def test_counted_passes_everything_else_through(tmp_path: Path) -> None:
    ops = LazyFs(str(tmp_path), None, {})
    fs = Counted(ops, OpStats())
    assert fs.use_ns is True
    assert fs.init_with_config == ops.init_with_config  # not an operation: not wrapped
    # Operations LazyFs leaves to the binding keep their marker, so the binding still
    # leaves them out of what it registers with libfuse.
    assert getattr(fs.symlink, "libfuse_ignore", False) == getattr(ops.symlink,
                                                                   "libfuse_ignore", False)
    assert all(callable(getattr(ops, name)) for name in OPS)


def test_empty_summary() -> None:
    assert OpStats().summary() == "0 operations"

"""The last run's compute directory leaves the start's path (issue 13): a start renames it
aside and a detached `rm` deletes it; a stop sends the data directory and the lazy store
the same way and keeps the logs. And the FUSE server's start LSN from its stdin."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from polling import wait_until
from strata.common.errors import StrataError
from strata.common.lsn import Lsn
from strata.compute.lazyfs.__main__ import _start_lsn
from strata.control.endpoints import (
    OLD_COMPUTE_PREFIX,
    EndpointPaths,
    _discard_compute_data,
    remove_set_aside,
    set_aside_compute_root,
)


def _paths(tmp_path: Path) -> EndpointPaths:
    return EndpointPaths(root=tmp_path / "ep", socket_dir=tmp_path / "sock")


def _fill(paths: EndpointPaths) -> None:
    for sub in ("pgdata/pg_wal", "lazy/tree/base/5", "mnt"):
        (paths.compute_root / sub).mkdir(parents=True)
    for i in range(50):
        (paths.compute_root / "lazy/tree/base/5" / str(16384 + i)).write_bytes(b"x" * 8192)
    (paths.compute_root / "pgdata/pg_wal/000000010000000000000001").write_bytes(b"w" * 65536)
    (paths.compute_root / "lazyfs.log").write_text("file system server exits: ...\n")


def _aside(paths: EndpointPaths) -> list[Path]:
    return [p for p in paths.root.iterdir() if p.name.startswith(OLD_COMPUTE_PREFIX)]


def test_start_sets_the_old_compute_aside_and_rm_deletes_it(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    set_aside_compute_root(paths)  # nothing there yet: nothing to do
    assert not paths.root.exists()
    _fill(paths)
    set_aside_compute_root(paths)
    assert not paths.compute_root.exists()
    [old] = _aside(paths)
    assert (old / "lazyfs.log").is_file() and (old / "lazy/tree/base/5/16384").is_file()
    paths.compute_root.mkdir()  # the new compute
    (paths.compute_root / "new").write_text("kept")
    remove_set_aside(paths)
    wait_until(lambda: not _aside(paths), 30, "the detached rm to delete the old compute")
    assert (paths.compute_root / "new").read_text() == "kept"
    remove_set_aside(_paths(tmp_path / "absent"))  # no endpoint directory: nothing to do


def test_stop_discards_the_data_and_keeps_the_logs(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    _fill(paths)
    _discard_compute_data(paths)
    assert sorted(p.name for p in paths.compute_root.iterdir()) == ["lazyfs.log", "mnt"]
    wait_until(lambda: not _aside(paths), 30, "the detached rm to delete the stopped data")
    _discard_compute_data(paths)  # nothing left to discard
    assert not _aside(paths)


def _args(lsn: str | None, wait_stdin: bool) -> argparse.Namespace:
    return argparse.Namespace(lsn=lsn, wait_stdin=wait_stdin)


def test_fuse_server_start_lsn(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _start_lsn(_args("0/16B3748", False)) == Lsn.parse("0/16B3748")
    monkeypatch.setattr("sys.stdin", io.StringIO("go 1/4D294EB8\n"))
    assert _start_lsn(_args(None, True)) == Lsn.parse("1/4D294EB8")
    monkeypatch.setattr("sys.stdin", io.StringIO("go\n"))  # a bare go keeps --lsn
    assert _start_lsn(_args("0/16B3748", True)) == Lsn.parse("0/16B3748")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the starter gave up
    assert _start_lsn(_args(None, True)) is None
    monkeypatch.setattr("sys.stdin", io.StringIO("go\n"))
    with pytest.raises(StrataError, match="no start LSN"):
        _start_lsn(_args(None, True))
    monkeypatch.setattr("sys.stdin", io.StringIO("go nonsense\n"))
    with pytest.raises(StrataError):
        _start_lsn(_args(None, True))

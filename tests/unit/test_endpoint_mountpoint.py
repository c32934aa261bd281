"""`strata.control.endpoints.mountpoint_present`: a lazy compute's mount point counts as
there while its FUSE server is gone (stat: ENOTCONN), where `Path.exists` would raise."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from strata.control.endpoints import mountpoint_present


def test_missing_and_present(tmp_path: Path) -> None:
    assert not mountpoint_present(tmp_path / "mnt")
    (tmp_path / "file").write_text("x")
    assert not mountpoint_present(tmp_path / "file" / "mnt")  # a parent that is a file
    (tmp_path / "mnt").mkdir()
    assert mountpoint_present(tmp_path / "mnt")


def test_dead_fuse_mount_is_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = tmp_path / "mnt"
    real_stat = Path.stat

    def stat(self: Path, **kwargs: bool):  # type: ignore[no-untyped-def]
        if self == dead:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(OSError):
        dead.exists()  # what compute_mode used, and why it failed
    assert mountpoint_present(dead)

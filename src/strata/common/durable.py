"""Durable file writes: a file's bytes and its name survive a crash, whole or not at all.

`write_atomic(path, data)` writes `<name>.___temp`, fsyncs it, renames it over `path`
and fsyncs the directory, so a reader (or a restart) sees the old contents or the new,
never a mix. A crash can leave a `*.___temp` file behind; whoever owns the directory
deletes such leftovers at start (`TEMP_SUFFIX`).

`fsync_dir(directory)` makes the names in a directory durable after a create, rename or
unlink in it: without it a crash may forget a file whose bytes were fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path

from strata.common.failpoint import failpoint

TEMP_SUFFIX = ".___temp"


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, failpoint_prefix: str | None = None,
                 mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, fsync of the directory.

    `owner` (uid, gid) is given to the file before it takes its name (a PostgreSQL data
    directory written as root must stay the server user's). With `failpoint_prefix`,
    failpoints `<prefix>-before-write`, `-before-rename` and `-before-dir-fsync` let
    tests crash at each step.
    """
    temp = path.with_name(path.name + TEMP_SUFFIX)
    if failpoint_prefix is not None:
        failpoint(f"{failpoint_prefix}-before-write")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if owner is not None:
        os.chown(temp, *owner)
    if failpoint_prefix is not None:
        failpoint(f"{failpoint_prefix}-before-rename")
    os.replace(temp, path)
    if failpoint_prefix is not None:
        failpoint(f"{failpoint_prefix}-before-dir-fsync")
    fsync_dir(path.parent)

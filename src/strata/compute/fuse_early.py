"""The lazy FUSE server started first thing by `strata endpoint start` (issue 13).

The FUSE server is a Python process whose start and imports take ~0.2 s of CPU, and the
mount at the end of the basebackup waits for it: it was the longest chain of a start
after the CLI's own imports. So the `strata` program, before it imports anything else
(`strata.control.cli`), spawns `python -m strata.compute.lazyfs early` when its
arguments are `endpoint start` (not `--mode full`): that process imports the server and
waits for one JSON line on its stdin, the server's arguments, its log file and its
token (`{"argv": [...], "log": PATH, "token": TOKEN or null}`; it is started without the
CLI's `$STRATA_AUTH_TOKEN`, and its log names the scope of the token it got), then runs as
`spawn_lazyfs` would have started it (then waiting for `go LSN`). `spawn_lazyfs` takes
it (`take`) instead of spawning one; a start that does not use it (full mode, an error
first) leaves it to exit at the end of its stdin, when the CLI exits.

This module imports nothing heavy: it runs before the CLI's imports.
"""

from __future__ import annotations

import os
import subprocess
import sys

FUSE_LIBRARY_ENV = "FUSE_LIBRARY_PATH"
TOKEN_ENV = "STRATA_AUTH_TOKEN"  # strata.common.auth's (not imported here: it is not light)
LIBFUSE = "libfuse3.so.3"  # what fuse_unusable_reason loads: mfusepy then needs no lookup

_early: subprocess.Popen[bytes] | None = None


def libfuse() -> str:
    return os.environ.get(FUSE_LIBRARY_ENV) or LIBFUSE


def wanted(argv: list[str]) -> bool:
    """Whether `strata ARGV...` is an `endpoint start` that may run in lazy mode."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the group's options
        if argv[i] == "--repo-dir":
            i += 1
        elif not argv[i].startswith("--repo-dir="):
            return False  # --help, --version, or something click will refuse
        i += 1
    if argv[i:i + 2] != ["endpoint", "start"]:
        return False
    rest = argv[i + 2:]
    if "--help" in rest:
        return False
    for j, arg in enumerate(rest):
        if arg == "--mode" and rest[j + 1:j + 2] == ["full"] or arg == "--mode=full":
            return False
    return True


def spawn() -> None:
    """Start the early FUSE server (once per process; errors are left to the normal
    spawn, which happens when this one is missing)."""
    global _early
    if _early is not None:
        return
    try:
        _early = subprocess.Popen(
            [sys.executable, "-m", "strata.compute.lazyfs", "early"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            # Not the CLI's token (it may be an admin one): the server gets its tenant's
            # token with its arguments.
            env={**{k: v for k, v in os.environ.items() if k != TOKEN_ENV},
                 FUSE_LIBRARY_ENV: libfuse()})
    except OSError:
        _early = None


def take() -> subprocess.Popen[bytes] | None:
    """The early FUSE server if it was started and still runs (once)."""
    global _early
    proc, _early = _early, None
    if proc is not None and proc.poll() is not None:
        return None
    return proc

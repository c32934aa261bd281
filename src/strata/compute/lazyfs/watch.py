"""The watchdog of a lazy compute: `python -m strata.compute.lazyfs.watch --fuse-pid P
--datadir D --mountpoint M` couples its two processes (D6): when the FUSE server dies, it
stops PostgreSQL immediately (SIGQUIT to the postmaster) and detaches the dead mount; when
the postmaster exits (a crash with `restart_after_crash = off`, or a stop), it stops the
FUSE server.

A module of its own, importing only the standard library and the log set-up: it starts
while PostgreSQL does, and the FUSE server's imports (the binding, the page client) would
take ~0.2 s of CPU from that start on a small machine for nothing it uses.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from strata.common.logctx import setup_logging

if TYPE_CHECKING:  # argparse only in the watchdog's process, not in the CLI's (`detach`)
    import argparse

log = logging.getLogger("strata.compute.lazyfs")

FUSERMOUNT = "fusermount3"


def _postmaster_pid(datadir: Path) -> int | None:
    try:
        first = (datadir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except (FileNotFoundError, PermissionError):
        return None
    return int(first) if first.isdigit() else None


def detach(mountpoint: str) -> None:
    """Unmount `mountpoint` if it is still mounted (lazily: open files may remain)."""
    if os.path.ismount(mountpoint) or _is_dead_mount(mountpoint):
        subprocess.run([FUSERMOUNT, "-u", "-z", "-q", mountpoint], check=False,
                       capture_output=True)


def _is_dead_mount(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == 107  # ENOTCONN: the FUSE server is gone
    return False


def watch_main(args: argparse.Namespace) -> int:
    datadir = Path(args.datadir)
    try:
        fuse_fd = os.pidfd_open(args.fuse_pid)
    except ProcessLookupError:
        fuse_fd = None
    pm_pid: int | None = None
    pm_fd: int | None = None
    while fuse_fd is not None:
        if pm_fd is None and (pid := _postmaster_pid(datadir)) is not None:
            try:
                pm_fd, pm_pid = os.pidfd_open(pid), pid
            except ProcessLookupError:
                pass
        ready, _, _ = select.select([fuse_fd] + ([pm_fd] if pm_fd is not None else []),
                                    [], [], 0.2)
        if fuse_fd in ready:
            break
        if pm_fd is not None and pm_fd in ready:
            log.info("postmaster %d exited; stopping the file system (pid %d)", pm_pid,
                     args.fuse_pid)
            try:
                os.kill(args.fuse_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while not select.select([fuse_fd], [], [], 0.5)[0]:
                if time.monotonic() > deadline:
                    log.error("file system pid %d did not stop in 30s; killing it",
                              args.fuse_pid)
                    os.kill(args.fuse_pid, signal.SIGKILL)
                    break
            detach(args.mountpoint)
            return 0
    # The FUSE server is gone: PostgreSQL must not go on without its files.
    pid = pm_pid if pm_pid is not None else _postmaster_pid(datadir)
    if pid is not None:
        log.error("file system pid %d exited; stopping PostgreSQL (postmaster %d) at once",
                  args.fuse_pid, pid)
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            pass
    detach(args.mountpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m strata.compute.lazyfs.watch",
                                     description="stop PostgreSQL and the file system "
                                                 "together")
    parser.add_argument("--fuse-pid", type=int, required=True)
    parser.add_argument("--datadir", required=True)
    parser.add_argument("--mountpoint", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    return watch_main(args)


if __name__ == "__main__":
    sys.exit(main())

"""The lazy file system's processes: `mount` (the FUSE server) and `watch` (its watchdog).

`python -m strata.compute.lazyfs mount --store DIR --mountpoint DIR --pageserver HOST:PORT
--tenant T --timeline TL --lsn X [--wait-stdin]` (first waiting for a line on stdin, so
that its start overlaps the starting process's basebackup) lays out the segment files
of `DIR/strata_lazy_rels` as sparse files in `DIR/tree` (which holds the basebackup's
`base/` and `global/`), renews the compute's LSN lease on X for as long as it runs (D5),
and serves `DIR/tree` at the mount point in the foreground until unmounted or sent
SIGTERM. While the pageserver is unreachable, a read waits for it up to `--outage-wait-s`
(default 60). With `--pageserver-file F` the address is F's (re-read when F changes:
`strata tenant relocate` moves running computes to another pageserver).

`python -m strata.compute.lazyfs watch --fuse-pid P --datadir D --mountpoint M` couples
the two processes of a lazy compute (D6): when the FUSE server dies, it stops PostgreSQL
immediately (SIGQUIT to the postmaster) and detaches the dead mount; when the postmaster
exits (a crash with `restart_after_crash = off`, or a stop), it stops the FUSE server.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mfusepy as fuse

from strata.common.errors import StrataError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import setup_logging, timeline_context
from strata.common.lsn import Lsn
from strata.compute.lazyfs.blockstate import DEFAULT_MAX_WINDOW, RemoteFile
from strata.compute.lazyfs.fetcher import PageFetcher
from strata.compute.lazyfs.fs import LazyFs
from strata.compute.lazyfs.manifest import MANIFEST_NAME, parse_manifest, segment_files
from strata.compute.pageserver_address import AddressFile
from strata.pageserver.page_client import PageClientSync
from strata.pg.constants import BLCKSZ
from strata.pg.controlfile import ControlFileData

log = logging.getLogger("strata.compute.lazyfs")

TREE = "tree"
FUSERMOUNT = "fusermount3"


def lay_out(store: Path, max_window: int = DEFAULT_MAX_WINDOW) -> tuple[dict[str, RemoteFile],
                                                                         ControlFileData]:
    """Create the sparse segment files of the manifest in `store/tree`; their remote parts."""
    tree = store / TREE
    control_path = tree / "global" / "pg_control"
    control = ControlFileData.from_bytes(control_path.read_bytes(), path=str(control_path))
    manifest = store / MANIFEST_NAME
    rels = parse_manifest(manifest.read_text(), str(manifest))
    owner = os.stat(tree)
    remote: dict[str, RemoteFile] = {}
    for seg in segment_files(rels, control.relseg_size):
        real = tree / seg.path
        if not real.parent.is_dir():
            raise UserError(f"the lazy basebackup lists {seg.path} but has no directory "
                            f"{real.parent.relative_to(tree)}: the basebackup is inconsistent")
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, seg.nblocks * BLCKSZ)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        finally:
            os.close(fd)
        if seg.nblocks:
            remote["/" + seg.path] = RemoteFile(seg.source, seg.first_block, seg.nblocks,
                                                max_window)
    return remote, control


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _renew_lease(client: PageClientSync, lsn: Lsn, lease_s: float, stop: threading.Event) -> None:
    while not stop.wait(lease_s / 3):
        try:
            client.lease(lsn, lease_s)
        except StrataError as err:
            # The lease still runs for up to two thirds of its length; try again soon.
            log.warning("could not renew the lease on %s: %s; retrying in 5s", lsn, err)
            stop.wait(5)


def mount_main(args: argparse.Namespace) -> int:
    store = Path(args.store)
    tenant, timeline = TenantId.parse(args.tenant), TimelineId.parse(args.timeline)
    lsn = Lsn.parse(args.lsn)
    host, port = args.pageserver.rsplit(":", 1)
    with timeline_context(tenant, timeline):
        # The connection and the lease come before the store is ready (with --wait-stdin
        # while the starting process fills it): they are off the start's path.
        # Our own threads (the page client's loop, the lease renewer) must never take
        # SIGTERM: libfuse's handler only sets an exit flag, which ends the loop when the
        # signal interrupts the main thread or a FUSE worker, not one of ours. Threads
        # inherit the mask, so block the signals while they are created.
        saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            address = None
            if args.pageserver_file:
                address = AddressFile(args.pageserver_file).pg
            client = PageClientSync(host, int(port), tenant, timeline,
                                    outage_wait_s=args.outage_wait_s, address=address)
            client.lease(lsn, args.lease_s)
            stop = threading.Event()
            threading.Thread(target=_renew_lease, args=(client, lsn, args.lease_s, stop),
                             daemon=True, name="lease").start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        if args.wait_stdin and not sys.stdin.readline():
            log.info("the starting process gave up before the store was ready; exiting")
            stop.set()
            client.close()
            return 1
        remote, control = lay_out(store, args.readahead)
        fetcher = PageFetcher(client, lsn, checksums=control.data_checksum_version != 0)
        ops = LazyFs(str(store / TREE), fetcher, remote)
        log.info("serving %s at %s: %d remote segment files at %s", store / TREE,
                 args.mountpoint, len(remote), lsn)
        try:
            fuse.FUSE(ops, args.mountpoint, foreground=True, allow_other=True,
                      default_permissions=True, fsname="strata-lazyfs", subtype="strata")
        except RuntimeError as err:
            # fuse_main's loop ends with an error when the mount was detached under it
            # (the watchdog after PostgreSQL exited): that is a normal end.
            if os.path.ismount(args.mountpoint):
                raise
            log.info("%s was unmounted (fuse_main returned %s)", args.mountpoint, err)
        finally:
            stop.set()
            client.close()
            log.info("file system server exits: fetched %d pages in %d requests",
                     fetcher.pages, fetcher.requests)
    return 0


# --- the watchdog -----------------------------------------------------------------------
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
    parser = argparse.ArgumentParser(prog="python -m strata.compute.lazyfs")
    sub = parser.add_subparsers(dest="command", required=True)
    mount = sub.add_parser("mount", help="serve a lazy compute's base/ and global/")
    mount.add_argument("--store", required=True)
    mount.add_argument("--mountpoint", required=True)
    mount.add_argument("--pageserver", required=True, help="host:pg_port")
    mount.add_argument("--tenant", required=True)
    mount.add_argument("--timeline", required=True)
    mount.add_argument("--lsn", required=True)
    mount.add_argument("--lease-s", type=float, default=600.0)
    mount.add_argument("--readahead", type=int, default=DEFAULT_MAX_WINDOW,
                       help="largest readahead window in blocks")
    mount.add_argument("--outage-wait-s", type=float, default=60.0,
                       help="how long a read waits for an unreachable pageserver")
    mount.add_argument("--pageserver-file",
                       help="a JSON file with the pageserver's address, re-read when it "
                            "changes (strata.compute.pageserver_address): reads follow a "
                            "relocation of the tenant"),
    mount.add_argument("--wait-stdin", action="store_true",
                       help="read a line from stdin before using the store (the starting "
                            "process fills it meanwhile); exit at end of file")
    watch = sub.add_parser("watch", help="stop PostgreSQL and the file system together")
    watch.add_argument("--fuse-pid", type=int, required=True)
    watch.add_argument("--datadir", required=True)
    watch.add_argument("--mountpoint", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "mount":
        return mount_main(args)
    return watch_main(args)


if __name__ == "__main__":
    sys.exit(main())
